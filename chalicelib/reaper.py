"""The scheduled reaper: whatever events missed, no task outlives its job.

`decide` is pure (a job record and the time in, an action out); `run_reaper` does bounded work per run
and reports what it did. It acts only through the service (the same transitions as the API and the
events): a stop is always preceded by a conditional write that re-checks the reason on the current record
(`_overdue`), so a job that heartbeats or finishes meanwhile is never reaped.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from chalicelib import clock
from chalicelib.errors import OrchestratorError
from chalicelib.jobs import is_pool_key
from chalicelib.observability import JOB_KEYS, count, for_job, logger
from chalicelib.record import is_ours
from chalicelib.schema import TABLE_KEY
from chalicelib.settings import Settings
from chalicelib.states import TERMINAL, JobState

if TYPE_CHECKING:
    from chalicelib.service import JobService

STUCK_AFTER = 300  # seconds a job may wait for its task to be recorded before it is failed
QUIET_AFTER = 120  # seconds without news of a live task before the reaper asks ECS itself
# Seconds without news of a task being stopped before the reaper asks ECS what became of it (its STOPPED
# event may be lost; ECS needs up to the container's stopTimeout, 30 s by default, plus deprovisioning).
STOPPING_QUIET_AFTER = 15


@dataclass(frozen=True)
class Action:
    kind: str  # "stop" | "fail" | "refresh" | "settle" | "none"
    reason: str = ""
    why: str = ""  # metric dimension


NOTHING = Action("none")


def decide(item: dict, now: float, settings: Settings) -> Action:
    if item["state"] in TERMINAL:
        return NOTHING
    if not item.get("task_arn"):
        lease = float(item.get("launch_lease_until", 0))
        created = clock.parse(item.get("created_at")) or now
        if now - created > STUCK_AFTER and lease < now:
            return Action("fail", "no task was started for this job", "StuckWithoutTask")
        return NOTHING
    last_seen = max(clock.parse(item.get("updated_at")) or 0, clock.parse(item.get("checked_at")) or 0)
    if item.get("stop_requested") or item["state"] == JobState.STOPPING:
        # Asked to stop already (by us or ECS): never a second reaping; end the job by what ECS says now.
        if now - last_seen > STOPPING_QUIET_AFTER:
            return Action("settle", why="Stopping")
        return NOTHING
    pool = is_pool_key(item.get(TABLE_KEY, ""))
    if float(item["deadline"]) < now:
        if pool:  # an idle warm pool task's deadline is its maximum age
            return Action("stop", "warm pool task reached WARM_POOL_MAX_AGE: recycled", "PoolRecycled")
        return Action("stop", "CI job passed its deadline (job timeout plus grace)", "Deadline")
    heartbeat = clock.parse(item.get("heartbeat_at")) or now
    # An idle pool task has no runner manager to send heartbeats.
    if not pool and item["state"] == JobState.RUNNING and now - heartbeat > settings.heartbeat_timeout:
        return Action("stop", "runner manager stopped sending heartbeats for this job", "HeartbeatLost")
    if now - last_seen > QUIET_AFTER:
        return Action("refresh", why="Refresh")
    return NOTHING


def _overdue(action: Action, now: float, settings: Settings) -> dict[str, Any]:
    """What must still be overdue on the current record when the reaper acts: each attribute below its
    value (a heartbeat or a recorded task meanwhile saves the job)."""
    if action.why in ("Deadline", "PoolRecycled"):
        return {"deadline": int(now)}
    if action.why == "HeartbeatLost":
        return {"heartbeat_at": clock.iso(now - settings.heartbeat_timeout)}
    return {"launch_lease_until": int(now)}


def run_reaper(
    service: JobService, settings: Settings, *, budget: float = 50.0, now: float | None = None
) -> dict:
    started = time.monotonic()
    now = clock.now() if now is None else now
    report: Counter[str] = Counter()

    def in_budget() -> bool:
        return time.monotonic() - started < budget

    start_key = None
    while in_budget():
        jobs, start_key = service.live_jobs(start_key)
        for item in jobs:
            if not in_budget():
                break
            report["jobs_checked"] += 1
            _act(service, item, decide(item, now, settings), now, settings, report)
        if not start_key:
            break

    logger.remove_keys(JOB_KEYS)
    _sweep_orphans(service, in_budget, report)
    if in_budget():
        try:
            report.update(service.refill_pool())
        except OrchestratorError as exc:  # ECS or DynamoDB trouble: the next run refills
            logger.warning("warm pool refill failed", error=exc.message)
    if in_budget():
        report["task_definitions_deregistered"] = service.deregister_unused_task_definitions(now)
    report["seconds"] = round(time.monotonic() - started, 3)  # type: ignore[assignment]
    logger.info("reaper finished", **report)
    return dict(report)


def _act(
    service: JobService, item: dict, action: Action, now: float, settings: Settings, report: Counter
) -> None:
    if action.kind == "none":
        return
    for_job(item[TABLE_KEY], item["job_key"], item.get("task_arn"))
    if action.kind in ("refresh", "settle"):
        before = item["state"]
        after = (service.refresh if action.kind == "refresh" else service.settle_stopping)(item)["state"]
        if after != before:
            report["records_repaired"] += 1
        return
    overdue = _overdue(action, now, settings)
    if action.kind == "fail":
        if not service.fail_stuck(item, action.reason, overdue=overdue):
            report["skipped_changed_meanwhile"] += 1
            return
        report["jobs_failed_stuck"] += 1
        count("JobsFailed", reason=action.why)
        return
    if not service.reap(item, action.reason, action.why, overdue=overdue, now=now):
        report["skipped_changed_meanwhile"] += 1
        return
    report[f"tasks_stopped_{action.why}"] += 1
    count("TasksReaped", reason=action.why)
    logger.info("task reaped", reason=action.reason)
    logger.remove_keys(JOB_KEYS)


def _sweep_orphans(service: JobService, in_budget: Callable[[], bool], report: Counter) -> None:
    """Stop running tasks of ours that no live job record claims."""
    token = None
    while in_budget():
        snapshots, token = service.running_tasks(token)
        for snapshot in snapshots:
            if snapshot.last_status == "STOPPED" or snapshot.desired_status == "STOPPED":
                continue
            if not is_ours(snapshot):
                continue
            report["tasks_seen"] += 1
            if service.stop_unclaimed(snapshot, "no CI job claims this task"):
                report["tasks_stopped_NoJobRecord"] += 1
                count("TasksReaped", reason="NoJobRecord")
        if not token:
            break
