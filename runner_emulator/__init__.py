"""Drives any custom-executor driver exactly as GitLab Runner does (custom-executor protocol §1-§8).

Used by the end-to-end tests and the demo; see `RunnerEmulator`.
"""

from runner_emulator.job import JobSpec, RunnerConfig, Variable
from runner_emulator.runner import (
    CANCELED,
    FAILED,
    JOB_TIMEOUT,
    SCRIPT_FAILURE,
    SUCCESS,
    SYSTEM_FAILURE,
    JobResult,
    RunnerEmulator,
    StageRun,
)

__all__ = [
    "CANCELED",
    "FAILED",
    "JOB_TIMEOUT",
    "SCRIPT_FAILURE",
    "SUCCESS",
    "SYSTEM_FAILURE",
    "JobResult",
    "JobSpec",
    "RunnerConfig",
    "RunnerEmulator",
    "StageRun",
    "Variable",
]
