"""The sandbox tells the truth: what its ECS answers and the events it puts on the bus have AWS's shape.

The sandbox's own moto ECS (sandbox.moto_ecs + the data plane) runs in this process with moto in-process;
only the container's process is a stand-in (no bwrap/sshd needed to check shapes). API answers are checked,
as raw JSON off the wire, against botocore's ECS service model; events against botocore's `Task` shape (an
event's detail mirrors DescribeTasks) and against AWS's published example (tests/fixtures/aws). The
deliberate differences are listed in sandbox/README.md ("How close to AWS").
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import boto3
import botocore.session
import pytest
from moto import mock_aws

from chalicelib.states import ECS_STATUS_ORDER
from sandbox.events import EventBus
from sandbox.faults import FaultRegistry, parse_fault
from sandbox.layout import CLUSTER, REGION, TASK_FAMILY, SandboxDir

AWS = Path(__file__).resolve().parents[1] / "fixtures" / "aws"
MODEL = botocore.session.get_session().get_service_model("ecs")
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3})?Z$")
# In AWS's example, not in the sandbox's events, on purpose (sandbox/README.md): no image registry.
NOT_EMULATED = {"imageDigest"}
# In events, not in DescribeTasks (AWS's example has it; botocore's Task shape does not).
EVENT_ONLY = {"updatedAt"}


def violations(shape: Any, value: Any, path: str, *, event: bool) -> list[str]:
    """Where `value` (JSON as sent) breaks botocore's `shape` (timestamps as events or the API send them)."""
    kind = shape.type_name
    if kind == "structure":
        if not isinstance(value, dict):
            return [f"{path}: {type(value).__name__}, not an object ({shape.name})"]
        found = []
        for key, item in value.items():
            if key not in shape.members:
                if not (event and shape.name == "Task" and key in EVENT_ONLY):
                    found.append(f"{path}.{key}: not a member of botocore's {shape.name}")
                continue
            found += violations(shape.members[key], item, f"{path}.{key}", event=event)
        return found
    if kind == "list":
        if not isinstance(value, list):
            return [f"{path}: not a list"]
        return [
            v
            for i, item in enumerate(value)
            for v in violations(shape.member, item, f"{path}[{i}]", event=event)
        ]
    if kind == "map":
        return [] if isinstance(value, dict) else [f"{path}: not an object"]
    if kind == "string":
        if not isinstance(value, str):
            return [f"{path}: {value!r} is not a string"]
        if shape.enum and value not in shape.enum:
            return [f"{path}: {value!r} is not one of {shape.enum}"]
        return []
    if kind in ("integer", "long"):
        return (
            []
            if isinstance(value, int) and not isinstance(value, bool)
            else [f"{path}: {value!r} not an int"]
        )
    if kind == "boolean":
        return [] if isinstance(value, bool) else [f"{path}: {value!r} is not a boolean"]
    if kind == "timestamp":
        if event:
            return (
                [] if isinstance(value, str) and ISO.match(value) else [f"{path}: {value!r} is not ISO 8601"]
            )
        return [] if isinstance(value, int | float) else [f"{path}: {value!r} is not epoch seconds"]
    if kind in ("double", "float"):
        return [] if isinstance(value, int | float) else [f"{path}: {value!r} is not a number"]
    return []


