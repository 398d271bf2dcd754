"""The warm pool: `WARM_POOL_SIZE` idle tasks of the default task definition and size, started ahead of jobs.

A pool task has a record of its own (`pool/<slot>`, `startedBy gl-pool/<slot>`): `pool` is "warming" until the
task has published its host key, then "idle" (the sparse pool index lists both). A job whose request matches
(the default task definition, size and platform) claims an idle one with one conditional write on that record
(`pool` = idle, the task it saw, not being stopped): two jobs never get the same task. The pool record then
points at the job (`claimed_by`) and gives up its task (no `task_arn`, no `live`); events for the task
(startedBy still names the pool record, and cannot change) follow `claimed_by` to the job. A task serves
exactly one job. The pool is refilled after a claimed job's ready report and on the reaper's schedule,
recycles idle tasks after `WARM_POOL_MAX_AGE` (the pool record's `deadline`: the reaper stops it), and drains
when the size is 0.
"""

from __future__ import annotations

import random
import secrets
from typing import Any

from chalicelib import clock
from chalicelib.context import JobContext
from chalicelib.errors import NoCapacity, StaleWrite, TaskStartFailed, Throttled
from chalicelib.jobs import JobRequest, pool_key
from chalicelib.launch import fail_before_task, record_launched
from chalicelib.observability import count, logger
from chalicelib.record import present
from chalicelib.schema import TABLE_KEY
from chalicelib.settings import Settings
from chalicelib.states import POOL_CLAIMED, JobState, warm_claimed
from chalicelib.stop import reap

WARMING, IDLE = "warming", "idle"
OWNER = "warm-pool"  # never a caller's ARN: no API request can reach a pool record
CANDIDATES = 10  # idle records tried per claim (a lost race moves on to the next)
MAX_STARTS = 20  # tasks one refill starts (the next refill starts more)


def matches(settings: Settings, request: JobRequest) -> bool:
    """Whether a job can take a pool task: the default task definition, size and platform, and no image or
    services of its own (those run in a task definition of their own: design.md "Per-job images")."""
    return (
        settings.warm_pool_size > 0
        and request.task_definition == settings.default_task_definition
        and request.images is None
        and request.cpu is None
        and request.memory is None
        and request.platform_version == settings.platform_version
    )


def claim(ctx: JobContext, item: dict) -> dict | None:
    """Hand an idle pool task to the new job attempt `item` (PROVISIONING, no task yet). Returns the job's
    record, or None when no idle task could be claimed (the job starts cold)."""
    candidates = [c for c in ctx.store.pool_tasks(IDLE, limit=50) if c.get("task_arn") and c.get("host_key")]
    random.shuffle(candidates)  # concurrent claims spread over the pool instead of racing for one record
    now = ctx.now()
    for candidate in candidates[:CANDIDATES]:
        try:
            pool_item = ctx.store.transition(
                candidate[TABLE_KEY],
                POOL_CLAIMED,
                set_fields={
                    "claimed_by": item[TABLE_KEY],
                    "claimed_task": candidate["task_arn"],
                    "updated_at": clock.iso(now),
                    "expires_at": int(now + ctx.settings.retention_days * 86400),
                },
                remove=("pool", "live", "task_arn"),
                equal={"pool": IDLE, "task_arn": candidate["task_arn"]},
                absent=("stop_requested", "claimed_by"),
            )
        except StaleWrite:
            count("WarmClaimConflicts")
            continue
        return _hand_over(ctx, item, pool_item, candidate["task_arn"])
    count("WarmPoolMisses")
    return None


