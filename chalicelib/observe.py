"""What we learn about a job and apply to its record: ECS's reports (events, DescribeTasks), GET /jobs, and
the runner manager's heartbeats.

Reports are applied in ECS's order (`version`, and `last_status` never backwards) through the `observed`
transition, so a late or duplicate event cannot undo a newer one.
"""

from __future__ import annotations

import contextlib
from decimal import Decimal
from typing import Any

from chalicelib import clock
from chalicelib.context import JobContext
from chalicelib.errors import StaleWrite
from chalicelib.jobs import record_key_from_started_by
from chalicelib.observability import count, for_job, seconds
from chalicelib.record import check_attempt, claims_task, is_ours, ran
from chalicelib.schema import TABLE_KEY
from chalicelib.states import (
    CHECKED,
    FINISHED_TASK_SEEN,
    HEARTBEAT,
    TERMINAL,
    JobState,
    observed,
    statuses_up_to,
    task_gone,
)
from chalicelib.tasks import TaskSnapshot

# What became of a task report (apply_snapshot).
APPLIED = "applied"
STALE = "stale"
UNKNOWN_TASK = "unknown-task"


def get(ctx: JobContext, job_key: str, owner: str) -> dict:
    """GET /jobs/{job_key}: the caller's record, refreshed from DescribeTasks when it has been quiet."""
    item = ctx.load(job_key, owner)
    if item["state"] in TERMINAL or not item.get("task_arn"):
        return item
    last_seen = max(clock.parse(item.get("updated_at")) or 0, clock.parse(item.get("checked_at")) or 0)
    if ctx.now() - last_seen < ctx.settings.refresh_after:
        return item
    return refresh(ctx, item)[0]


def heartbeat(
    ctx: JobContext, job_key: str, owner: str, attempt: int, *, ssh_ready_seconds: float | None = None
) -> dict:
    """The runner manager still drives this attempt. The first one after prepare says how long SSH took."""
    item = ctx.load(job_key, owner)
    check_attempt(item, attempt)
    if item["state"] in TERMINAL:
        return item
    fields: dict[str, Any] = {"heartbeat_at": clock.iso(ctx.now())}
    if ssh_ready_seconds is not None and "ssh_ready_seconds" not in item:
        fields["ssh_ready_seconds"] = Decimal(str(round(ssh_ready_seconds, 3)))
        seconds("SshReadyLatency", ssh_ready_seconds)
    try:
        return ctx.store.transition(
            item[TABLE_KEY], HEARTBEAT, set_fields=fields, equal={"attempt": item["attempt"]}
        )
    except StaleWrite:
        current = ctx.reread(item)
        check_attempt(current, attempt)
        return current


def refresh(ctx: JobContext, item: dict) -> tuple[dict, TaskSnapshot | None]:
    """Bring a record up to date from DescribeTasks (events were late or lost). Returns the record and what
    ECS said (None: it no longer knows the task, and the job has ended)."""
    snapshots = ctx.tasks.describe([item["task_arn"]])
    if not snapshots:
        return end_task_gone(ctx, item), None
    updated, _ = apply_snapshot(ctx, snapshots[0], item)
    with contextlib.suppress(StaleWrite):
        updated = ctx.store.transition(
            item[TABLE_KEY],
            CHECKED,
            set_fields={"checked_at": clock.iso(ctx.now())},
            equal={"task_arn": item["task_arn"]},
        )
    return updated or item, snapshots[0]


def end_task_gone(ctx: JobContext, item: dict) -> dict:
    """ECS no longer knows the task: the job ends, keeping what we knew. A task that was running (or being
    stopped) has STOPPED; one that never ran FAILED the job."""
    try:
        return ctx.store.transition(
            item[TABLE_KEY],
            task_gone(ran(item) or item["state"] == JobState.STOPPING),
            set_fields=ctx.terminal_fields(
                last_status="STOPPED",
                stopped_reason=item.get("stopped_reason") or "ECS no longer knows the task",
            ),
            remove=("live",),
            equal={"task_arn": item["task_arn"]},
        )
    except StaleWrite:
        return ctx.reread(item)


