"""The job state machine: pure, shared by the API, the EventBridge handler and the reaper.

A job only ever moves forward. Every guarded write is an event of the transition table at the end: its
target state and the states it may come from, which the store puts into the write's DynamoDB condition, so
concurrent requests, out-of-order events and the reaper cannot move a job back.
"""

from __future__ import annotations

from dataclasses import dataclass
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


# -- The transition table ---------------------------------------------------------------------------------
# Every guarded write to a job record is one of these events. Its transition names the state the record
# takes (None: the state stays, the write changes other fields) and the states it may come from; the store
# turns `allowed_from` into the write's condition, next to the event's own guards (attempt, task, lease),
# which the writer names.

ANY = frozenset(JobState)
_STOPPABLE = frozenset(sources_for(JobState.STOPPING))


@dataclass(frozen=True)
class Transition:
    event: str
    target: JobState | None  # None: the state stays as it is
    allowed_from: frozenset[JobState]


# API: POST /jobs
START = Transition("start", JobState.PROVISIONING, frozenset())  # creates the record: none may exist yet
NEW_ATTEMPT = Transition("new attempt", JobState.PROVISIONING, TERMINAL)  # the runner's prepare retry
LEASE_TAKEN = Transition("launch lease taken over", None, ANY)  # a crashed launch is resumed
SPOT_FALLBACK = Transition("spot fallback", None, LIVE)  # capacity_note, before the FARGATE RunTask
NO_CAPACITY = Transition("no capacity", None, LIVE)  # a fresh clientToken for the next try
LAUNCH_THROTTLED = Transition("launch throttled", None, ANY)  # lease released for a retry at once
LAUNCHED = Transition("launched", None, LIVE)  # RunTask's task recorded
LAUNCH_FAILED = Transition("launch failed", JobState.FAILED, LIVE)  # RunTask refused, or cancelled first
CERTIFIED = Transition("certificate issued", None, LIVE)  # the job's client key certified for its task
# API: PUT /tasks/{task_id}/host-key (the task itself)
HOST_KEY_PUBLISHED = Transition("host key published", None, LIVE)  # first key wins
# The warm pool
POOL_CLAIMED = Transition("pool task claimed", None, LIVE - {JobState.STOPPING})
# API: DELETE and heartbeat
STOP_REQUESTED = Transition("stop requested", JobState.STOPPING, _STOPPABLE)
HEARTBEAT = Transition("heartbeat", None, LIVE)
# What ECS reports (events, DescribeTasks)
CHECKED = Transition("checked", None, ANY)  # DescribeTasks was asked (checked_at)
FINISHED_TASK_SEEN = Transition("finished job's task seen", None, TERMINAL)  # task_version of a late report
# Reaper
REAPED = Transition("reaped", JobState.STOPPING, _STOPPABLE - {JobState.STOPPING})  # never reaped twice
FAILED_STUCK = Transition("failed stuck", JobState.FAILED, LIVE)  # no task recorded in time
STOP_RETRIED = Transition("stop retried", None, LIVE)  # StopTask sent again (stop_retries)


def observed(target: JobState) -> Transition:
    """A task report (event or DescribeTasks) that means `target`: forward only, never out of a terminal
    state."""
    return Transition("observed", target, frozenset(sources_for(target)))


def warm_claimed(target: JobState) -> Transition:
    """A new job takes over a claimed warm pool task, in the state the task's record shows."""
    return Transition("warm task claimed", target, frozenset({JobState.PROVISIONING}))


def task_gone(ran: bool) -> Transition:
    """ECS no longer knows the task: a task that ran has STOPPED, one that never ran FAILED its job."""
    target = JobState.STOPPED if ran else JobState.FAILED
    return Transition("task gone", target, frozenset(sources_for(target)))


TRANSITIONS: tuple[Transition, ...] = (
    START,
    NEW_ATTEMPT,
    LEASE_TAKEN,
    SPOT_FALLBACK,
    NO_CAPACITY,
    LAUNCH_THROTTLED,
    LAUNCHED,
    LAUNCH_FAILED,
    CERTIFIED,
    HOST_KEY_PUBLISHED,
    POOL_CLAIMED,
    warm_claimed(JobState.PROVISIONING),
    warm_claimed(JobState.PENDING),
    warm_claimed(JobState.RUNNING),
    STOP_REQUESTED,
    HEARTBEAT,
    CHECKED,
    FINISHED_TASK_SEEN,
    REAPED,
    FAILED_STUCK,
    STOP_RETRIED,
    *(observed(s) for s in JobState),
    task_gone(True),
    task_gone(False),
)
