"""The orchestrator's use cases, as the edges call them: the API (`app.py`), the ECS event handler
(`events`) and the reaper (`reaper`). Each is one step of `launch`, `observe` or `stop`; the adapters
(`store`, `ecs`) are handed in, and every write they do is an event of `states`' transition table.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from chalicelib import clock, hostkeys, launch, observe, pool, stop
from chalicelib.context import JobContext
from chalicelib.jobs import JobRequest
from chalicelib.listing import ListQuery
from chalicelib.observability import logger
from chalicelib.settings import Settings
from chalicelib.tasks import TaskSnapshot

if TYPE_CHECKING:
    from chalicelib.ecs import EcsTasks
    from chalicelib.kms import KmsCa
    from chalicelib.registry import RegistryClient
    from chalicelib.store import JobStore


class JobService:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        tasks: EcsTasks,
        *,
        now: Callable[[], float] = clock.now,
        sleep: Callable[[float], None] = time.sleep,
        ca: KmsCa | None = None,
        registry: RegistryClient | None = None,
    ):
        self._ctx = JobContext(settings, store, tasks, now, sleep, ca, registry)

    # -- the API --------------------------------------------------------------------------------------

    def start(self, request: JobRequest, owner: str) -> tuple[dict, bool]:
        """POST /jobs: (job record, whether this call created the attempt). A matching job takes a warm pool
        task when one is idle."""
        claim = pool.claim if pool.matches(self._ctx.settings, request) else None
        return launch.start(self._ctx, request, owner, claim)

    def get(self, job_key: str, owner: str) -> dict:
        return observe.get(self._ctx, job_key, owner)

    def list(self, query: ListQuery) -> tuple[list[dict], dict | None]:
        """GET /jobs: one page of the caller's jobs (the query carries the owner's digest), newest first,
        and where the next page starts (None: this was the last)."""
        return self._ctx.store.jobs_of(
            query.owner_key,
            limit=query.limit,
            live=query.live,
            states=query.states,
            since=query.since,
            start_key=query.start_key,
        )

    def stop(self, job_key: str, owner: str, attempt: int, reason: str) -> dict:
        return stop.stop(self._ctx, job_key, owner, attempt, reason)

    def heartbeat(
        self, job_key: str, owner: str, attempt: int, *, ssh_ready_seconds: float | None = None
    ) -> dict:
        record = observe.heartbeat(self._ctx, job_key, owner, attempt, ssh_ready_seconds=ssh_ready_seconds)
        if ssh_ready_seconds is not None and record.get("warm"):
            # A claimed warm task is in use: replace it (after prepare, off the job's critical path). The
            # heartbeat is recorded whatever happens here; the reaper's refill makes up for a failed one.
            try:
                pool.refill(self._ctx, at_most=1)
            except Exception:  # noqa: BLE001
                logger.exception("warm pool refill after a claim failed")
        return record

    def publish_host_key(self, caller_arn: object, account: str | None, task_id: str, host_key: str) -> dict:
        """PUT /tasks/{task_id}/host-key, by the task itself: what its sshd must trust."""
        return hostkeys.publish(self._ctx, caller_arn, account, task_id, host_key)

    # -- ECS events -----------------------------------------------------------------------------------

    def cluster_arn(self) -> str:
        """Our cluster's full ARN: what an event's `clusterArn` must equal."""
        return self._ctx.tasks.cluster_arn()

    def apply_snapshot(self, snapshot: TaskSnapshot, item: dict | None = None) -> tuple[dict | None, str]:
        """(record, observe.APPLIED | STALE | UNKNOWN_TASK)."""
        return observe.apply_snapshot(self._ctx, snapshot, item)

    # -- the reaper -----------------------------------------------------------------------------------

    def live_jobs(self, start_key: dict | None = None) -> tuple[list[dict], dict | None]:
        """One page of the jobs that are not over, oldest deadline first."""
        return self._ctx.store.live_jobs(limit=100, start_key=start_key)

    def refresh(self, item: dict) -> dict:
        """The record brought up to date from DescribeTasks."""
        return observe.refresh(self._ctx, item)[0]

    def settle_stopping(self, item: dict) -> dict:
        return stop.settle_stopping(self._ctx, item)

    def reap(self, item: dict, reason: str, why: str, *, overdue: Mapping[str, Any], now: float) -> bool:
        return stop.reap(self._ctx, item, reason, why, overdue=overdue, now=now)

    def fail_stuck(self, item: dict, reason: str, *, overdue: Mapping[str, Any]) -> bool:
        return stop.fail_stuck(self._ctx, item, reason, overdue=overdue)

    def running_tasks(self, next_token: str | None = None) -> tuple[list[TaskSnapshot], str | None]:
        """One page of the cluster's running tasks (ours and others), as ECS describes them."""
        arns, token = self._ctx.tasks.list_running(next_token)
        return (self._ctx.tasks.describe(arns) if arns else []), token

    def deregister_unused_task_definitions(self, now: float) -> int:
        """Per-job task definitions unused for JOB_TASK_DEFINITION_IDLE: deregistered."""
        return launch.deregister_unused(self._ctx, now)

    def refill_pool(self) -> dict[str, int]:
        """Start or stop warm pool tasks to reach WARM_POOL_SIZE."""
        return pool.refill(self._ctx)

    def stop_unclaimed(self, snapshot: TaskSnapshot, reason: str) -> bool:
        return stop.stop_unclaimed(self._ctx, snapshot, reason)