def _hand_over(ctx: JobContext, item: dict, pool_item: dict, task_arn: str) -> dict:
    fields = present(
        task_arn=task_arn,
        last_status=pool_item.get("last_status"),
        address=pool_item.get("address"),
        host_key=pool_item.get("host_key"),
        started_at=pool_item.get("started_at"),
        task_version=pool_item.get("task_version"),
        capacity_provider=pool_item.get("capacity_provider"),
        cpu=pool_item.get("cpu"),
        memory=pool_item.get("memory"),
        warm=True,
        pool_slot=pool_item[TABLE_KEY],
        updated_at=clock.iso(ctx.now()),
    )
    try:
        record = ctx.store.transition(
            item[TABLE_KEY],
            warm_claimed(JobState(pool_item["state"])),
            set_fields=fields,
            remove=("launch_lease_until",),
            equal={"attempt": item["attempt"]},
            absent=("task_arn",),
        )
    except StaleWrite:
        # Cancelled meanwhile: nobody will use the task (it served no job; never handed to another).
        ctx.stop_task(task_arn, "CI job was cancelled before its warm task was handed over")
        return ctx.reread(item)
    count("WarmTasksClaimed")
    logger.info("warm task claimed", task_arn=task_arn, pool_slot=pool_item[TABLE_KEY])
    return record


def refill(ctx: JobContext, *, at_most: int = MAX_STARTS) -> dict[str, int]:
    """Bring the pool to `WARM_POOL_SIZE`: start what is missing (at most `at_most`), stop what is too
    many (idle ones first; all when the size is 0). Concurrent refills may overshoot (each claimed job's
    ready report starts at most one task: never more than were claimed); the next refill trims."""
    size = ctx.settings.warm_pool_size
    members = [
        m
        for m in ctx.store.pool_tasks(WARMING) + ctx.store.pool_tasks(IDLE)
        if not m.get("stop_requested") and m["state"] not in (JobState.STOPPED, JobState.FAILED)
    ]
    report = {"pool_started": 0, "pool_drained": 0}
    extra = len(members) - size
    if extra > 0:
        # Idle before warming, oldest first; one still being launched (no task yet) is left to the reaper.
        members.sort(key=lambda m: (m.get("pool") != IDLE, m.get("created_at", "")))
        for member in [m for m in members if m.get("task_arn")][:extra]:
            reason = "warm pool drained (WARM_POOL_SIZE lowered)"
            if reap(ctx, member, reason, "PoolDrained", overdue={}, now=ctx.now()):
                report["pool_drained"] += 1
                count("TasksReaped", reason="PoolDrained")
    for _ in range(min(size - len(members), at_most)):
        if start_one(ctx) is None:
            break  # no capacity or throttled: the next refill tries again
        report["pool_started"] += 1
    if report["pool_started"] or report["pool_drained"]:
        logger.info("warm pool refilled", size=size, members=len(members), **report)
    return report


def start_one(ctx: JobContext) -> dict | None:
    """Start one idle pool task; its record first, as for a job. None when ECS did not start it."""
    s, now = ctx.settings, ctx.now()
    slot = secrets.token_hex(16)
    key = pool_key(slot)
    deadline = int(now + s.warm_pool_max_age)
    item: dict[str, Any] = {
        TABLE_KEY: key,
        "job_key": f"pool-{slot[:12]}",
        "attempt": 1,
        "state": JobState.PROVISIONING.value,
        "live": "1",
        "pool": WARMING,
        "owner": OWNER,
        "task_definition": s.default_task_definition,
        "platform_version": s.platform_version,
        "deadline": deadline,
        "created_at": clock.iso(now),
        "updated_at": clock.iso(now),
        "heartbeat_at": clock.iso(now),
        "launch_lease_until": int(now + s.launch_lease),
    }
    ctx.store.create_pool_task(item)
    try:
        snapshot = ctx.tasks.run(None, key, 1, deadline)
    except (TaskStartFailed, NoCapacity, Throttled) as exc:
        fail_before_task(ctx, key, 1, f"warm pool task not started: {exc.message}", stop_code="RunTaskFailed")
        count("TaskStartFailures", reason=type(exc).__name__)
        logger.warning("warm pool task not started", reason=exc.message)
        return None
    try:
        record = record_launched(ctx, key, 1, snapshot)
    except StaleWrite:
        ctx.stop_task(snapshot.task_arn, "warm pool task no longer wanted")
        return None
    count("TasksStarted", reason="WarmPool")
    logger.info("warm pool task started", task_arn=snapshot.task_arn, pool_slot=key)
    return record
