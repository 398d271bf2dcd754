"""Writes driver-constraints.txt: the exact versions of the driver's dependencies (its whole closure) that
this checkout's venv has, i.e. what the suite tested. A runner manager installs with them:

    pip install -c driver-constraints.txt /path/to/this/repository

    python scripts/driver_lock.py            # rewrite it from the venv (after upgrading a dependency)
    python scripts/driver_lock.py --check    # exit 1 if it does not match the venv (tests/unit runs this)
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import sys
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "driver-constraints.txt"
DISTRIBUTION = "fargate-ci-driver"
HEADER = (
    "# The driver's dependencies as tested (scripts/driver_lock.py writes this from the test venv).\n"
    "# pip install -c driver-constraints.txt /path/to/fargate-ci\n"
)


def closure(name: str = DISTRIBUTION) -> dict[str, str]:
    """{distribution: installed version} for everything `name` needs at run time (no extras), not itself."""
    environment = default_environment()
    found: dict[str, str] = {}
    pending = [name]
    while pending:
        current = pending.pop()
        for text in metadata.requires(current) or []:
            requirement = Requirement(text)
            if requirement.marker and not requirement.marker.evaluate({**environment, "extra": ""}):
                continue
            key = canonicalize_name(requirement.name)
            if key not in found:
                found[key] = metadata.version(requirement.name)
                pending.append(requirement.name)
    return dict(sorted(found.items()))


def render(pins: dict[str, str]) -> str:
    return HEADER + "".join(f"{name}=={version}\n" for name, version in pins.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    text = render(closure())
    if args.check:
        if not LOCK.exists() or LOCK.read_text() != text:
            print(f"{LOCK.name} differs from the venv: run `python scripts/driver_lock.py`", file=sys.stderr)
            return 1
        return 0
    LOCK.write_text(text)
    print(f"wrote {LOCK.name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
