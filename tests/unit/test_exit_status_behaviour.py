"""The exit codes the driver hands GitLab Runner: the runner's own codes when it sets them, its defaults and a
one-line problem when it does not, and the script's exit status in BUILD_EXIT_CODE_FILE."""

from __future__ import annotations

import pytest

from fargate_ci_driver import exit_status
from fargate_ci_driver.errors import BuildFailed, DriverError, JobInputError
from fargate_ci_driver.exit_status import ExitCodes


def test_the_runners_codes_are_used_as_given():
    codes = ExitCodes.from_environ(
        {"BUILD_FAILURE_EXIT_CODE": "17", "SYSTEM_FAILURE_EXIT_CODE": "18", "BUILD_EXIT_CODE_FILE": "/x/code"}
    )

    assert codes == ExitCodes(
        build_failure=17, system_failure=18, build_exit_code_file="/x/code", problem=None
    )


def test_absent_codes_fall_back_to_the_runners_defaults_and_say_so():
    codes = ExitCodes.from_environ({})

    assert (codes.build_failure, codes.system_failure) == (1, 2)
    assert codes.build_exit_code_file is None
    assert codes.problem == (
        "BUILD_FAILURE_EXIT_CODE is not set; using 1; SYSTEM_FAILURE_EXIT_CODE is not set; using 2"
    )


def test_an_empty_exit_code_file_variable_means_none():
    codes = ExitCodes.from_environ(
        {"BUILD_FAILURE_EXIT_CODE": "1", "SYSTEM_FAILURE_EXIT_CODE": "2", "BUILD_EXIT_CODE_FILE": ""}
    )

    assert codes.build_exit_code_file is None
    assert codes.problem is None


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("abc", "BUILD_FAILURE_EXIT_CODE is 'abc'; using 1"),
        ("0", "BUILD_FAILURE_EXIT_CODE=0 is not an exit code (1-255); using 1"),
        ("256", "BUILD_FAILURE_EXIT_CODE=256 is not an exit code (1-255); using 1"),
        ("-3", "BUILD_FAILURE_EXIT_CODE=-3 is not an exit code (1-255); using 1"),
    ],
)
def test_a_build_failure_code_that_is_no_exit_code_is_named_and_replaced(raw, problem):
    codes = ExitCodes.from_environ({"BUILD_FAILURE_EXIT_CODE": raw, "SYSTEM_FAILURE_EXIT_CODE": "9"})

    assert codes.build_failure == 1
    assert codes.system_failure == 9
    assert codes.problem == problem


@pytest.mark.parametrize("raw", ["1", "255"])
def test_the_edges_of_the_exit_code_range_are_kept(raw):
    codes = ExitCodes.from_environ({"BUILD_FAILURE_EXIT_CODE": raw, "SYSTEM_FAILURE_EXIT_CODE": raw})

    assert codes.build_failure == codes.system_failure == int(raw)
    assert codes.problem is None


def test_a_bad_system_failure_code_is_named_and_replaced():
    codes = ExitCodes.from_environ({"BUILD_FAILURE_EXIT_CODE": "5", "SYSTEM_FAILURE_EXIT_CODE": "300"})

    assert (codes.build_failure, codes.system_failure) == (5, 2)
    assert codes.problem == "SYSTEM_FAILURE_EXIT_CODE=300 is not an exit code (1-255); using 2"


def test_the_jobs_own_failures_are_build_failures_and_everything_else_is_a_system_failure():
    codes = ExitCodes(build_failure=7, system_failure=8)

    assert codes.for_error(BuildFailed(3)) == 7
    assert codes.for_error(JobInputError("bad image")) == 7
    assert codes.for_error(DriverError("api down")) == 8
    assert codes.for_error(RuntimeError("bug")) == 8


def test_the_scripts_exit_status_is_written_for_the_runner(tmp_path):
    path = tmp_path / "code"
    codes = ExitCodes(build_failure=1, system_failure=2, build_exit_code_file=str(path))

    codes.record_build_exit_code(BuildFailed(42))

    assert path.read_text(encoding="ascii") == "42\n"


def test_without_an_exit_code_file_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ExitCodes(build_failure=1, system_failure=2).record_build_exit_code(BuildFailed(42))

    assert list(tmp_path.iterdir()) == []


def test_an_exit_code_file_that_cannot_be_written_is_a_driver_error_naming_it(tmp_path):
    path = tmp_path / "missing-dir" / "code"
    codes = ExitCodes(build_failure=1, system_failure=2, build_exit_code_file=str(path))

    with pytest.raises(DriverError, match=f"cannot write BUILD_EXIT_CODE_FILE {path}: "):
        codes.record_build_exit_code(BuildFailed(42))


def test_current_reads_the_process_environment(monkeypatch):
    monkeypatch.setenv("BUILD_FAILURE_EXIT_CODE", "11")
    monkeypatch.setenv("SYSTEM_FAILURE_EXIT_CODE", "12")
    monkeypatch.delenv("BUILD_EXIT_CODE_FILE", raising=False)

    assert exit_status.current() == ExitCodes(build_failure=11, system_failure=12)
