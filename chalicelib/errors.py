"""One error hierarchy for the orchestrator; `app.py` maps it to HTTP statuses in one place."""

from __future__ import annotations


class OrchestratorError(Exception):
    """Base of every error the API answers with a JSON body."""

    status = 500
    code = "InternalError"

    def __init__(self, message: str, *, field: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": self.code, "message": self.message, "field": self.field}


class ConfigurationError(OrchestratorError):
    """The orchestrator's own settings are wrong (an operator's mistake, not the caller's)."""

    code = "ConfigurationError"


class InvalidInput(OrchestratorError):
    """The request is malformed or asks for something not allowed."""

    status = 400
    code = "InvalidInput"


class Forbidden(OrchestratorError):
    """The request carries no caller identity (IAM authorisation should have refused it)."""

    status = 403
    code = "Forbidden"


class JobNotFound(OrchestratorError):
    """No job with that key belongs to the caller."""

    status = 404
    code = "JobNotFound"


class JobConflict(OrchestratorError):
    """The job key exists with different parameters."""

    status = 409
    code = "JobConflict"


class AttemptMismatch(OrchestratorError):
    """The call names an attempt of the job that is not its current one (late, replayed or stale)."""

    status = 409
    code = "AttemptMismatch"


class TaskStartFailed(OrchestratorError):
    """ECS refused to start the task; the message carries AWS's reason."""

    status = 502
    code = "TaskStartFailed"


class Throttled(OrchestratorError):
    """AWS kept throttling us, or the job is being started by a concurrent request: retry later."""

    status = 503
    code = "Throttled"


class NoCapacity(OrchestratorError):
    """Fargate had no capacity for the task: retry later."""

    status = 503
    code = "NoCapacity"


class TaskNotFound(OrchestratorError):
    """ECS does not know the task (an adapter-level fact; callers decide what it means)."""

    status = 404
    code = "TaskNotFound"


class StaleWrite(OrchestratorError):
    """A conditional write lost: the record moved on. Callers re-read or drop the change."""

    status = 409
    code = "StaleWrite"


class CertificateUnavailable(OrchestratorError):
    """The SSH CA (KMS) could not sign: the job cannot be given access to its task now."""

    status = 503
    code = "CertificateUnavailable"


class HostKeyConflict(OrchestratorError):
    """A task published a host key other than the one already bound to it: refused (first key wins)."""

    status = 409
    code = "HostKeyConflict"


class RegistryLookupFailed(OrchestratorError):
    """An image's config could not be read from its registry (an adapter-level fact: the launch treats the
    image's ports as unknown and goes on; the message, which names why, goes into the job log)."""

    status = 502
    code = "RegistryLookupFailed"
