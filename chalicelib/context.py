"""What every use case (launch, observe, stop) works with: settings, the two adapters, the clock, and the
few steps they share (read the caller's record, stop a task, the fields of a job that ends)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from chalicelib import clock
from chalicelib.errors import JobNotFound, TaskNotFound
from chalicelib.jobs import record_key
from chalicelib.observability import for_job, logger
from chalicelib.schema import TABLE_KEY
from chalicelib.settings import Settings

if TYPE_CHECKING:  # the adapters load boto3; the use cases only call them
    from chalicelib.ecs import EcsTasks
    from chalicelib.kms import KmsCa
    from chalicelib.registry import RegistryClient
    from chalicelib.store import JobStore


@dataclass(frozen=True)
class JobContext:
    settings: Settings
    store: JobStore
    tasks: EcsTasks
    now: Callable[[], float] = field(default=clock.now)
    sleep: Callable[[float], None] = field(default=time.sleep)
    ca: KmsCa | None = None  # the SSH user CA (KMS)
    registry: RegistryClient | None = None  # reads service images' EXPOSEd ports (None: not looked up)

    def load(self, job_key: str, owner: str) -> dict:
        """The caller's own record of the job; another caller's is never read, so never revealed."""
        key = record_key(owner, job_key)
        for_job(key, job_key)
        item = self.store.get(key)
        if item is None or item.get("owner") != owner:
            raise JobNotFound(f"no job {job_key}")
        if item.get("task_arn"):
            logger.append_keys(task_arn=item["task_arn"])
        return item

    def record_of(self, key: str | None, task_arn: str) -> dict | None:
        """The record that stands for a task: by its `startedBy` record key (a consistent read), following a
        claimed warm pool task's record to its job (`claimed_by`), else by the task index."""
        item = self.store.get(key) if key else None
        if item is not None and item.get("claimed_by"):
            item = self.store.get(item["claimed_by"])
        if item is None or item.get("task_arn") != task_arn:
            item = self.store.find_by_task(task_arn) or item
        return item

    def reread(self, item: dict) -> dict:
        """The record as it is now (after a write lost to a newer one), or `item` if it is gone."""
        return self.store.get(item[TABLE_KEY]) or item

    def stop_task(self, task_arn: str, reason: str) -> None:
        """StopTask; a task ECS no longer knows is stopped already."""
        try:
            self.tasks.stop(task_arn, reason)
            logger.info("task stop requested", task_arn=task_arn, reason=reason)
        except TaskNotFound:
            logger.info("task already gone", task_arn=task_arn)

    def terminal_fields(self, **fields: Any) -> dict:
        """What a record takes when its job ends (the transition sets the state): kept for a while, then
        expired by DynamoDB's TTL."""
        now = self.now()
        return {
            "updated_at": clock.iso(now),
            "expires_at": int(now + self.settings.retention_days * 86400),
            **{k: v for k, v in fields.items() if v is not None},
        }