def json_types(value: Any) -> Any:
    """The JSON type of every field, recursively (lists by their first item)."""
    if isinstance(value, dict):
        return {k: json_types(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_types(value[0])] if value else []
    return type(value).__name__


class StandInContainer:
    """The container's main process: runs until terminated or killed."""

    def __init__(self) -> None:
        self.code: int | None = None
        self.done = threading.Event()

    def poll(self) -> int | None:
        return self.code

    def terminate(self) -> None:
        self.code = 143
        self.done.set()

    def kill(self) -> None:
        self.code = 137
        self.done.set()

    def wait(self, timeout: float | None = None) -> int | None:
        self.done.wait(timeout)
        return self.code


class StandInLauncher:
    def start(self, spec: Any) -> StandInContainer:
        return StandInContainer()

    def close(self) -> None:
        pass


@pytest.fixture
def sandbox_ecs(monkeypatch, tmp_path):
    """moto in-process with the sandbox's ECS patches (undone afterwards), its event bus collected."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "sandbox",
        "AWS_SECRET_ACCESS_KEY": "sandbox",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    from moto.ecs import models as ecs_models
    from moto.ecs import responses as ecs_responses

    from sandbox.fargate import DataPlane, PlaneConfig
    from sandbox.moto_ecs import install
    from sandbox.provision import provision

    backend, response = ecs_models.EC2ContainerServiceBackend, ecs_responses.EC2ContainerServiceResponse
    for owner, names in (
        (backend, ("run_task", "stop_task", "list_tasks")),
        (response, ("run_task", "describe_tasks")),
    ):
        for name in names:
            monkeypatch.setattr(owner, name, getattr(owner, name))
    monkeypatch.setattr(ecs_models, "random_private_ip", ecs_models.random_private_ip)

    events: list[dict] = []

    def put_events(entries: list[dict]) -> list[dict]:
        events.extend(json.loads(e["Detail"]) for e in entries)
        return [{"EventId": "x"} for _ in entries]

    with mock_aws():
        bus = EventBus(put_events)
        faults = FaultRegistry()
        sandbox_dir = SandboxDir.at(tmp_path)
        sandbox_dir.tasks.mkdir(parents=True, exist_ok=True)
        sandbox_dir.task_logs.mkdir(parents=True, exist_ok=True)
        plane = DataPlane(PlaneConfig(sandbox_dir, REGION, 0.05), faults, bus)
        plane.launcher = StandInLauncher()
        install(plane)
        resources = provision(boto3.Session(region_name=REGION), None, 42, 2222)
        ecs = boto3.client("ecs", region_name=REGION)
        answers: list[tuple[str, dict]] = []

        def keep_raw(http_response, model, **_):
            answers.append((model.name, json.loads(http_response.content or b"{}")))

        ecs.meta.events.register("after-call.ecs.*", keep_raw)
        try:
            yield type(
                "SandboxEcs",
                (),
                {
                    "ecs": ecs,
                    "events": events,
                    "answers": answers,
                    "faults": faults,
                    "resources": resources,
                    "bus": bus,
                },
            )
        finally:
            plane.close()
            bus.close()


def run_task(sandbox, job_id: str = "77", **extra) -> dict:
    r = sandbox.resources
    params = {
        "capacityProviderStrategy": [{"capacityProvider": "FARGATE_SPOT", "weight": 1, "base": 0}],
        "clientToken": f"token-{job_id}-{len(sandbox.answers)}",
        **extra,
    }
    return sandbox.ecs.run_task(
        cluster=CLUSTER,
        taskDefinition=TASK_FAMILY,
        count=1,
        startedBy=f"gl-t3sT1234-{job_id}",
        networkConfiguration={
            "awsvpcConfiguration": {"subnets": r.subnets, "securityGroups": [r.security_group]}
        },
        overrides={"containerOverrides": [{"name": "ci-coordinator", "environment": []}]},
        tags=[{"key": "gitlab-ci:job-id", "value": job_id}, {"key": "managed-by", "value": "fargate-ci"}],
        **params,
    )


def wait_for(sandbox, arn: str, status: str) -> dict:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        task = sandbox.ecs.describe_tasks(cluster=CLUSTER, tasks=[arn])["tasks"][0]
        if task["lastStatus"] == status:
            return task
        time.sleep(0.02)
    raise AssertionError(f"task never {status}")


def a_task_life(sandbox) -> str:
    arn = run_task(sandbox)["tasks"][0]["taskArn"]
    wait_for(sandbox, arn, "RUNNING")
    sandbox.ecs.stop_task(cluster=CLUSTER, task=arn, reason="CI job finished")
    wait_for(sandbox, arn, "STOPPED")
    sandbox.bus.close()  # every event delivered
    return arn


def test_the_sandboxs_ecs_answers_fit_botocores_model(sandbox_ecs):
    a_task_life(sandbox_ecs)
    sandbox_ecs.ecs.describe_tasks(cluster=CLUSTER, tasks=["0123456789abcdef0123456789abcdef"])

    seen = {name for name, _ in sandbox_ecs.answers}
    assert {"RunTask", "DescribeTasks", "StopTask"} <= seen
    for name, body in sandbox_ecs.answers:
        assert violations(MODEL.operation_model(name).output_shape, body, name, event=False) == []
    tasks = [t for name, body in sandbox_ecs.answers if name == "DescribeTasks" for t in body["tasks"]]
    assert {a["type"] for t in tasks for a in t.get("attachments", [])} == {"ElasticNetworkInterface"}
    assert all(isinstance(t["cpu"], str) and isinstance(t["memory"], str) for t in tasks)
    missing = [body for name, body in sandbox_ecs.answers if name == "DescribeTasks" and body["failures"]]
    assert missing[-1]["failures"][0]["reason"] == "MISSING"


def test_the_sandboxs_events_fit_botocores_task_shape_and_move_forward(sandbox_ecs):
    a_task_life(sandbox_ecs)
    details = sandbox_ecs.events

    for detail in details:
        assert violations(MODEL.shape_for("Task"), detail, detail["lastStatus"], event=True) == []
        assert {a["type"] for a in detail["attachments"]} == {"eni"}
    statuses = [ECS_STATUS_ORDER.index(d["lastStatus"]) for d in details]
    assert statuses == sorted(statuses)
    assert [d["lastStatus"] for d in details][-1] == "STOPPED"
    versions = [d["version"] for d in details]
    assert versions == sorted(set(versions))


def test_the_sandboxs_running_event_has_everything_awss_example_has_with_the_same_types(sandbox_ecs):
    a_task_life(sandbox_ecs)
    ours = next(d for d in sandbox_ecs.events if d["lastStatus"] == "RUNNING")
    theirs = json.loads((AWS / "task-state-change-running.json").read_text())["detail"]

    expected, actual = json_types(theirs), json_types(ours)
    assert set(expected) - set(actual) == set()
    for key in expected:
        if key in ("containers", "attachments"):
            want, have = expected[key][0], actual[key][0]
            assert set(want) - set(have) - NOT_EMULATED == set(), key
            assert {k: want[k] for k in want if k in have} == {k: have[k] for k in want if k in have}, key
        elif key != "overrides":
            assert actual[key] == expected[key], key


def test_spot_without_capacity_is_a_run_task_failure_as_aws_answers_it(sandbox_ecs):
    sandbox_ecs.faults.arm(parse_fault({"job_id": "78", "kind": "spot-no-capacity"}))

    refused = run_task(sandbox_ecs, job_id="78")
    on_demand = run_task(
        sandbox_ecs,
        job_id="78",
        capacityProviderStrategy=[{"capacityProvider": "FARGATE", "weight": 1, "base": 0}],
    )

    assert refused["tasks"] == []
    assert refused["failures"][0]["reason"].startswith("Capacity is unavailable at this time")
    output = MODEL.operation_model("RunTask").output_shape
    assert violations(output, sandbox_ecs.answers[0][1], "RunTask", event=False) == []
    assert on_demand["tasks"][0]["capacityProviderName"] == "FARGATE"


def test_the_versionless_spot_notice_looks_like_awss_and_comes_again_late(sandbox_ecs):
    sandbox_ecs.faults.arm(
        parse_fault({"job_id": "79", "kind": "spot", "after": 0.1, "notice": 0.1, "versionless": True})
    )
    arn = run_task(sandbox_ecs, job_id="79")["tasks"][0]["taskArn"]
    wait_for(sandbox_ecs, arn, "STOPPED")
    sandbox_ecs.bus.close()
    details = sandbox_ecs.events
    theirs = json.loads((AWS / "spot-termination-notice.json").read_text())["detail"]

    notices = [
        i for i, d in enumerate(details) if d.get("stopCode") == "TerminationNotice" and "version" not in d
    ]
    assert len(notices) == 2
    first = details[notices[0]]
    assert {k: first[k] for k in ("lastStatus", "desiredStatus", "stopCode", "stoppedReason")} == {
        k: theirs[k] for k in ("lastStatus", "desiredStatus", "stopCode", "stoppedReason")
    }
    assert details[notices[1] - 1]["lastStatus"] != "RUNNING"  # the repeat comes after the task moved on
    for detail in details:
        assert violations(MODEL.shape_for("Task"), detail, detail["lastStatus"], event=True) == []
    assert (details[-1]["lastStatus"], details[-1]["stopCode"]) == ("STOPPED", "SpotInterruption")
