"""A task as ECS reports it, from DescribeTasks or from an "ECS Task State Change" event.

Both carry the same field names (the event's detail mirrors DescribeTasks), so one parser serves both. Where
they differ (tests/fixtures/aws/README.md): timestamps are datetimes from boto3 but ISO strings in events,
`cpu`/`memory` are strings in both, and the task's network attachment is `"ElasticNetworkInterface"` in
DescribeTasks but `"eni"` in events. Pure: no AWS here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from chalicelib import clock
from chalicelib.states import JobState, state_for_task


@dataclass(frozen=True)
class TaskSnapshot:
    task_arn: str
    cluster_arn: str
    last_status: str
    desired_status: str
    started_by: str | None
    version: int | None
    stop_code: str | None = None
    stopped_reason: str | None = None
    exit_code: int | None = None
    container_reason: str | None = None
    private_address: str | None = None
    eni_id: str | None = None
    capacity_provider: str | None = None
    cpu: int | None = None  # task-level size, as ECS reports it
    memory: int | None = None
    created_at: float | None = None
    started_at: float | None = None
    stopping_at: float | None = None
    stopped_at: float | None = None
    tags: dict[str, str] = field(default_factory=dict)
    # False when the report names no container of ours (AWS's notice example has none): exit code unknown.
    container_known: bool = True

    def job_state(self, *, started: bool = False) -> JobState:
        """The job state this task status means. `started`: we know from earlier that the task ran (a STOPPED
        report may lack `startedAt`)."""
        return state_for_task(
            self.last_status, stop_code=self.stop_code, started=started or self.started_at is not None
        )


def snapshot_from_ecs(task: dict, container_name: str) -> TaskSnapshot:
    """Parse a DescribeTasks task or an event's `detail`."""
    containers = task.get("containers") or []
    container = _container(containers, container_name)
    private_address, eni_id = _eni(task.get("attachments") or [])
    exit_code = container.get("exitCode")
    version = task.get("version")
    return TaskSnapshot(
        task_arn=task["taskArn"],
        cluster_arn=task.get("clusterArn", ""),
        last_status=task.get("lastStatus", "PROVISIONING"),
        desired_status=task.get("desiredStatus", "RUNNING"),
        started_by=task.get("startedBy"),
        version=int(version) if version is not None else None,
        stop_code=task.get("stopCode") or None,
        stopped_reason=task.get("stoppedReason") or None,
        exit_code=int(exit_code) if exit_code is not None else None,
        container_reason=container.get("reason") or None,
        private_address=private_address,
        eni_id=eni_id,
        capacity_provider=task.get("capacityProviderName") or task.get("launchType") or None,
        cpu=_int(task.get("cpu")),
        memory=_int(task.get("memory")),
        created_at=clock.parse(task.get("createdAt")),
        started_at=clock.parse(task.get("startedAt")),
        stopping_at=clock.parse(task.get("stoppingAt")),
        stopped_at=clock.parse(task.get("stoppedAt")),
        tags={t["key"]: t.get("value", "") for t in task.get("tags") or [] if "key" in t},
        container_known=bool(container),
    )


def _container(containers: list[dict], name: str) -> dict:
    """Our container; none of that name (FARGATE_CONTAINER_NAME misconfigured): nothing, not a sidecar's."""
    for container in containers:
        if container.get("name") == name:
            return container
    return {}


# DescribeTasks names the task's ENI attachment "ElasticNetworkInterface", events name it "eni".
_ENI_TYPES = ("ElasticNetworkInterface", "eni")


def _eni(attachments: list[dict]) -> tuple[str | None, str | None]:
    for attachment in attachments:
        if attachment.get("type") not in _ENI_TYPES:
            continue
        details = {d.get("name"): d.get("value") for d in attachment.get("details") or []}
        return details.get("privateIPv4Address"), details.get("networkInterfaceId")
    return None, None


def _int(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
