"""Print the mutation score per module from mutmut's results (`make mutate` runs it after `mutmut run`).

Score = killed / (killed + survived + no tests): a mutant no fast test runs counts against the module, a
timeout counts as killed (the mutant hung the code under test, which a test noticed). Mutants a partial run
did not reach ("not checked") are shown in their own column and count for nothing; the last line says
whether the run was complete.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

GOAL = 85.0
KILLED = {"killed", "timeout", "caught by type check", "segfault"}
MISSED = {"survived", "no tests"}
UNCHECKED = "not checked"


def scores(mutants: Path) -> dict[str, Counter]:
    per_module: dict[str, Counter] = {}
    for meta in sorted(mutants.rglob("*.py.meta")):
        module = str(meta.relative_to(mutants))[: -len(".meta")]
        counts = per_module.setdefault(module, Counter())
        for code in json.loads(meta.read_text())["exit_code_by_key"].values():
            counts[status_by_exit_code[code]] += 1
    return per_module


def main() -> int:
    per_module = scores(Path("mutants"))
    if not per_module:
        print("no mutmut results under mutants/: run `make mutate`", file=sys.stderr)
        return 1
    total = Counter()
    print("| module | killed | survived | no tests | not checked | score |\n|---|---|---|---|---|---|")
    for module, counts in per_module.items():
        if not counts:
            continue  # nothing to mutate (constants, re-exports)
        total.update(counts)
        print(_row(module, counts))
    print(_row("**all**", total))
    score = _score(total)
    print(f"\nmutation score {score:.1f} % (goal >= {GOAL:.0f} %): {'met' if score >= GOAL else 'missed'}")
    if total[UNCHECKED]:
        print(f"partial run: {total[UNCHECKED]} mutants not checked")
    return 0


def _score(counts: Counter) -> float:
    killed = sum(counts[s] for s in KILLED)
    considered = killed + sum(counts[s] for s in MISSED)
    return 100.0 * killed / considered if considered else 0.0


def _row(module: str, counts: Counter) -> str:
    killed = sum(counts[s] for s in KILLED)
    considered = killed + sum(counts[s] for s in MISSED)
    score = f"{_score(counts):.1f} %" if considered else "-"
    cells = (module, killed, counts["survived"], counts["no tests"], counts[UNCHECKED], score)
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


if __name__ == "__main__":
    sys.exit(main())
