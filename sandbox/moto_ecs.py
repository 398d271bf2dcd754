"""The patches that put the data plane behind moto's ECS API (in this process only)."""

from __future__ import annotations

import json
import threading
from typing import Any

from sandbox.fargate import LIST_TASKS_PARAMS, ClientTokenConflict, DataPlane

# What RunTask answers when Fargate has no capacity
# (AWS re:Post, knowledge-center/ecs-fargate-runtask-capacity).
NO_CAPACITY = (
    "Capacity is unavailable at this time. Please try again later or in a different availability zone"
)


def install(plane: DataPlane) -> None:
    """Patch moto's ECS (in this process) so RunTask/StopTask/DescribeTasks go through the data plane."""
    from moto.core.responses import ActionResult
    from moto.ecs import models as ecs_models
    from moto.ecs import responses as ecs_responses
    from moto.ecs.exceptions import ECSException
    from moto.moto_api import state_manager

    # Keep moto's own state machine out of the way: the data plane moves lastStatus.
    state_manager.set_transition(
        model_name="ecs::task", transition={"progression": "manual", "times": 10**12}
    )
    ecs_models.random_private_ip = plane.next_address

    backend_cls = ecs_models.EC2ContainerServiceBackend
    original_run_task = backend_cls.run_task

    def run_task(self: Any, *args: Any, **kwargs: Any) -> list[Any]:
        return plane.run_task(original_run_task, self, args, kwargs)

    def stop_task(self: Any, cluster_str: str, task_str: str, reason: str) -> Any:
        return plane.stop_task(self, cluster_str, task_str, reason)

    original_list_tasks = backend_cls.list_tasks

    def list_tasks(self: Any, *args: Any, **kwargs: Any) -> list[Any]:
        # AWS lists RUNNING tasks unless asked for STOPPED ones; moto lists every task.
        params = dict(zip(LIST_TASKS_PARAMS, args, strict=False)) | kwargs
        params["desiredStatus"] = params.get("desiredStatus") or "RUNNING"
        return original_list_tasks(self, **params)

    backend_cls.run_task = run_task
    backend_cls.stop_task = stop_task
    backend_cls.list_tasks = list_tasks

    response_cls = ecs_responses.EC2ContainerServiceResponse
    original_run_task_response = response_cls.run_task
    original_describe_tasks = response_cls.describe_tasks
    token_lock = threading.Lock()

    def run_task_response(self: Any) -> Any:
        body = json.loads(self.body or "{}")
        if _on_spot(body) and plane.faults.take_kind(_job_id(body), "spot-no-capacity"):
            # No task is started; AWS answers 200 with the reason in failures[] (no arn documented for it).
            return ActionResult({"tasks": [], "failures": [{"reason": NO_CAPACITY}]})
        token = body.pop("clientToken", None)
        if not token:
            return original_run_task_response(self)
        if len(token) > 64:
            raise ECSException("InvalidParameterException", "clientToken must be at most 64 characters.")
        cluster = str(body.get("cluster", "default")).split("/")[-1]
        key = (self.current_account, self.region, f"{cluster}/{token}")
        fingerprint = json.dumps(body, sort_keys=True)

        def run() -> list[Any]:
            return original_run_task_response(self).result["tasks"]

        with token_lock:
            try:
                tasks = plane.run_task_idempotent(key, fingerprint, run)
            except ClientTokenConflict:
                raise ECSException(
                    "ConflictException",
                    "The request uses the same client token as a previous, but non-identical request.",
                ) from None
        return ActionResult({"tasks": tasks, "failures": []})

    def describe_tasks_response(self: Any) -> Any:
        result = original_describe_tasks(self)
        wanted = self._get_param("tasks", [])
        found = {task.id for task in result.result["tasks"]}
        cluster = self._get_param("cluster", "default").split("/")[-1]
        failures = []
        for ref in wanted:
            if ref.split("/")[-1] not in found:
                arn = (
                    ref
                    if ref.startswith("arn:")
                    else f"arn:aws:ecs:{self.region}:{self.current_account}:task/{cluster}/{ref}"
                )
                failures.append({"arn": arn, "reason": "MISSING"})
        return ActionResult({"tasks": result.result["tasks"], "failures": failures})

    response_cls.run_task = run_task_response
    response_cls.describe_tasks = describe_tasks_response


def _on_spot(body: dict) -> bool:
    """Whether moto places this RunTask's task on FARGATE_SPOT (it takes the strategy's first provider)."""
    strategy = body.get("capacityProviderStrategy") or []
    return bool(strategy) and strategy[0].get("capacityProvider") == "FARGATE_SPOT"


def _job_id(body: dict) -> str | None:
    for tag in body.get("tags") or []:
        if tag.get("key") == "gitlab-ci:job-id":
            return tag.get("value")
    return None
