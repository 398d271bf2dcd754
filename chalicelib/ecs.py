"""The one place that talks to ECS and EC2. Turns their errors into the orchestrator's."""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable
from typing import Any

from botocore.exceptions import ClientError, ReadTimeoutError
from botocore.exceptions import ConnectionError as BotoConnectionError

from chalicelib import clock
from chalicelib.errors import NoCapacity, TaskNotFound, TaskStartFailed, Throttled
from chalicelib.jobs import JobRequest, started_by
from chalicelib.settings import Settings
from chalicelib.tasks import TaskSnapshot, snapshot_from_ecs

MANAGED_BY = ("managed-by", "fargate-ci")
POOL_TAG = "gitlab-ci:pool"  # on a warm pool task (its job is only known once one claims it)
POOL_WATCHDOG_MARGIN = 300  # seconds an idle pool task's watchdog waits beyond the pool's max age
# Retries of one ECS call stop being started after this long. With the client's timeouts (factory: connect
# 2 s, read 10 s) one call takes at most 12 s, so an ECS call ends within ~20 s and POST /jobs (at most two
# RunTasks only when the first answered "no capacity" at once) well within the API Lambda's 25 s.
RETRY_BUDGET_SECONDS = 8.0


def backoff(attempt: int) -> float:
    """The pause before retry `attempt` + 1: exponential from 0.2 s, capped at 2 s, with +-50 % jitter."""
    return min(2.0, 0.1 * 2**attempt) * (0.5 + random.random())  # noqa: S311 (jitter, not crypto)


_RETRYABLE = {
    "ThrottlingException",
    "Throttling",
    "RequestLimitExceeded",
    "ServerException",
    "ServiceUnavailable",
}
# RunTask's words for "no capacity": Fargate answers "Capacity is unavailable at this time. Please try again
# later or in a different availability zone" (AWS re:Post knowledge-center/ecs-fargate-runtask-capacity),
# as a `failures[]` reason or an error message; container instances answer `RESOURCE:*`
# (ECS developer guide, api_failures_messages).
_CAPACITY_HINTS = ("capacity", "RESOURCE:")
ON_DEMAND = "FARGATE"
SPOT = "FARGATE_SPOT"


def client_token(record_key: str, attempt: int, launch_try: int = 0, provider: str = "") -> str:
    """RunTask's idempotency token: the same job attempt always asks for the same task. The record key names
    the owner too: another caller's token must never hand back this caller's task. A try after "no
    capacity" (no task was started) and the on-demand fallback of a Spot try get tokens of their own."""
    seed = f"{record_key}/{attempt}"
    if launch_try:
        seed += f"/{launch_try}"
    if provider:
        seed += f"/{provider}"
    return hashlib.sha256(seed.encode()).hexdigest()[:64]


def _no_capacity(message: str) -> bool:
    return any(hint.lower() in message.lower() for hint in _CAPACITY_HINTS)


def tag_value(value: str) -> str:
    """ECS tag values allow letters, digits, spaces and _ . : / = + - @ (256 chars)."""
    return "".join(c if c.isalnum() or c in " _.:/=+-@" else "_" for c in value)[:256]


