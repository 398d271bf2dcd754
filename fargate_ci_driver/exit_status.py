"""The one place that turns the driver's outcome into a process exit code (httpie's ExitStatus idea).

Only three codes ever leave the driver: 0, the runner's BUILD_FAILURE_EXIT_CODE and its
SYSTEM_FAILURE_EXIT_CODE. Both failure codes come from the runner's environment; GitLab Runner always sets
them (executors/custom/command/command.go), so the fallbacks only matter when someone runs the driver by hand.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from fargate_ci_driver.errors import BuildFailed, DriverError, JobInputError

SUCCESS = 0
# GitLab Runner's own values, used only when the variables are absent (a hand-run driver).
RUNNER_DEFAULT_BUILD_FAILURE = 1
RUNNER_DEFAULT_SYSTEM_FAILURE = 2


@dataclass(frozen=True)
class ExitCodes:
    build_failure: int
    system_failure: int
    build_exit_code_file: str | None = None
    # Set when the environment lacked a code, so the CLI can say so once.
    problem: str | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> ExitCodes:
        problems = []
        build = _code(environ, "BUILD_FAILURE_EXIT_CODE", RUNNER_DEFAULT_BUILD_FAILURE, problems)
        system = _code(environ, "SYSTEM_FAILURE_EXIT_CODE", RUNNER_DEFAULT_SYSTEM_FAILURE, problems)
        return cls(
            build_failure=build,
            system_failure=system,
            build_exit_code_file=environ.get("BUILD_EXIT_CODE_FILE") or None,
            problem="; ".join(problems) or None,
        )

    def for_error(self, error: BaseException) -> int:
        """The exit code for an error that ended a stage. Anything not known to be the job's fault is a
        system failure, so the runner retries prepare and reports runner_system_failure."""
        if isinstance(error, BuildFailed | JobInputError):
            return self.build_failure
        return self.system_failure

    def record_build_exit_code(self, error: BuildFailed) -> None:
        """Tell the runner the script's own exit status, which makes `allow_failure: exit_codes` work."""
        if not self.build_exit_code_file:
            return
        try:
            with open(self.build_exit_code_file, "w", encoding="ascii") as f:
                f.write(f"{error.exit_code}\n")
        except OSError as exc:
            raise DriverError(
                f"cannot write BUILD_EXIT_CODE_FILE {self.build_exit_code_file}: {exc}"
            ) from exc


def _code(environ: Mapping[str, str], name: str, default: int, problems: list[str]) -> int:
    raw = environ.get(name, "")
    try:
        value = int(raw)
    except ValueError:
        problems.append(f"{name} is {'not set' if not raw else repr(raw)}; using {default}")
        return default
    if not 0 < value < 256:
        problems.append(f"{name}={raw} is not an exit code (1-255); using {default}")
        return default
    return value


def current() -> ExitCodes:
    return ExitCodes.from_environ(os.environ)
