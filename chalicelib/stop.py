"""Stopping a job's task: DELETE /jobs (the runner's cleanup or a cancel) and the reaper's stops.

Every stop is first recorded by a conditional write (STOP_REQUESTED, REAPED), then StopTask; a job asked to
stop once is never reaped again, only settled by what ECS says (`settle_stopping`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from chalicelib import clock
from chalicelib.context import JobContext
from chalicelib.errors import StaleWrite
from chalicelib.jobs import record_key_from_started_by
from chalicelib.launch import fail_before_task
from chalicelib.observability import count, logger
from chalicelib.observe import refresh
from chalicelib.record import check_attempt, claims_task
from chalicelib.schema import TABLE_KEY
from chalicelib.states import FAILED_STUCK, REAPED, STOP_REQUESTED, STOP_RETRIED, TERMINAL
from chalicelib.tasks import TaskSnapshot

STOP_RETRIES = 3  # StopTask requests the reaper repeats for a task ECS still wants running


def stop(ctx: JobContext, job_key: str, owner: str, attempt: int, reason: str) -> dict:
    """Stop the task of this attempt of the job; any other attempt's is left alone (AttemptMismatch)."""
    item = ctx.load(job_key, owner)
    check_attempt(item, attempt)
    if item["state"] in TERMINAL:
        return item
    reason = reason or "CI job finished"
    if not item.get("task_arn"):
        failed = fail_before_task(
            ctx,
            item[TABLE_KEY],
            item["attempt"],
            f"Cancelled before a task was started: {reason}",
            stop_code="UserInitiated",
        )
        if failed is not None:
            return failed
        item = ctx.load(job_key, owner)  # RunTask finished meanwhile: stop its task below
        check_attempt(item, attempt)  # ... unless the attempt ended and a newer one began
        if not item.get("task_arn") or item["state"] in TERMINAL:
            return item
    ctx.stop_task(item["task_arn"], reason)
    count("TasksStopped", reason="JobCleanup")
    try:
        return ctx.store.transition(
            item[TABLE_KEY],
            STOP_REQUESTED,
            set_fields={"stop_requested": reason[:255], "updated_at": clock.iso(ctx.now())},
            equal={"task_arn": item["task_arn"]},
        )
    except StaleWrite:
        return ctx.reread(item)


def reap(
    ctx: JobContext, item: dict, reason: str, why: str, *, overdue: Mapping[str, Any], now: float
) -> bool:
    """The reaper stops a live job's task, if the job was not asked to stop yet and each `overdue` attribute
    is still below its value (the reason holds on the current record: a heartbeat meanwhile saves it).
    Returns whether it did."""
    try:
        ctx.store.transition(
            item[TABLE_KEY],
            REAPED,
            set_fields={"stop_requested": reason, "reaped": why, "updated_at": clock.iso(now)},
            remove=("pool",),  # a warm pool task being stopped is claimable no more
            equal={"task_arn": item["task_arn"]},
            absent=("stop_requested",),
            below=overdue,
        )
    except StaleWrite:
        return False
    ctx.stop_task(item["task_arn"], reason)
    return True


def fail_stuck(ctx: JobContext, item: dict, reason: str, *, overdue: Mapping[str, Any]) -> bool:
    """The reaper fails a live job that still has no task recorded and whose `overdue` attributes (its
    launch lease) are still below their values. Returns whether it did."""
    try:
        ctx.store.transition(
            item[TABLE_KEY],
            FAILED_STUCK,
            set_fields=ctx.terminal_fields(stopped_reason=reason, stop_code="Reaped"),
            remove=("live",),
            absent=("task_arn",),
            below=overdue,
        )
    except StaleWrite:
        return False
    return True


def settle_stopping(ctx: JobContext, item: dict) -> dict:
    """For the reaper: a job whose task we asked to stop ends by what ECS says now, whether or not its
    STOPPED event arrives. If ECS still wants the task running (our StopTask was lost), ask again, at most
    STOP_RETRIES times."""
    updated, snapshot = refresh(ctx, item)
    if snapshot is None or updated["state"] in TERMINAL or snapshot.desired_status == "STOPPED":
        return updated
    retries = int(updated.get("stop_retries", 0))
    if retries >= STOP_RETRIES:
        logger.error("task still running after repeated stop requests", task_arn=item["task_arn"])
        count("TaskStopsIgnored")
        return updated
    try:
        updated = ctx.store.transition(
            item[TABLE_KEY],
            STOP_RETRIED,
            set_fields={"stop_retries": retries + 1},
            equal={"task_arn": item["task_arn"]},
            absent_or_equal={"stop_retries": retries},
        )
    except StaleWrite:
        return ctx.store.get(item[TABLE_KEY]) or updated
    ctx.stop_task(item["task_arn"], str(updated.get("stop_requested") or "CI job is being stopped"))
    count("TasksStopped", reason="StopRetried")
    return updated


def stop_unclaimed(ctx: JobContext, snapshot: TaskSnapshot, reason: str) -> bool:
    """For the reaper's sweep: stop a running task of ours that no live job record claims, for `reason`.
    Returns whether it did."""
    item = ctx.record_of(record_key_from_started_by(snapshot.started_by), snapshot.task_arn)
    if claims_task(item, snapshot.task_arn):
        return False
    ctx.stop_task(snapshot.task_arn, reason)
    return True
