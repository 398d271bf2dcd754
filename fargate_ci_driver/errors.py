"""The driver's one error hierarchy. `fargate_ci_driver.exit_status` maps it to the runner's exit codes."""

from __future__ import annotations


class DriverError(Exception):
    """Anything that ends a driver stage early; a system failure unless a subclass says otherwise."""


class ConfigError(DriverError):
    """fargate.toml, a command-line flag or a per-job variable is missing or wrong."""


class StateError(DriverError):
    """The per-job metadata on the runner manager is missing or unreadable."""


class StateExists(StateError):
    """prepare found the job key's files already in the metadata directory: it leaves them alone."""


class ApiError(DriverError):
    """The orchestrator API answered with an error, or could not be reached (status 0)."""

    # Worth another try: the API is idempotent per job, and these say "not now" rather than "no".
    RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        retry_after: float | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}" if status == 0 else f"HTTP {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        # The request field the API blamed (design.md error shape), if any.
        self.field = field

    @property
    def retryable(self) -> bool:
        if self.status == 0:
            return self.code == ApiUnreachable.CODE
        # 502 TaskStartFailed is AWS saying no (the runner retries prepare itself); a gateway 502 is not.
        if self.status == 502 and self.code == "TaskStartFailed":
            return False
        return self.status in self.RETRYABLE_STATUSES


ATTEMPT_MISMATCH = "AttemptMismatch"


def attempt_over(exc: ApiError) -> bool:
    """The orchestrator says the attempt a DELETE or heartbeat named is not ours to act on (any more):
    409 AttemptMismatch (a newer attempt exists) or 404 (no such job for this caller)."""
    return exc.status == 404 or (exc.status == 409 and exc.code == ATTEMPT_MISMATCH)


class ApiUnreachable(ApiError):
    """No HTTP answer at all: connection refused or reset, DNS failure, timeout."""

    CODE = "Unreachable"

    def __init__(self, message: str) -> None:
        super().__init__(0, self.CODE, message)


class TaskError(DriverError):
    """The job's task failed to start, or stopped under the job."""


class SshError(DriverError):
    """The task's sshd could not be reached, authenticated against, or lost the connection."""


class SshUnavailable(SshError):
    """sshd did not answer (yet): refused, timed out, no banner. Worth retrying while the task starts."""


class HostKeyMismatch(SshError):
    """The task presented a host key other than the one pinned for this job: refused, never trusted."""


class Cancelled(DriverError):
    """The runner sent SIGTERM (job cancelled or timed out)."""


class BuildFailed(DriverError):
    """The job's own script exited non-zero: a build failure, not a system failure."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(f"the stage script exited with status {exit_code}")
        self.exit_code = exit_code


class JobInputError(DriverError):
    """A per-job CI/CD variable (FARGATE_CPU, ...) is wrong: the job's fault, so a build failure that the
    runner does not retry, not a system failure."""