class EcsTasks:
    """Starts, stops and describes our Fargate tasks."""

    def __init__(
        self,
        ecs_client: Any,
        ec2_client: Any,
        settings: Settings,
        *,
        attempts: int = 4,
        retry_budget: float = RETRY_BUDGET_SECONDS,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self._ecs = ecs_client
        self._ec2 = ec2_client
        self._settings = settings
        self._attempts = attempts
        self._retry_budget = retry_budget
        self._sleep = sleep
        self._monotonic = monotonic
        self._cluster_arn: str | None = None

    def cluster_arn(self) -> str:
        """Our cluster's full ARN (account and region): what an event's `clusterArn` must equal."""
        if self._cluster_arn is None:
            cluster = self._settings.cluster
            if not cluster.startswith("arn:"):
                meta = self._ecs.meta
                account = _caller_account(meta.region_name)
                cluster = f"arn:{meta.partition}:ecs:{meta.region_name}:{account}:cluster/{cluster}"
            self._cluster_arn = cluster
        return self._cluster_arn

    @property
    def uses_spot(self) -> bool:
        return any(c.provider == SPOT for c in self._settings.capacity_providers)

    def _call(self, operation: str, **params: Any) -> dict:
        """Call ECS, retrying throttling and server errors with jittered exponential backoff, but never
        starting a retry after `retry_budget` seconds: the API Lambda must answer (503, Retry-After) before
        API Gateway gives up on it."""
        started = self._monotonic()
        for attempt in range(1, self._attempts + 1):
            try:
                return getattr(self._ecs, operation)(**params)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code not in _RETRYABLE:
                    raise
                last: Exception = exc
                why = f"AWS is throttling ECS {operation}; retry shortly"
            except (BotoConnectionError, ReadTimeoutError) as exc:
                # A read timeout is ambiguous for RunTask (it may have started the task): retrying is safe,
                # the same clientToken hands back that very task.
                last, why = exc, f"ECS did not answer {operation}: {exc}"
            delay = backoff(attempt)
            if attempt == self._attempts or self._monotonic() - started + delay > self._retry_budget:
                raise Throttled(why, retry_after=2) from last
            self._sleep(delay)
        raise AssertionError("unreachable")

    def run(
        self,
        request: JobRequest | None,
        record_key: str,
        attempt: int,
        deadline: float,
        *,
        launch_try: int = 0,
        on_demand: bool = False,
    ) -> TaskSnapshot:
        """Start the job's task, or (`request` None) an idle task of the warm pool: the default task
        definition and size. `on_demand`: on FARGATE only, whatever the configured strategy (the fallback
        when Fargate Spot has no capacity). NoCapacity: no task was started for lack of capacity.

        Nothing secret goes into the overrides, tags or `startedBy` (DescribeTasks, events and CloudTrail
        show them): the task makes its own host key and learns which SSH CA to trust when it publishes it."""
        s = self._settings
        environment = []
        if s.orchestrator_url:
            environment.append({"name": "FARGATE_CI_API_URL", "value": s.orchestrator_url})
        if request is None:
            # An idle pool task waits for its job longer than the watchdog's first-connection limit.
            start_limit = s.warm_pool_max_age + POOL_WATCHDOG_MARGIN
            environment.append({"name": "WATCHDOG_START_SECONDS", "value": str(start_limit)})
        overrides: dict[str, Any] = {
            "containerOverrides": [{"name": s.container_name, "environment": environment}]
        }
        if request is not None and request.cpu is not None:
            overrides["cpu"] = str(request.cpu)
            overrides["memory"] = str(request.memory)
        if request is None:
            tags = [(POOL_TAG, "idle"), ("gitlab-ci:deadline", clock.iso(deadline)), MANAGED_BY]
        else:
            tags = [
                ("gitlab-ci:job-key", request.job_key),
                ("gitlab-ci:job-id", request.job_id),
                ("gitlab-ci:project-id", request.project_id),
                ("gitlab-ci:pipeline-id", request.pipeline_id),
                ("gitlab-ci:runner", request.runner),
                ("gitlab-ci:deadline", clock.iso(deadline)),
                MANAGED_BY,
            ]
        tags += list(s.extra_tags)
        params: dict[str, Any] = {
            "cluster": s.cluster,
            "taskDefinition": request.task_definition if request else s.default_task_definition,
            "count": 1,
            "startedBy": started_by(record_key),
            "clientToken": client_token(
                record_key, attempt, launch_try, ON_DEMAND if on_demand and self.uses_spot else ""
            ),
            "platformVersion": request.platform_version if request else s.platform_version,
            "networkConfiguration": {
                "awsvpcConfiguration": {
                    "subnets": list(s.subnets),
                    "securityGroups": list(s.security_groups),
                    "assignPublicIp": "ENABLED" if s.assign_public_ip else "DISABLED",
                }
            },
            "overrides": overrides,
            "tags": [{"key": k, "value": tag_value(v)} for k, v in tags],
            "propagateTags": "TASK_DEFINITION",
            "enableECSManagedTags": True,
        }
        if on_demand and self.uses_spot:
            params["capacityProviderStrategy"] = [{"capacityProvider": ON_DEMAND, "weight": 1, "base": 0}]
        elif s.capacity_providers:
            params["capacityProviderStrategy"] = [
                {"capacityProvider": c.provider, "weight": c.weight, "base": c.base}
                for c in s.capacity_providers
            ]
        else:
            params["launchType"] = s.launch_type
        try:
            response = self._call("run_task", **params)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            message = f"ECS RunTask refused: {error.get('Code')}: {error.get('Message')}"
            if _no_capacity(str(error.get("Message", ""))):
                raise NoCapacity(message, retry_after=30) from exc
            raise TaskStartFailed(message) from exc
        if response.get("failures"):
            failure = response["failures"][0]
            reason = failure.get("reason", "unknown")
            detail = failure.get("detail")
            message = f"ECS could not start the task: {reason}" + (f" ({detail})" if detail else "")
            if _no_capacity(reason):
                raise NoCapacity(message, retry_after=30)
            raise TaskStartFailed(message)
        if not response.get("tasks"):
            raise TaskStartFailed("ECS RunTask returned no task and no failure")
        return snapshot_from_ecs(response["tasks"][0], s.container_name)

    def stop(self, task_arn: str, reason: str) -> None:
        try:
            self._call("stop_task", cluster=self._settings.cluster, task=task_arn, reason=reason[:255])
        except ClientError as exc:
            message = exc.response.get("Error", {}).get("Message", "")
            if "not found" in message.lower():
                raise TaskNotFound(f"task {task_arn} is not known to ECS") from exc
            raise

    def describe(self, task_arns: list[str]) -> list[TaskSnapshot]:
        snapshots: list[TaskSnapshot] = []
        for start in range(0, len(task_arns), 100):  # DescribeTasks takes at most 100
            response = self._call(
                "describe_tasks",
                cluster=self._settings.cluster,
                tasks=task_arns[start : start + 100],
                include=["TAGS"],
            )
            snapshots += [
                snapshot_from_ecs(t, self._settings.container_name) for t in response.get("tasks", [])
            ]
        return snapshots

    def list_running(self, next_token: str | None = None) -> tuple[list[str], str | None]:
        params: dict[str, Any] = {
            "cluster": self._settings.cluster,
            "desiredStatus": "RUNNING",
            "maxResults": 100,
        }
        if next_token:
            params["nextToken"] = next_token
        response = self._call("list_tasks", **params)
        return response.get("taskArns", []), response.get("nextToken")

    # --- task definitions for per-job images (chalicelib.taskdefs) --------------------------------------

    def describe_task_definition(self, name: str) -> dict:
        """The task definition as registered (the default one is the base of per-job ones)."""
        try:
            return self._call("describe_task_definition", taskDefinition=name)["taskDefinition"]
        except ClientError as exc:
            error = exc.response.get("Error", {})
            raise TaskStartFailed(
                f"ECS DescribeTaskDefinition {name} refused: {error.get('Code')}: {error.get('Message')}"
            ) from exc

    def register_task_definition(self, params: dict) -> str:
        """RegisterTaskDefinition; returns the new revision's ARN. A refusal carries AWS's reason."""
        try:
            response = self._call("register_task_definition", **params)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            raise TaskStartFailed(
                f"ECS RegisterTaskDefinition refused: {error.get('Code')}: {error.get('Message')}"
            ) from exc
        return response["taskDefinition"]["taskDefinitionArn"]

    def deregister_task_definition(self, arn: str) -> None:
        try:
            self._call("deregister_task_definition", taskDefinition=arn)
        except ClientError as exc:
            message = exc.response.get("Error", {}).get("Message", "")
            if "inactive" not in message.lower() and "not found" not in message.lower():
                raise

    def public_address(self, eni_id: str) -> str | None:
        response = self._ec2.describe_network_interfaces(NetworkInterfaceIds=[eni_id])
        for interface in response.get("NetworkInterfaces", []):
            ip = interface.get("Association", {}).get("PublicIp")
            if ip:
                return ip
        return None


def _caller_account(region: str) -> str:
    # GetCallerIdentity needs no IAM permission; called once per process.
    import boto3

    return boto3.client("sts", region_name=region).get_caller_identity()["Account"]
