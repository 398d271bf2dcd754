"""What a job record says: small pure facts every use case reads (attempt, task, whether it ran). No AWS."""

from __future__ import annotations

from typing import Any

from chalicelib.errors import AttemptMismatch
from chalicelib.jobs import record_key_from_started_by
from chalicelib.states import TERMINAL, JobState
from chalicelib.tasks import TaskSnapshot

# What belongs to one attempt's task: a new attempt starts without any of it.
TASK_FIELDS = (
    "task_arn",
    "last_status",
    "address",
    "capacity_provider",
    "stop_code",
    "stopped_reason",
    "exit_code",
    "container_reason",
    "started_at",
    "stopping_at",
    "stopped_at",
    "task_version",
    "stop_requested",
    "reaped",
    "stop_retries",
    "launch_try",
    "capacity_note",
    "service_notes",
    "ssh_ready_seconds",
    "checked_at",
    "host_key",
    "ssh_certificate",
    "warm",
    "pool_slot",
)


def claims_task(item: dict | None, task_arn: str) -> bool:
    """Whether a job record stands for this task: it is the job's task, or the live job has not recorded its
    task yet (a launch in flight, or one whose answer was lost and that a retry will recover with the same
    clientToken). A job stuck that way is failed by the reaper, and its task is then nobody's."""
    if item is None or item["state"] in TERMINAL:
        return False
    return item.get("task_arn") in (task_arn, None)


def check_attempt(item: dict, attempt: int) -> None:
    """A call for an attempt that is over (late, replayed, or from a superseded run) changes nothing."""
    current = int(item["attempt"])
    if attempt != current:
        raise AttemptMismatch(
            f"attempt {attempt} of job {item['job_key']} is not its current attempt {current}"
        )


def ran(item: dict) -> bool:
    """Whether the record shows that its task ran (a stopped task that never did failed its job)."""
    return (
        bool(item.get("started_at"))
        or item["state"] == JobState.RUNNING
        or item.get("last_status") in ("RUNNING", "DEACTIVATING")
    )


def is_ours(snapshot: TaskSnapshot) -> bool:
    """A task we started: our `startedBy`, or (started before record keys) our `managed-by` tag."""
    return (
        record_key_from_started_by(snapshot.started_by) is not None
        or snapshot.tags.get("managed-by") == "fargate-ci"
    )


def present(**fields: Any) -> dict:
    """The fields that have a value (DynamoDB stores no None)."""
    return {k: v for k, v in fields.items() if v is not None}
