"""POST /jobs: start a job's task once, whatever the retries, crashes, throttling or missing capacity.

The record is written first (PROVISIONING, with a launch lease), then RunTask with a clientToken of the
attempt (ecs.client_token), then the task is recorded. A repeat of the request answers the same job and
resumes a launch whose launcher died; a request after a finished attempt starts the next attempt.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

from chalicelib import clock
from chalicelib.context import JobContext
from chalicelib.errors import (
    JobConflict,
    NoCapacity,
    RegistryLookupFailed,
    StaleWrite,
    TaskStartFailed,
    Throttled,
)
from chalicelib.hostkeys import certify
from chalicelib.jobs import JobRequest, record_key
from chalicelib.observability import count, for_job, logger
from chalicelib.record import TASK_FIELDS, present
from chalicelib.schema import TABLE_KEY, TASK_DEFINITION_KEY, TASK_DEFINITION_LIVE
from chalicelib.states import (
    LAUNCH_FAILED,
    LAUNCH_THROTTLED,
    LAUNCHED,
    LEASE_TAKEN,
    NEW_ATTEMPT,
    NO_CAPACITY,
    SPOT_FALLBACK,
    TERMINAL,
    JobState,
)
from chalicelib.taskdefs import (
    ContainerImage,
    JobImages,
    healthcheck_port,
    service_waits,
    task_definition,
    with_service_waits,
)
from chalicelib.tasks import TaskSnapshot

REGISTRATION_LEASE = 20  # seconds a registration may take before another request takes it over
REGISTRATION_WAIT = 8.0  # how long a request waits for another's registration before answering 503
LOOKUP_WAIT = 5.0  # seconds for the service images' lookups at registration (each has 4: registry.py)


# Hands a new attempt (PROVISIONING, no task) a warm pool task: its record, or None to start cold.
Claim = Callable[[JobContext, dict], "dict | None"]


def start(ctx: JobContext, request: JobRequest, owner: str, claim: Claim | None = None) -> tuple[dict, bool]:
    """Start the job's task once (or take a warm one through `claim`) and certify the job's client key for
    it. Returns (job record, whether this call created the attempt). A certificate KMS could not sign yet is
    signed by a repeat of the request."""
    item, created = _start(ctx, request, owner, claim)
    return certify(ctx, item, request.ssh_public_key), created


def _first_task(ctx: JobContext, item: dict, request: JobRequest, claim: Claim | None) -> dict:
    """A new attempt's task: a warm one if `claim` hands one over, else RunTask (a cold start)."""
    if claim is not None:
        claimed = claim(ctx, item)
        if claimed is not None:
            return claimed
    return _launch(ctx, item, request)


def _start(ctx: JobContext, request: JobRequest, owner: str, claim: Claim | None) -> tuple[dict, bool]:
    key = record_key(owner, request.job_key)
    for_job(key, request.job_key)
    item = _new_attempt(ctx, request, owner, key, attempt=1)
    existing = ctx.store.create(item)  # the START event: no record of this key may exist
    if existing is None:
        logger.info("job created", attempt=1)
        return _first_task(ctx, item, request, claim), True
    if existing.get("owner") != owner:
        # Two owners with one digest (jobs.record_key): not to be met in practice; never shared.
        raise JobConflict(f"job {request.job_key} cannot be recorded for this caller")
    if existing.get("request_hash") == request.request_hash:
        return _resume(ctx, existing, request), False
    if existing["state"] in TERMINAL:
        # The runner retries prepare with a new key pair after cleaning up the failed attempt.
        attempt = int(existing["attempt"]) + 1
        fresh = _new_attempt(ctx, request, owner, key, attempt=attempt)
        try:
            ctx.store.transition(
                key,
                NEW_ATTEMPT,
                set_fields={k: v for k, v in fresh.items() if k != TABLE_KEY},
                remove=(*(f for f in TASK_FIELDS if f in existing), "expires_at"),
                equal={"attempt": existing["attempt"]},
            )
        except StaleWrite:
            raise Throttled("the job is being restarted by another request; retry", retry_after=1) from None
        logger.info("job attempt started", attempt=attempt)
        return _first_task(ctx, fresh, request, claim), True
    raise JobConflict(
        f"job {request.job_key} is already {existing['state']} with different parameters; "
        "stop it (cleanup) before starting it again"
    )


