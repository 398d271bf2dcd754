"""The driver as an operator installs it (`pip install` of this repository, operator's guide): the wheel
carries the driver's package and `fargate-driver` as a plain script, installed with the target interpreter in
its shebang, and none of the development tooling (design.md "Packaging")."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import REPO_ROOT


def test_the_wheel_installs_a_fargate_driver_script_that_runs(tmp_path: Path):
    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources.
    source = tmp_path / "source"
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, (t.decode() for t in tracked)):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(
        [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("fargate_ci_driver-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    # One top-level package, named after the project; no sandbox, runner_emulator, tests, bench or chalicelib.
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))} == {
        "fargate_ci_driver"
    }
    assert "fargate_ci_driver/agent/fastpath.py" in names and "fargate_ci_driver/agent/__main__.py" in names
    script = (
        zipfile.ZipFile(wheel).read(f"{wheel.name.split('-py3')[0]}.data/scripts/fargate-driver").decode()
    )
    # No pip-generated wrapper: that one imports `re`, a cost every CI stage would pay.
    assert script.startswith("#!python\n") and "import re" not in script

    target = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(target)], check=True)
    subprocess.run(
        [*pip, "--python", str(target / "bin" / "python"), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
    )
    installed = target / "bin" / "fargate-driver"
    assert installed.read_text().splitlines()[0] == f"#!{target / 'bin' / 'python'}"
    done = subprocess.run([str(installed), "--version"], capture_output=True, text=True, check=False)
    assert (done.returncode, done.stdout.strip()) == (0, "fargate-driver 0.1.0"), done.stderr
    # The development tooling is not installed with it (run outside the checkout, so nothing finds it there).
    for tool in ("sandbox", "runner_emulator", "local_driver"):
        probe = subprocess.run(
            [str(target / "bin" / "python"), "-c", f"import {tool}"], capture_output=True, cwd=tmp_path
        )
        assert probe.returncode != 0 and b"ModuleNotFoundError" in probe.stderr, tool
