"""The scheduled reaper: whatever events missed, no task outlives its job.

`decide` is pure (a job record and the time in, an action out); `run_reaper` does bounded work per run
and reports what it did. A stop is always preceded by a conditional write that re-checks the reason on
the current record, so a job that heartbeats or finishes meanwhile is never reaped.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from boto3.dynamodb.conditions import Attr

from chalicelib import clock
from chalicelib.errors import StaleWrite
from chalicelib.jobs import record_key_from_started_by
from chalicelib.observability import count, logger
from chalicelib.schema import TABLE_KEY
from chalicelib.service import claims_task
from chalicelib.settings import Settings
from chalicelib.states import LIVE, TERMINAL, JobState

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
    if float(item["deadline"]) < now:
        return Action("stop", "CI job passed its deadline (job timeout plus grace)", "Deadline")
    heartbeat = clock.parse(item.get("heartbeat_at")) or now
    if item["state"] == JobState.RUNNING and now - heartbeat > settings.heartbeat_timeout:
        return Action("stop", "runner manager stopped sending heartbeats for this job", "HeartbeatLost")
    if now - last_seen > QUIET_AFTER:
        return Action("refresh", why="Refresh")
    return NOTHING


def _guard(action: Action, now: float, settings: Settings) -> Any:
    """The condition that must still hold on the record when the reaper acts."""
    if action.why == "Deadline":
        return Attr("deadline").lt(int(now))
    if action.why == "HeartbeatLost":
        return Attr("heartbeat_at").lt(clock.iso(now - settings.heartbeat_timeout))
    return Attr("task_arn").not_exists() & Attr("launch_lease_until").lt(int(now))


def run_reaper(service: Any, settings: Settings, *, budget: float = 50.0, now: float | None = None) -> dict:
    started = time.monotonic()
    now = clock.now() if now is None else now
    logger.remove_keys(["job_key", "task_arn"])
    report: Counter[str] = Counter()

    def in_budget() -> bool:
        return time.monotonic() - started < budget

    start_key = None
    while in_budget():
        jobs, start_key = service.store.live_jobs(limit=100, start_key=start_key)
        for item in jobs:
            if not in_budget():
                break
            report["jobs_checked"] += 1
            _act(service, item, decide(item, now, settings), now, settings, report)
        if not start_key:
            break

    _sweep_orphans(service, settings, in_budget, report)
    report["seconds"] = round(time.monotonic() - started, 3)  # type: ignore[assignment]
    logger.info("reaper finished", **report)
    return dict(report)


def _act(service: Any, item: dict, action: Action, now: float, settings: Settings, report: Counter) -> None:
    key = item[TABLE_KEY]
    if action.kind == "none":
        return
    if action.kind in ("refresh", "settle"):
        before = item["state"]
        after = (service.refresh if action.kind == "refresh" else service.settle_stopping)(item)["state"]
        if after != before:
            report["records_repaired"] += 1
        return
    live = [s.value for s in LIVE]
    try:
        if action.kind == "fail":
            service.store.update(
                key,
                set_fields=service.terminal_fields(
                    JobState.FAILED, stopped_reason=action.reason, stop_code="Reaped"
                ),
                remove=("live",),
                condition=Attr("state").is_in(live) & _guard(action, now, settings),
            )
            report["jobs_failed_stuck"] += 1
            count("JobsFailed", reason=action.why)
            return
        service.store.update(
            key,
            set_fields={
                "state": JobState.STOPPING.value,
                "stop_requested": action.reason,
                "reaped": action.why,
                "updated_at": clock.iso(now),
            },
            condition=Attr("state").is_in([s for s in live if s != JobState.STOPPING])
            & Attr("task_arn").eq(item["task_arn"])
            & Attr("stop_requested").not_exists()
            & _guard(action, now, settings),
        )
    except StaleWrite:
        report["skipped_changed_meanwhile"] += 1
        return
    service.stop_task(item["task_arn"], action.reason)
    report[f"tasks_stopped_{action.why}"] += 1
    count("TasksReaped", reason=action.why)
    logger.info("task reaped", job_key=item["job_key"], task_arn=item["task_arn"], reason=action.reason)


def _sweep_orphans(service: Any, settings: Settings, in_budget: Any, report: Counter) -> None:
    """Stop running tasks of ours that no live job record claims."""
    token = None
    while in_budget():
        arns, token = service.tasks.list_running(token)
        if arns:
            for snapshot in service.tasks.describe(arns):
                if snapshot.last_status == "STOPPED" or snapshot.desired_status == "STOPPED":
                    continue
                key = record_key_from_started_by(snapshot.started_by)
                if key is None and snapshot.tags.get("managed-by") != "fargate-ci":
                    continue  # not ours
                report["tasks_seen"] += 1
                item = service.store.get(key) if key else service.store.find_by_task(snapshot.task_arn)
                if claims_task(item, snapshot.task_arn):
                    continue
                service.stop_task(snapshot.task_arn, "no CI job claims this task")
                report["tasks_stopped_NoJobRecord"] += 1
                count("TasksReaped", reason="NoJobRecord")
        if not token:
            break
