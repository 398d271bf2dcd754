"""The driver's dependencies are bounded and locked (issue 17): pyproject.toml gives each an upper bound, and
driver-constraints.txt pins their whole closure at the versions this venv has, i.e. what the suite tests, so
a runner manager installs what was tested (`pip install -c driver-constraints.txt ...`)."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO_ROOT

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
LOCK = REPO_ROOT / "driver-constraints.txt"


def _pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_every_driver_dependency_has_an_upper_bound():
    requirements = [Requirement(text) for text in PYPROJECT["project"]["dependencies"]]
    assert {r.name for r in requirements} == {"paramiko", "botocore"}
    for requirement in requirements:
        assert any(spec.operator in ("<", "<=", "~=", "==") for spec in requirement.specifier), requirement


def test_the_lock_is_the_venvs_closure_of_the_driver():
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "driver_lock.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert {"paramiko", "botocore", "cryptography", "bcrypt", "pynacl"} <= set(_pins())


def test_the_pins_satisfy_the_bounds():
    pins = _pins()
    for text in PYPROJECT["project"]["dependencies"]:
        requirement = Requirement(text)
        assert requirement.specifier.contains(pins[canonicalize_name(requirement.name)]), requirement