def fail_before_task(
    ctx: JobContext, key: str, attempt: object, reason: str, *, stop_code: str
) -> dict | None:
    """End an attempt that has no task (RunTask refused, or cancelled first); None if it has one by now or
    is over."""
    try:
        return ctx.store.transition(
            key,
            LAUNCH_FAILED,
            set_fields=ctx.terminal_fields(stopped_reason=reason, stop_code=stop_code),
            remove=("live", "launch_lease_until", "pool"),  # a warm pool task that never started
            equal={"attempt": attempt},
            absent=("task_arn",),
        )
    except StaleWrite:
        return None


def _new_attempt(ctx: JobContext, request: JobRequest, owner: str, key: str, attempt: int) -> dict:
    now = ctx.now()
    s = ctx.settings
    deadline = int(now + min(request.timeout_seconds, s.max_timeout) + s.grace_seconds)
    item = {
        TABLE_KEY: key,
        "job_key": request.job_key,
        "attempt": attempt,
        "state": JobState.PROVISIONING.value,
        "live": "1",
        "request_hash": request.request_hash,
        "owner": owner,
        "runner": request.runner,
        "job_id": request.job_id,
        "gitlab_url": request.gitlab_url,
        "project_id": request.project_id,
        "project_path": request.project_path,
        "pipeline_id": request.pipeline_id,
        "job_name": request.job_name,
        "task_definition": request.task_definition,
        "cpu": request.cpu,
        "memory": request.memory,
        "platform_version": request.platform_version,
        "timeout_seconds": request.timeout_seconds,
        "deadline": deadline,
        "created_at": clock.iso(now),
        "updated_at": clock.iso(now),
        "heartbeat_at": clock.iso(now),
        "launch_lease_until": int(now + s.launch_lease),
    }
    return {k: v for k, v in item.items() if v is not None and v != ""}


def _resume(ctx: JobContext, existing: dict, request: JobRequest) -> dict:
    """A repeat of the same request: answer with the same job, starting its task only if nobody did."""
    waited_until = ctx.now() + 5
    item = existing
    while not item.get("task_arn") and item["state"] not in TERMINAL:
        lease = int(item.get("launch_lease_until", 0))
        if lease <= ctx.now():
            # Whoever launched died between RunTask and recording it; the same clientToken makes
            # RunTask hand back that very task instead of starting a second one.
            try:
                item = ctx.store.transition(
                    item[TABLE_KEY],
                    LEASE_TAKEN,
                    set_fields={"launch_lease_until": int(ctx.now() + ctx.settings.launch_lease)},
                    equal={"attempt": item["attempt"]},
                    # A record without a lease (none was ever written) is as over as an expired one.
                    absent_or_equal={"launch_lease_until": lease},
                    absent=("task_arn",),
                )
            except StaleWrite:
                pass  # another repeat took it over meanwhile: wait for that one like any launch in flight
            else:
                return _launch(ctx, item, request)
        if ctx.now() >= waited_until:
            raise Throttled("the job's task is being started by another request; retry", retry_after=1)
        ctx.sleep(0.2)
        item = ctx.reread(item)
    if item["state"] == JobState.FAILED and not item.get("task_arn"):
        raise TaskStartFailed(item.get("stopped_reason") or "the task could not be started")
    return item


def _launch(ctx: JobContext, item: dict, request: JobRequest) -> dict:
    key, attempt = item[TABLE_KEY], item["attempt"]
    launch_try = int(item.get("launch_try", 0))
    try:
        snapshot, service_notes = _run_task(ctx, item, request, launch_try)
    except TaskStartFailed as exc:
        count("TaskStartFailures", reason=type(exc).__name__)
        logger.warning("task start failed", reason=exc.message)
        fail_before_task(ctx, key, attempt, exc.message, stop_code="RunTaskFailed")
        raise
    except NoCapacity as exc:
        # No task was started: the job waits for a repeat of this request, which tries again with a
        # clientToken of its own (the same token could only hand back this failure).
        count("TaskStartFailures", reason="NoCapacity")
        logger.warning("no capacity for the task", reason=exc.message, launch_try=launch_try)
        with contextlib.suppress(StaleWrite):  # cancelled meanwhile: nothing to retry
            ctx.store.transition(
                key,
                NO_CAPACITY,
                set_fields={"launch_try": launch_try + 1, "launch_lease_until": 0},
                remove=("capacity_note",),
                equal={"attempt": attempt},
                absent=("task_arn",),
            )
        raise
    except Throttled:
        # Leave the record for a retry to pick up at once (same clientToken: RunTask may have started it).
        ctx.store.transition(
            key, LAUNCH_THROTTLED, set_fields={"launch_lease_until": 0}, equal={"attempt": attempt}
        )
        count("TaskStartFailures", reason="Throttled")
        raise
    except StaleWrite:
        return ctx.store.get(key) or item  # cancelled while Spot was refused: nothing was started
    logger.append_keys(task_arn=snapshot.task_arn)
    try:
        record = record_launched(ctx, key, attempt, snapshot, service_notes=service_notes)
    except StaleWrite:
        current = ctx.store.get(key) or {}
        if current.get("task_arn") == snapshot.task_arn:
            return current
        # Cancelled (or superseded) while RunTask ran: nobody will use this task.
        ctx.stop_task(snapshot.task_arn, "CI job was cancelled before its task started")
        return current
    count("TasksStarted")
    logger.info("task started", task_definition=request.task_definition, attempt=int(attempt))
    return record