def apply_snapshot(
    ctx: JobContext, snapshot: TaskSnapshot, item: dict | None = None
) -> tuple[dict | None, str]:
    """Apply a task's state to its job. Returns (record, outcome): APPLIED, STALE (older than or the same
    as what the record shows) or UNKNOWN_TASK (no job stands for the task).

    Versioned reports are applied in ECS `version` order. Every report, versioned or not (AWS's own Spot
    termination notice example has no version), must not move `last_status` backwards in ECS's order,
    and one that would change nothing on the record is a duplicate."""
    if item is None:
        item = ctx.record_of(record_key_from_started_by(snapshot.started_by), snapshot.task_arn)
    task_is_live = snapshot.last_status != "STOPPED" and snapshot.desired_status != "STOPPED"
    if item is None or item.get("task_arn") != snapshot.task_arn:
        # Events can beat RunTask's answer: a launch in flight has not recorded its task yet.
        if task_is_live and is_ours(snapshot) and not claims_task(item, snapshot.task_arn):
            ctx.stop_task(snapshot.task_arn, "no CI job claims this task")
            count("TasksReaped", reason="NoJobRecord")
        return item, UNKNOWN_TASK
    for_job(item[TABLE_KEY], item["job_key"], snapshot.task_arn)
    # A STOPPED report may lack startedAt; the record knows whether the task ran.
    target = snapshot.job_state(started=ran(item))
    fields, cleared = _snapshot_fields(ctx, snapshot, item, target)
    recorded = item.get("task_version")
    newer = snapshot.version is not None and (recorded is None or snapshot.version > int(recorded))
    updated, applied = item, False
    if snapshot.version is not None or _changes(item, fields, cleared):
        try:
            updated = ctx.store.transition(
                item[TABLE_KEY],
                observed(target),
                set_fields=fields,
                # A task that ended leaves the live index (and, a pool task, the pool).
                remove=(*cleared, "live", "pool") if target in TERMINAL else cleared,
                equal={"task_arn": snapshot.task_arn},
                absent_or_in={"last_status": statuses_up_to(snapshot.last_status)},
                absent_or_below={} if snapshot.version is None else {"task_version": snapshot.version},
            )
            applied = True
            if target == JobState.RUNNING and item["state"] != JobState.RUNNING and snapshot.started_at:
                started = snapshot.started_at - (clock.parse(item.get("created_at")) or 0)
                seconds("TaskStartLatency", started)
        except StaleWrite:
            pass
    if item["state"] in TERMINAL and task_is_live and newer and _note_version(ctx, item, snapshot):
        # A task that came up (a newer report than the record's) for a job already over. A job we only
        # asked to stop is left to ECS and to the reaper: late or duplicate reports stop nothing.
        ctx.stop_task(snapshot.task_arn, "CI job already finished or was cancelled")
        count("TasksReaped", reason="JobFinished")
    return updated, (APPLIED if applied else STALE)


def _note_version(ctx: JobContext, item: dict, snapshot: TaskSnapshot) -> bool:
    """Record a finished job's task's newer `version`: True for the one caller that did (acts once)."""
    try:
        ctx.store.transition(
            item[TABLE_KEY],
            FINISHED_TASK_SEEN,
            set_fields={"task_version": snapshot.version},
            equal={"task_arn": snapshot.task_arn},
            absent_or_below={"task_version": snapshot.version},
        )
    except StaleWrite:
        return False
    return True


def _changes(item: dict, fields: dict, cleared: tuple[str, ...]) -> bool:
    """Whether a report without `version` tells the record anything new (else it is a duplicate)."""
    if cleared:
        return True
    return any(item.get(k) != v for k, v in fields.items() if k not in ("updated_at", "expires_at"))


def _snapshot_fields(
    ctx: JobContext, snapshot: TaskSnapshot, item: dict, target: JobState
) -> tuple[dict, tuple[str, ...]]:
    """What the record takes from a report, and which of its stop facts the report no longer shows."""
    fields: dict[str, Any] = {
        "state": target.value,  # also set by the transition; here it tells a duplicate from news
        "last_status": snapshot.last_status,
        "updated_at": clock.iso(ctx.now()),
    }
    # ECS's current word on why the task stops: absent means none (a notice's stop code does not
    # outlive a later report without it). A report naming no container of ours says nothing about it.
    stop_facts = {"stop_code": snapshot.stop_code, "stopped_reason": snapshot.stopped_reason}
    if snapshot.container_known:
        stop_facts |= {"exit_code": snapshot.exit_code, "container_reason": snapshot.container_reason}
    optional = {
        **stop_facts,
        "task_version": snapshot.version,
        "capacity_provider": snapshot.capacity_provider,
        "started_at": clock.iso(snapshot.started_at) if snapshot.started_at else None,
        "stopping_at": clock.iso(snapshot.stopping_at) if snapshot.stopping_at else None,
        "stopped_at": clock.iso(snapshot.stopped_at) if snapshot.stopped_at else None,
        "address": _address(ctx, snapshot, item),
    }
    fields.update({k: v for k, v in optional.items() if v is not None})
    cleared = tuple(k for k, v in stop_facts.items() if v is None and k in item)
    if target in TERMINAL:
        fields["expires_at"] = int(ctx.now() + ctx.settings.retention_days * 86400)
    return fields, cleared


def _address(ctx: JobContext, snapshot: TaskSnapshot, item: dict) -> str | None:
    if ctx.settings.address == "private":
        return snapshot.private_address
    if item.get("address") or not snapshot.eni_id or snapshot.last_status != "RUNNING":
        return None
    return ctx.tasks.public_address(snapshot.eni_id)
