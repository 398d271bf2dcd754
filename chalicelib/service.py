"""The orchestrator's use cases: start, read, stop and heartbeat a job; apply what ECS reports.

Decisions live here and in `states`; AWS lives in the adapters (`store`, `ecs`) handed in.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from boto3.dynamodb.conditions import Attr

from chalicelib import clock
from chalicelib.ecs import EcsTasks
from chalicelib.errors import (
    AttemptMismatch,
    JobConflict,
    JobNotFound,
    NoCapacity,
    StaleWrite,
    TaskNotFound,
    TaskStartFailed,
    Throttled,
)
from chalicelib.jobs import JobRequest, record_key, record_key_from_started_by
from chalicelib.observability import count, logger, seconds
from chalicelib.schema import TABLE_KEY
from chalicelib.settings import Settings
from chalicelib.states import LIVE, TERMINAL, JobState, sources_for, statuses_up_to
from chalicelib.store import JobStore
from chalicelib.tasks import TaskSnapshot

# What belongs to one attempt's task: a new attempt starts without any of it.
_TASK_FIELDS = (
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
    "ssh_ready_seconds",
    "checked_at",
)


STOP_RETRIES = 3  # StopTask requests the reaper repeats for a task ECS still wants running

# What became of a task report (apply_snapshot).
APPLIED = "applied"
STALE = "stale"
UNKNOWN_TASK = "unknown-task"


def claims_task(item: dict | None, task_arn: str) -> bool:
    """Whether a job record stands for this task: it is the job's task, or the live job has not recorded its
    task yet (a launch in flight, or one whose answer was lost and that a retry will recover with the same
    clientToken). A job stuck that way is failed by the reaper, and its task is then nobody's."""
    if item is None or item["state"] in TERMINAL:
        return False
    return item.get("task_arn") in (task_arn, None)


def _check_attempt(item: dict, attempt: int) -> None:
    """A call for an attempt that is over (late, replayed, or from a superseded run) changes nothing."""
    current = int(item["attempt"])
    if attempt != current:
        raise AttemptMismatch(
            f"attempt {attempt} of job {item['job_key']} is not its current attempt {current}"
        )


def _ran(item: dict) -> bool:
    """Whether the record shows that its task ran (a stopped task that never did failed its job)."""
    return (
        bool(item.get("started_at"))
        or item["state"] == JobState.RUNNING
        or item.get("last_status") in ("RUNNING", "DEACTIVATING")
    )


def _present(**fields: Any) -> dict:
    return {k: v for k, v in fields.items() if v is not None}