def record_launched(
    ctx: JobContext,
    key: str,
    attempt: object,
    snapshot: TaskSnapshot,
    *,
    service_notes: list[str] | None = None,
) -> dict:
    """The LAUNCHED event: the started task on its record (a job's, or a warm pool task's). StaleWrite if
    the attempt changed meanwhile or another task is recorded. `service_notes`: the services the job cannot
    wait for, and why (the driver prints them in the job log)."""
    return ctx.store.transition(
        key,
        LAUNCHED,
        set_fields=present(
            task_arn=snapshot.task_arn,
            last_status=snapshot.last_status,
            updated_at=clock.iso(ctx.now()),
            capacity_provider=snapshot.capacity_provider,
            cpu=snapshot.cpu,  # the size ECS gives the task, also when the task definition chose it
            memory=snapshot.memory,
            service_notes=service_notes or None,
        ),
        remove=("launch_lease_until",),
        equal={"attempt": attempt},
        absent_or_equal={"task_arn": snapshot.task_arn},
    )


def _run_task(
    ctx: JobContext, item: dict, request: JobRequest, launch_try: int
) -> tuple[TaskSnapshot, list[str]]:
    """RunTask; when Fargate Spot has no capacity, the same job at once on FARGATE (on-demand). The
    fallback is recorded before its RunTask, so a repeat of the request asks for the same task. Also
    returns the notes of a per-job task definition (services the job cannot wait for)."""
    key, attempt, deadline = item[TABLE_KEY], int(item["attempt"]), float(item["deadline"])
    on_demand = bool(item.get("capacity_note"))
    notes: list[str] = []
    if request.images is not None:
        arn, notes = job_task_definition(ctx, request)
        request = dataclasses.replace(request, task_definition=arn)
    try:
        run = ctx.tasks.run(request, key, attempt, deadline, launch_try=launch_try, on_demand=on_demand)
        return run, notes
    except NoCapacity as exc:
        if on_demand or not ctx.tasks.uses_spot:
            raise
        note = f"Fargate Spot had no capacity ({exc.message}); starting the task on FARGATE instead"
    ctx.store.transition(
        key,
        SPOT_FALLBACK,
        set_fields={"capacity_note": note[:500]},
        equal={"attempt": item["attempt"]},
        absent=("task_arn",),
    )
    count("SpotFallbacks")
    logger.warning("no Spot capacity: falling back to FARGATE", launch_try=launch_try)
    return ctx.tasks.run(request, key, attempt, deadline, launch_try=launch_try, on_demand=True), notes


def job_task_definition(ctx: JobContext, request: JobRequest) -> tuple[str, list[str]]:
    """The task definition for a job's own image and services (design.md "Per-job images"): registered once
    per distinct content (the family is its hash), recorded in the table first, so that concurrent jobs
    with the same image register it once; each use keeps it registered another
    JOB_TASK_DEFINITION_IDLE seconds (the reaper deregisters it after that). Returns its ARN and the notes
    of its registration (services whose port the job cannot wait for, and why)."""
    s = ctx.settings
    assert request.images is not None
    base = ctx.tasks.describe_task_definition(request.task_definition)
    params = task_definition(
        request.images,
        base,
        container_name=s.container_name,
        cpu=request.cpu,
        memory=request.memory,
        credentials_arn=s.repository_credentials,
    )
    family = params["family"]
    key = TASK_DEFINITION_KEY.format(family=family)
    waited_until = ctx.now() + REGISTRATION_WAIT
    record = ctx.store.get(key)
    while True:
        now = ctx.now()
        if record is not None and record.get("td_arn"):
            ctx.store.task_definition_used(key, int(now + s.task_definition_idle_seconds))
            return record["td_arn"], list(record.get("service_notes") or [])
        if record is None:
            record = ctx.store.claim_task_definition(
                {
                    TABLE_KEY: key,
                    "family": family,
                    "live": TASK_DEFINITION_LIVE,
                    "deadline": int(now + s.task_definition_idle_seconds),
                    "lease_until": int(now + REGISTRATION_LEASE),
                    "created_at": clock.iso(now),
                }
            )
            if record is None:
                return _register(ctx, key, params, request.images)
            continue
        lease = int(record.get("lease_until", 0))
        if lease <= now:  # its registrant died: take it over (one request wins the conditional write)
            try:
                ctx.store.take_over_registration(key, lease, int(now + REGISTRATION_LEASE))
            except StaleWrite:
                record = ctx.store.get(key)
                continue
            return _register(ctx, key, params, request.images)
        if now >= waited_until:
            raise Throttled(
                "the job's task definition is being registered by another request; retry", retry_after=1
            )
        ctx.sleep(0.2)
        record = ctx.store.get(key)


