"""The job state machine: pure, shared by the API, the EventBridge handler and the reaper.

A job only ever moves forward. Every writer asks `sources_for(target)` which states it may move from and
puts that into a DynamoDB condition, so concurrent requests and out-of-order events cannot move a job back.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    PROVISIONING = "PROVISIONING"
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"
    STOPPED = "STOPPED"  # the task ran and has stopped
    FAILED = "FAILED"  # the job never got a running task


TERMINAL = frozenset({JobState.STOPPED, JobState.FAILED})
LIVE = frozenset(JobState) - TERMINAL

_RANK = {
    JobState.PROVISIONING: 0,
    JobState.PENDING: 1,
    JobState.RUNNING: 2,
    JobState.STOPPING: 3,
    JobState.STOPPED: 4,
    JobState.FAILED: 4,
}

# ECS lastStatus → job state. ACTIVATING/DEACTIVATING are the ENI/load-balancer steps around RUNNING.
_FROM_ECS = {
    "PROVISIONING": JobState.PROVISIONING,
    "PENDING": JobState.PENDING,
    "ACTIVATING": JobState.PENDING,
    "RUNNING": JobState.RUNNING,
    "DEACTIVATING": JobState.STOPPING,
    "STOPPING": JobState.STOPPING,
    "DEPROVISIONING": JobState.STOPPING,
}


def can_move(source: JobState, target: JobState) -> bool:
    """True when a job in `source` may take `target`. Staying put (with new details) is allowed while live."""
    if source in TERMINAL:
        return False
    return _RANK[target] >= _RANK[source]


def sources_for(target: JobState) -> list[JobState]:
    """The states from which a job may move to `target`: what a conditional write must check."""
    return [s for s in JobState if can_move(s, target)]


def state_for_task(last_status: str, *, stop_code: str | None, started: bool) -> JobState:
    """What a task's ECS status means for its job.

    A stopped task that never started its container failed the job (image pull, capacity, cancelled
    early); one that ran has simply stopped.
    """
    if last_status == "STOPPED":
        if stop_code == "TaskFailedToStart" or not started:
            return JobState.FAILED
        return JobState.STOPPED
    try:
        return _FROM_ECS[last_status]
    except KeyError:
        raise ValueError(f"unknown ECS task status {last_status!r}") from None


# ECS's task lifecycle, in the order a task goes through it
# (https://docs.aws.amazon.com/AmazonECS/latest/developerguide/task-lifecycle-explanation.html).
ECS_STATUS_ORDER = (
    "PROVISIONING",
    "PENDING",
    "ACTIVATING",
    "RUNNING",
    "DEACTIVATING",
    "STOPPING",
    "DEPROVISIONING",
    "STOPPED",
)


def statuses_up_to(last_status: str) -> list[str]:
    """The ECS statuses a task may have had before (or still has at) `last_status`: a record showing one of
    them may take `last_status`; any other would move the task's status backwards."""
    if last_status not in ECS_STATUS_ORDER:
        raise ValueError(f"unknown ECS task status {last_status!r}")
    return list(ECS_STATUS_ORDER[: ECS_STATUS_ORDER.index(last_status) + 1])