class JobService:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        tasks: EcsTasks,
        *,
        now: Callable[[], float] = clock.now,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self._settings = settings
        self._store = store
        self._tasks = tasks
        self._now = now
        self._sleep = sleep

    # -- POST /jobs -------------------------------------------------------------------------------------

    def start(self, request: JobRequest, owner: str) -> tuple[dict, bool]:
        """Start the job's task once. Returns (job record, whether this call created the attempt)."""
        logger.append_keys(job_key=request.job_key)
        key = record_key(owner, request.job_key)
        item = self._new_attempt(request, owner, key, attempt=1)
        existing = self._store.create(item)
        if existing is None:
            logger.info("job created", attempt=1)
            return self._launch(item, request), True
        if existing.get("owner") != owner:
            # Two owners with one digest (jobs.record_key): not to be met in practice; never shared.
            raise JobConflict(f"job {request.job_key} cannot be recorded for this caller")
        if existing.get("request_hash") == request.request_hash:
            return self._resume(existing, request), False
        if existing["state"] in TERMINAL:
            # The runner retries prepare with a new key pair after cleaning up the failed attempt.
            attempt = int(existing["attempt"]) + 1
            fresh = self._new_attempt(request, owner, key, attempt=attempt)
            try:
                self._store.update(
                    key,
                    set_fields={k: v for k, v in fresh.items() if k != TABLE_KEY},
                    remove=(*(f for f in _TASK_FIELDS if f in existing), "expires_at"),
                    condition=Attr("attempt").eq(existing["attempt"])
                    & Attr("state").is_in([s.value for s in TERMINAL]),
                )
            except StaleWrite:
                raise Throttled(
                    "the job is being restarted by another request; retry", retry_after=1
                ) from None
            logger.info("job attempt started", attempt=attempt)
            return self._launch(fresh, request), True
        raise JobConflict(
            f"job {request.job_key} is already {existing['state']} with different parameters; "
            "stop it (cleanup) before starting it again"
        )

    def _new_attempt(self, request: JobRequest, owner: str, key: str, attempt: int) -> dict:
        now = self._now()
        s = self._settings
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

    def _resume(self, existing: dict, request: JobRequest) -> dict:
        """A repeat of the same request: answer with the same job, starting its task only if nobody did."""
        waited_until = self._now() + 5
        item = existing
        while not item.get("task_arn") and item["state"] not in TERMINAL:
            lease = int(item.get("launch_lease_until", 0))
            if lease <= self._now():
                # Whoever launched died between RunTask and recording it; the same clientToken makes
                # RunTask hand back that very task instead of starting a second one.
                try:
                    item = self._store.update(
                        item[TABLE_KEY],
                        set_fields={"launch_lease_until": int(self._now() + self._settings.launch_lease)},
                        condition=Attr("attempt").eq(item["attempt"])
                        & Attr("task_arn").not_exists()
                        & Attr("launch_lease_until").eq(lease),
                    )
                except StaleWrite:
                    item = self._store.get(item[TABLE_KEY]) or item
                    continue
                return self._launch(item, request)
            if self._now() >= waited_until:
                raise Throttled("the job's task is being started by another request; retry", retry_after=1)
            self._sleep(0.2)
            item = self._store.get(item[TABLE_KEY]) or item
        if item["state"] == JobState.FAILED and not item.get("task_arn"):
            raise TaskStartFailed(item.get("stopped_reason") or "the task could not be started")
        return item

    def _launch(self, item: dict, request: JobRequest) -> dict:
        key, attempt = item[TABLE_KEY], item["attempt"]
        launch_try = int(item.get("launch_try", 0))
        try:
            snapshot = self._run_task(item, request, launch_try)
        except TaskStartFailed as exc:
            count("TaskStartFailures", reason=type(exc).__name__)
            logger.warning("task start failed", reason=exc.message)
            self._fail_before_task(key, attempt, exc.message, stop_code="RunTaskFailed")
            raise
        except NoCapacity as exc:
            # No task was started: the job waits for a repeat of this request, which tries again with a
            # clientToken of its own (the same token could only hand back this failure).
            count("TaskStartFailures", reason="NoCapacity")
            logger.warning("no capacity for the task", reason=exc.message, launch_try=launch_try)
            with contextlib.suppress(StaleWrite):  # cancelled meanwhile: nothing to retry
                self._store.update(
                    key,
                    set_fields={"launch_try": launch_try + 1, "launch_lease_until": 0},
                    remove=("capacity_note",),
                    condition=Attr("attempt").eq(attempt)
                    & Attr("task_arn").not_exists()
                    & Attr("state").is_in([s.value for s in LIVE]),
                )
            raise
        except Throttled:
            # Leave the record for a retry to pick up at once (same clientToken: RunTask may have started it).
            self._store.update(
                key, set_fields={"launch_lease_until": 0}, condition=Attr("attempt").eq(attempt)
            )
            count("TaskStartFailures", reason="Throttled")
            raise
        except StaleWrite:
            return self._store.get(key) or item  # cancelled while Spot was refused: nothing was started
        logger.append_keys(task_arn=snapshot.task_arn)
        try:
            record = self._store.update(
                key,
                set_fields=_present(
                    task_arn=snapshot.task_arn,
                    last_status=snapshot.last_status,
                    updated_at=clock.iso(self._now()),
                    capacity_provider=snapshot.capacity_provider,
                    cpu=snapshot.cpu,  # the size ECS gives the task, also when the task definition chose it
                    memory=snapshot.memory,
                ),
                remove=("launch_lease_until",),
                condition=Attr("attempt").eq(attempt)
                & Attr("state").is_in([s.value for s in LIVE])
                & (Attr("task_arn").not_exists() | Attr("task_arn").eq(snapshot.task_arn)),
            )
        except StaleWrite:
            current = self._store.get(key) or {}
            if current.get("task_arn") == snapshot.task_arn:
                return current
            # Cancelled (or superseded) while RunTask ran: nobody will use this task.
            self._stop_quietly(snapshot.task_arn, "CI job was cancelled before its task started")
            return current
        count("TasksStarted")
        logger.info("task started", task_definition=request.task_definition, attempt=int(attempt))
        return record

    def _run_task(self, item: dict, request: JobRequest, launch_try: int) -> TaskSnapshot:
        """RunTask; when Fargate Spot has no capacity, the same job at once on FARGATE (on-demand). The
        fallback is recorded before its RunTask, so a repeat of the request asks for the same task."""
        key, attempt, deadline = item[TABLE_KEY], int(item["attempt"]), float(item["deadline"])
        on_demand = bool(item.get("capacity_note"))
        try:
            return self._tasks.run(
                request, key, attempt, deadline, launch_try=launch_try, on_demand=on_demand
            )
        except NoCapacity as exc:
            if on_demand or not self._tasks.uses_spot:
                raise
            note = f"Fargate Spot had no capacity ({exc.message}); starting the task on FARGATE instead"
        self._store.update(
            key,
            set_fields={"capacity_note": note[:500]},
            condition=Attr("attempt").eq(item["attempt"])
            & Attr("task_arn").not_exists()
            & Attr("state").is_in([s.value for s in LIVE]),
        )
        count("SpotFallbacks")
        logger.warning("no Spot capacity: falling back to FARGATE", launch_try=launch_try)
        return self._tasks.run(request, key, attempt, deadline, launch_try=launch_try, on_demand=True)

    def _fail_before_task(self, key: str, attempt: Any, reason: str, *, stop_code: str) -> dict | None:
        try:
            return self._store.update(
                key,
                set_fields=self._terminal_fields(JobState.FAILED, stopped_reason=reason, stop_code=stop_code),
                remove=("live", "launch_lease_until"),
                condition=Attr("attempt").eq(attempt)
                & Attr("task_arn").not_exists()
                & Attr("state").is_in([s.value for s in LIVE]),
            )
        except StaleWrite:
            return None

    def _terminal_fields(self, state: JobState, **fields: Any) -> dict:
        now = self._now()
        return {
            "state": state.value,
            "updated_at": clock.iso(now),
            "expires_at": int(now + self._settings.retention_days * 86400),
            **{k: v for k, v in fields.items() if v is not None},
        }

    # -- GET / DELETE / heartbeat ---------------------------------------------------------------------

    def load(self, job_key: str, owner: str) -> dict:
        """The caller's own record of the job; another caller's is never read, so never revealed."""
        logger.append_keys(job_key=job_key)
        item = self._store.get(record_key(owner, job_key))
        if item is None or item.get("owner") != owner:
            raise JobNotFound(f"no job {job_key}")
        if item.get("task_arn"):
            logger.append_keys(task_arn=item["task_arn"])
        return item

    def get(self, job_key: str, owner: str) -> dict:
        item = self.load(job_key, owner)
        if item["state"] in TERMINAL or not item.get("task_arn"):
            return item
        last_seen = max(clock.parse(item.get("updated_at")) or 0, clock.parse(item.get("checked_at")) or 0)
        if self._now() - last_seen < self._settings.refresh_after:
            return item
        return self.refresh(item)

    def refresh(self, item: dict) -> dict:
        """Bring a record up to date from DescribeTasks (events were late or lost)."""
        return self._refresh(item)[0]

    def _refresh(self, item: dict) -> tuple[dict, TaskSnapshot | None]:
        snapshots = self._tasks.describe([item["task_arn"]])
        if not snapshots:
            return self.mark_task_gone(item), None
        updated, _ = self.apply_snapshot(snapshots[0], item)
        with contextlib.suppress(StaleWrite):
            updated = self._store.update(
                item[TABLE_KEY],
                set_fields={"checked_at": clock.iso(self._now())},
                condition=Attr("task_arn").eq(item["task_arn"]),
            )
        return updated or item, snapshots[0]

    def settle_stopping(self, item: dict) -> dict:
        """For the reaper: a job whose task we asked to stop ends by what ECS says now, whether or not its
        STOPPED event arrives. If ECS still wants the task running (our StopTask was lost), ask again, at
        most STOP_RETRIES times."""
        updated, snapshot = self._refresh(item)
        if snapshot is None or updated["state"] in TERMINAL or snapshot.desired_status == "STOPPED":
            return updated
        retries = int(updated.get("stop_retries", 0))
        if retries >= STOP_RETRIES:
            logger.error("task still running after repeated stop requests", task_arn=item["task_arn"])
            count("TaskStopsIgnored")
            return updated
        try:
            updated = self._store.update(
                item[TABLE_KEY],
                set_fields={"stop_retries": retries + 1},
                condition=Attr("task_arn").eq(item["task_arn"])
                & Attr("state").is_in([s.value for s in LIVE])
                & (Attr("stop_retries").not_exists() | Attr("stop_retries").eq(retries)),
            )
        except StaleWrite:
            return self._store.get(item[TABLE_KEY]) or updated
        self._stop_quietly(item["task_arn"], str(updated.get("stop_requested") or "CI job is being stopped"))
        count("TasksStopped", reason="StopRetried")
        return updated

    def mark_task_gone(self, item: dict) -> dict:
        """ECS no longer knows the task: the job ends, keeping what we knew. A task that was running (or being
        stopped) has STOPPED; one that never ran FAILED the job."""
        ran = _ran(item) or item["state"] == JobState.STOPPING
        target = JobState.STOPPED if ran else JobState.FAILED
        try:
            return self._store.update(
                item[TABLE_KEY],
                set_fields=self._terminal_fields(
                    target,
                    last_status="STOPPED",
                    stopped_reason=item.get("stopped_reason") or "ECS no longer knows the task",
                ),
                remove=("live",),
                condition=Attr("task_arn").eq(item["task_arn"])
                & Attr("state").is_in([s.value for s in sources_for(target)]),
            )
        except StaleWrite:
            return self._store.get(item[TABLE_KEY]) or item

    def stop(self, job_key: str, owner: str, attempt: int, reason: str) -> dict:
        """Stop the task of this attempt of the job; any other attempt's is left alone (AttemptMismatch)."""
        item = self.load(job_key, owner)
        _check_attempt(item, attempt)
        if item["state"] in TERMINAL:
            return item
        reason = reason or "CI job finished"
        if not item.get("task_arn"):
            failed = self._fail_before_task(
                item[TABLE_KEY],
                item["attempt"],
                f"Cancelled before a task was started: {reason}",
                stop_code="UserInitiated",
            )
            if failed is not None:
                return failed
            item = self.load(job_key, owner)  # RunTask finished meanwhile: stop its task below
            _check_attempt(item, attempt)  # ... unless the attempt ended and a newer one began
            if not item.get("task_arn") or item["state"] in TERMINAL:
                return item
        self._stop_quietly(item["task_arn"], reason)
        count("TasksStopped", reason="JobCleanup")
        try:
            return self._store.update(
                item[TABLE_KEY],
                set_fields={
                    "state": JobState.STOPPING.value,
                    "stop_requested": reason[:255],
                    "updated_at": clock.iso(self._now()),
                },
                condition=Attr("task_arn").eq(item["task_arn"])
                & Attr("state").is_in([s.value for s in sources_for(JobState.STOPPING)]),
            )
        except StaleWrite:
            return self._store.get(item[TABLE_KEY]) or item

    def heartbeat(
        self, job_key: str, owner: str, attempt: int, *, ssh_ready_seconds: float | None = None
    ) -> dict:
        """The runner manager still drives this attempt. The first one after prepare says how long SSH
        took."""
        item = self.load(job_key, owner)
        _check_attempt(item, attempt)
        if item["state"] in TERMINAL:
            return item
        fields = {"heartbeat_at": clock.iso(self._now())}
        if ssh_ready_seconds is not None and "ssh_ready_seconds" not in item:
            fields["ssh_ready_seconds"] = Decimal(str(round(ssh_ready_seconds, 3)))
            seconds("SshReadyLatency", ssh_ready_seconds)
        try:
            return self._store.update(
                item[TABLE_KEY],
                set_fields=fields,
                condition=Attr("attempt").eq(item["attempt"]) & Attr("state").is_in([s.value for s in LIVE]),
            )
        except StaleWrite:
            current = self._store.get(item[TABLE_KEY]) or item
            _check_attempt(current, attempt)
            return current

    @property
    def store(self) -> JobStore:
        return self._store

    @property
    def tasks(self) -> EcsTasks:
        return self._tasks

    def terminal_fields(self, state: JobState, **fields: Any) -> dict:
        return self._terminal_fields(state, **fields)

    def stop_task(self, task_arn: str, reason: str) -> None:
        self._stop_quietly(task_arn, reason)

    def _stop_quietly(self, task_arn: str, reason: str) -> None:
        try:
            self._tasks.stop(task_arn, reason)
            logger.info("task stop requested", task_arn=task_arn, reason=reason)
        except TaskNotFound:
            logger.info("task already gone", task_arn=task_arn)

    # -- what ECS reports -----------------------------------------------------------------------------

    def apply_snapshot(self, snapshot: TaskSnapshot, item: dict | None = None) -> tuple[dict | None, str]:
        """Apply a task's state to its job. Returns (record, outcome): APPLIED, STALE (older than or the same
        as what the record shows) or UNKNOWN_TASK (no job stands for the task).

        Versioned reports are applied in ECS `version` order. Every report, versioned or not (AWS's own Spot
        termination notice example has no version), must not move `last_status` backwards in ECS's order,
        and one that would change nothing on the record is a duplicate."""
        if item is None:
            key = record_key_from_started_by(snapshot.started_by)
            item = self._store.get(key) if key else None
            if item is None or item.get("task_arn") != snapshot.task_arn:
                item = self._store.find_by_task(snapshot.task_arn) or item
        task_is_live = snapshot.last_status != "STOPPED" and snapshot.desired_status != "STOPPED"
        if item is None or item.get("task_arn") != snapshot.task_arn:
            # Events can beat RunTask's answer: a launch in flight has not recorded its task yet.
            if task_is_live and self._is_ours(snapshot) and not claims_task(item, snapshot.task_arn):
                self._stop_quietly(snapshot.task_arn, "no CI job claims this task")
                count("TasksReaped", reason="NoJobRecord")
            return item, UNKNOWN_TASK
        logger.append_keys(job_key=item["job_key"], task_arn=snapshot.task_arn)
        # A STOPPED report may lack startedAt; the record knows whether the task ran.
        target = snapshot.job_state(started=_ran(item))
        fields, cleared = self._snapshot_fields(snapshot, item, target)
        recorded = item.get("task_version")
        newer = snapshot.version is not None and (recorded is None or snapshot.version > int(recorded))
        updated, applied = item, False
        if snapshot.version is not None or self._changes(item, fields, cleared):
            condition = (
                Attr("task_arn").eq(snapshot.task_arn)
                & Attr("state").is_in([s.value for s in sources_for(target)])
                & (
                    Attr("last_status").not_exists()
                    | Attr("last_status").is_in(statuses_up_to(snapshot.last_status))
                )
            )
            if snapshot.version is not None:
                condition = condition & (
                    Attr("task_version").not_exists() | Attr("task_version").lt(snapshot.version)
                )
            try:
                updated = self._store.update(
                    item[TABLE_KEY],
                    set_fields=fields,
                    remove=(*cleared, "live") if target in TERMINAL else cleared,
                    condition=condition,
                )
                applied = True
                if target == JobState.RUNNING and item["state"] != JobState.RUNNING and snapshot.started_at:
                    started = snapshot.started_at - (clock.parse(item.get("created_at")) or 0)
                    seconds("TaskStartLatency", started)
            except StaleWrite:
                pass
        if item["state"] in TERMINAL and task_is_live and newer and self._note_version(item, snapshot):
            # A task that came up (a newer report than the record's) for a job already over. A job we only
            # asked to stop is left to ECS and to the reaper: late or duplicate reports stop nothing.
            self._stop_quietly(snapshot.task_arn, "CI job already finished or was cancelled")
            count("TasksReaped", reason="JobFinished")
        return updated, (APPLIED if applied else STALE)

    def _note_version(self, item: dict, snapshot: TaskSnapshot) -> bool:
        """Record a finished job's task's newer `version`: True for the one caller that did (acts once)."""
        try:
            self._store.update(
                item[TABLE_KEY],
                set_fields={"task_version": snapshot.version},
                condition=Attr("task_arn").eq(snapshot.task_arn)
                & Attr("state").is_in([s.value for s in TERMINAL])
                & (Attr("task_version").not_exists() | Attr("task_version").lt(snapshot.version)),
            )
        except StaleWrite:
            return False
        return True

    @staticmethod
    def _changes(item: dict, fields: dict, cleared: tuple[str, ...]) -> bool:
        """Whether a report without `version` tells the record anything new (else it is a duplicate)."""
        if cleared:
            return True
        return any(item.get(k) != v for k, v in fields.items() if k not in ("updated_at", "expires_at"))

    def _snapshot_fields(
        self, snapshot: TaskSnapshot, item: dict, target: JobState
    ) -> tuple[dict, tuple[str, ...]]:
        """What the record takes from a report, and which of its stop facts the report no longer shows."""
        fields: dict[str, Any] = {
            "state": target.value,
            "last_status": snapshot.last_status,
            "updated_at": clock.iso(self._now()),
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
            "address": self._address(snapshot, item),
        }
        fields.update({k: v for k, v in optional.items() if v is not None})
        cleared = tuple(k for k, v in stop_facts.items() if v is None and k in item)
        if target in TERMINAL:
            fields["expires_at"] = int(self._now() + self._settings.retention_days * 86400)
        return fields, cleared

    def _address(self, snapshot: TaskSnapshot, item: dict) -> str | None:
        if self._settings.address == "private":
            return snapshot.private_address
        if item.get("address") or not snapshot.eni_id or snapshot.last_status != "RUNNING":
            return None
        return self._tasks.public_address(snapshot.eni_id)

    @staticmethod
    def _is_ours(snapshot: TaskSnapshot) -> bool:
        return (
            record_key_from_started_by(snapshot.started_by) is not None
            or snapshot.tags.get("managed-by") == "fargate-ci"
        )
