"""Print the mutation score per module from mutmut's results (`make mutate` runs it after `mutmut run`).

Score = killed / (killed + survived + no tests): a mutant no fast test runs counts against the module, a
timeout counts as killed (the mutant hung the code under test, which a test noticed). Mutants a partial run
did not reach ("not checked") are shown in their own column and count for nothing; the last line says
whether the run was complete.

When a full run does not fit (it takes hours on a busy 2-CPU machine), a uniform random sample estimates
the score of all mutants:

    python scripts/mutation_score.py --sample 800 --seed 13 > sample.txt  # names drawn from all mutants
    mutmut run $(python scripts/mutation_score.py --unsettled sample.txt)  # those not killed yet
    python scripts/mutation_score.py --only sample.txt  # the sample's score, with a 95 % interval
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

GOAL = 85.0
KILLED = {"killed", "timeout", "caught by type check", "segfault"}
MISSED = {"survived", "no tests"}
UNCHECKED = "not checked"


def statuses(mutants: Path) -> dict[str, dict[str, str]]:
    """module → mutant name → status."""
    result: dict[str, dict[str, str]] = {}
    for meta in sorted(mutants.rglob("*.py.meta")):
        module = str(meta.relative_to(mutants))[: -len(".meta")]
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        result[module] = {name: status_by_exit_code[code] for name, code in codes.items()}
    return result


def scores(mutants: Path, only: set[str] | None = None) -> dict[str, Counter]:
    return {
        module: Counter(s for name, s in names.items() if only is None or name in only)
        for module, names in statuses(mutants).items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, metavar="N", help="print N mutant names drawn at random")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--unsettled", metavar="FILE", help="print the names in FILE not killed yet")
    parser.add_argument("--only", metavar="FILE", help="score only the mutants named in FILE")
    args = parser.parse_args(argv)
    mutants = Path("mutants")
    everything = statuses(mutants)
    if not everything:
        print("no mutmut results under mutants/: run `make mutate`", file=sys.stderr)
        return 1
    if args.sample:
        names = sorted(name for names in everything.values() for name in names)
        draw = random.Random(args.seed)  # noqa: S311 (a sample, not a secret)
        print("\n".join(draw.sample(names, min(args.sample, len(names)))))
        return 0
    if args.unsettled:
        wanted = set(Path(args.unsettled).read_text().split())
        flat = {name: s for names in everything.values() for name, s in names.items()}
        print("\n".join(sorted(n for n in wanted if flat.get(n, UNCHECKED) not in KILLED)))
        return 0
    only = set(Path(args.only).read_text().split()) if args.only else None
    total = Counter()
    print("| module | killed | survived | no tests | not checked | score |\n|---|---|---|---|---|---|")
    for module, counts in scores(mutants, only).items():
        if not counts:
            continue  # nothing to mutate (constants, re-exports), or nothing of it sampled
        total.update(counts)
        print(_row(module, counts))
    print(_row("**all**", total))
    score = _score(total)
    print(f"\nmutation score {score:.1f} % (goal >= {GOAL:.0f} %): {'met' if score >= GOAL else 'missed'}")
    considered = _considered(total)
    if only is not None and considered:
        half = 196.0 * math.sqrt(score / 100 * (1 - score / 100) / considered)
        print(f"sample of {considered} mutants: 95 % interval {score - half:.1f}-{score + half:.1f} %")
    if total[UNCHECKED]:
        print(f"partial run: {total[UNCHECKED]} mutants not checked")
    return 0


def _considered(counts: Counter) -> int:
    return sum(counts[s] for s in KILLED | MISSED)


def _score(counts: Counter) -> float:
    killed = sum(counts[s] for s in KILLED)
    considered = _considered(counts)
    return 100.0 * killed / considered if considered else 0.0


def _row(module: str, counts: Counter) -> str:
    killed = sum(counts[s] for s in KILLED)
    score = f"{_score(counts):.1f} %" if _considered(counts) else "-"
    cells = (module, killed, counts["survived"], counts["no tests"], counts[UNCHECKED], score)
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


if __name__ == "__main__":
    sys.exit(main())