def _register(ctx: JobContext, key: str, params: dict, images: JobImages) -> tuple[str, list[str]]:
    params, notes = _exposed_port_waits(ctx, params, images)
    arn = ctx.tasks.register_task_definition(params)  # a refusal: TaskStartFailed with AWS's reason
    deadline = int(ctx.now() + ctx.settings.task_definition_idle_seconds)
    try:
        ctx.store.task_definition_registered(key, arn, deadline, service_notes=notes)
    except StaleWrite:
        # Someone took over meanwhile (we were slower than the lease) and recorded their revision: use it.
        record = ctx.store.get(key) or {}
        if record.get("td_arn"):
            return record["td_arn"], list(record.get("service_notes") or [])
        raise
    count("TaskDefinitionsRegistered")
    logger.info("task definition registered", family=params["family"], task_definition=arn)
    return arn, notes


def _exposed_port_waits(ctx: JobContext, params: dict, images: JobImages) -> tuple[dict, list[str]]:
    """The registration's parameters with the services' waits: a service without HEALTHCHECK_TCP_PORT is
    waited for on its image's first exposed TCP port, read from its registry now, once per task definition
    (GitLab's wait-for-service). An image whose config cannot be read, or that exposes no TCP port, is not
    waited for: a note says which and why (the job log shows it), never a failed job."""
    pending = [(n, s) for n, s in enumerate(images.services) if healthcheck_port(s) is None]
    registry, platform = ctx.registry, params.get("runtimePlatform")
    if not pending or registry is None:  # no registry adapter: tests of other parts build none
        return params, []

    def look_up(service: ContainerImage) -> tuple[int | None, str]:
        try:
            return registry.image_config(service.ref, platform).first_exposed_port(), ""
        except RegistryLookupFailed as exc:
            return None, exc.message[:300]
        except Exception as exc:  # noqa: BLE001 (the wait is a convenience: a fault here fails no job)
            logger.warning("service image lookup failed unexpectedly", error=repr(exc)[:300])
            return None, f"unexpected {type(exc).__name__}"

    # Side by side, each bounded by its own budget; a lookup stuck where no timeout reaches (a DNS answer)
    # is given up on, not waited for.
    pool = ThreadPoolExecutor(max_workers=len(pending))
    futures = [pool.submit(look_up, service) for _, service in pending]
    wait(futures, timeout=LOOKUP_WAIT)
    pool.shutdown(wait=False, cancel_futures=True)
    results = [f.result() if f.done() else (None, "no answer in time") for f in futures]
    exposed: dict[int, int | None] = {}
    notes = []
    for (n, service), (port, why) in zip(pending, results, strict=True):
        exposed[n] = port
        name = f"{service.aliases()[0]} ({service.ref.canonical})"
        if why:
            notes.append(f"Service {name}: its image's exposed ports are unknown ({why}); not waiting for it")
        elif port is None:
            notes.append(f"Service {name}: its image exposes no TCP port; not waiting for it")
        logger.info("service image looked up", image=service.ref.canonical, port=port, problem=why or None)
    waits = service_waits(images.services, exposed)
    return with_service_waits(params, waits, ctx.settings.container_name), notes


def deregister_unused(ctx: JobContext, now: float) -> int:
    """Deregister per-job task definitions no job used for JOB_TASK_DEFINITION_IDLE seconds; returns how
    many. A record a job touched meanwhile is kept (the delete is conditional on its deadline)."""
    done = 0
    for record in ctx.store.unused_task_definitions(int(now)):
        if not ctx.store.forget_task_definition(record[TABLE_KEY], int(record["deadline"])):
            continue
        if record.get("td_arn"):
            ctx.tasks.deregister_task_definition(record["td_arn"])
            logger.info("task definition deregistered", task_definition=record["td_arn"])
        done += 1
    return done
