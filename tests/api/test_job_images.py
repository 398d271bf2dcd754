"""POST /jobs with a job's own image and services, against moto: task definitions registered on the fly,
once per content, recorded in the table, refused images, AWS's refusals, and the reaper's deregistration."""

from __future__ import annotations

import json
import time

import pytest
from botocore.exceptions import ClientError

from chalicelib import ecs as ecs_module
from chalicelib import factory
from chalicelib.reaper import run_reaper
from chalicelib.schema import TABLE_KEY, TASK_DEFINITION_KEY
from sandbox.registry import serve
from tests.api.conftest import CLUSTER, job_body, post, tasks

IDLE = 3600


# What the registries hold (their configs' ExposedPorts): busybox exposes nothing, as Docker Hub's.
REGISTRY = {
    ("library/busybox", "*"): {"config": {"Cmd": ["sh"]}},
    ("ci", "db"): {"config": {"ExposedPorts": {"9187/tcp": {}, "5432/tcp": {}, "53/udp": {}}}},
    ("ci", "2"): {"config": {"ExposedPorts": {"80/tcp": {}}}},
}


def _resolve(repository: str, tag: str) -> dict | None:
    return REGISTRY.get((repository, tag)) or REGISTRY.get((repository, "*"))


@pytest.fixture
def registry():
    """Docker Hub and registry.example, as one real registry over HTTP (sandbox/registry.py)."""
    server = serve(_resolve)
    yield server
    server.shutdown()


@pytest.fixture
def images(aws, monkeypatch, registry):
    monkeypatch.setenv("FARGATE_ALLOWED_IMAGES", "busybox,registry.example/ci*,ghcr.io/acme/*")
    monkeypatch.setenv("JOB_TASK_DEFINITION_IDLE", str(IDLE))
    url = f"http://127.0.0.1:{registry.server_address[1]}"
    monkeypatch.setenv("REGISTRY_ENDPOINTS", f"docker.io={url},registry.example={url},ghcr.io={url}")
    factory.reset()
    yield aws
    factory.reset()


def lookups(registry) -> int:
    """How many image lookups the registry saw (each takes one anonymous token)."""
    return len(registry.RequestHandlerClass.tokens)


def task_definition_of(aws, task_arn: str) -> dict:
    task = aws.ecs.describe_tasks(cluster=CLUSTER, tasks=[task_arn])["tasks"][0]
    return aws.ecs.describe_task_definition(taskDefinition=task["taskDefinitionArn"])["taskDefinition"]


def family_records(aws) -> list[dict]:
    items = aws.table.scan()["Items"]
    return [i for i in items if i[TABLE_KEY].startswith("taskdef/")]


def test_a_job_image_gets_a_task_definition_of_its_own_and_the_next_job_reuses_it(client, images):
    body = {"name": "busybox:1.36", "entrypoint": [""]}
    services = [{"name": "registry.example/ci:2", "alias": "db", "command": ["serve"]}]
    first = post(client, job_body("1", image=body, services=services))
    assert first.status_code == 201, first.body
    second = post(client, job_body("2", image=body, services=services))
    assert second.status_code == 201, second.body

    arns = [json.loads(r.body)["task_arn"] for r in (first, second)]
    definitions = [task_definition_of(images, arn) for arn in arns]
    assert definitions[0]["taskDefinitionArn"] == definitions[1]["taskDefinitionArn"]
    family = definitions[0]["family"]
    assert family.startswith("ci-coordinator-job-")
    assert images.ecs.list_task_definitions(familyPrefix=family)["taskDefinitionArns"] == [
        definitions[0]["taskDefinitionArn"]
    ]
    definition = definitions[0]
    assert definition["pidMode"] == "task"
    containers = {c["name"]: c for c in definition["containerDefinitions"]}
    assert list(containers) == ["ci-coordinator", "job", "service-0"]
    # The default task definition's container stays the task's main one, and reaches into the job's.
    main = containers["ci-coordinator"]
    assert main["image"] == "registry.example/ci:1"
    assert main["linuxParameters"]["capabilities"]["add"] == ["SYS_PTRACE"]
    assert {"name": "CI_JOB_CONTAINER", "value": "job"} in main["environment"]
    assert {"name": "CI_SERVICE_HOSTS", "value": "db registry.example__ci registry.example-ci"} in main[
        "environment"
    ]
    assert containers["job"]["image"] == "docker.io/library/busybox:1.36"
    # `entrypoint: [""]`: no entrypoint, said the way ECS can (the command's program as the entrypoint).
    assert containers["job"]["entryPoint"] == ["/bin/sh", "-c"]
    assert containers["job"]["command"][-1] == "fargate-ci-job"
    assert containers["service-0"]["command"] == ["serve"] and not containers["service-0"]["essential"]

    [record] = family_records(images)
    assert record[TABLE_KEY] == TASK_DEFINITION_KEY.format(family=family)
    assert record["td_arn"] == definition["taskDefinitionArn"]
    assert record["live"] == "taskdef" and int(record["deadline"]) > time.time() + IDLE - 60


def test_a_job_without_an_image_uses_the_default_task_definition_as_before(client, images):
    response = post(client, job_body("3"))
    assert response.status_code == 201
    assert task_definition_of(images, json.loads(response.body)["task_arn"])["family"] == "ci-coordinator"
    assert family_records(images) == []


@pytest.mark.parametrize(
    ("field", "extra"),
    [
        ("image", {"image": {"name": "alpine:3.20"}}),
        ("services", {"image": "busybox", "services": [{"name": "postgres:16"}]}),
    ],
)
def test_an_image_outside_the_allowlist_is_refused_naming_the_patterns(client, images, field, extra):
    response = post(client, job_body("4", **extra))
    assert response.status_code == 400
    error = json.loads(response.body)
    assert error["field"] == field
    assert "is not allowed here" in error["message"]
    assert "busybox, registry.example/ci*, ghcr.io/acme/*" in error["message"]
    assert tasks(images) == [] and family_records(images) == []


def test_without_an_allowlist_no_job_may_choose_an_image(client, aws):
    response = post(client, job_body("5", image="busybox"))
    assert response.status_code == 400
    assert "none: this orchestrator runs no per-job images" in json.loads(response.body)["message"]


@pytest.mark.parametrize(
    "image",
    ["Busybox", "busybox:bad tag", {"name": "busybox", "user": "root"}, {"name": "busybox", "entrypoint": 7}],
)
def test_a_malformed_image_is_a_clear_400(client, images, image):
    response = post(client, job_body("6", image=image))
    assert response.status_code == 400
    assert json.loads(response.body)["field"] == "image"


def test_a_refused_registration_reaches_the_job_with_awss_reason_and_starts_nothing(
    client, images, monkeypatch
):
    reason = "Too many concurrent attempts to create a new revision of the specified family."

    real_call = ecs_module.EcsTasks._call

    def call(self, operation, **params):
        if operation == "register_task_definition":  # as ECS answers it (botocore's ClientException)
            raise ClientError(
                {"Error": {"Code": "ClientException", "Message": reason}}, "RegisterTaskDefinition"
            )
        return real_call(self, operation, **params)

    monkeypatch.setattr(ecs_module.EcsTasks, "_call", call)
    response = post(client, job_body("7", image="busybox"))
    assert response.status_code == 502
    error = json.loads(response.body)
    assert error["error"] == "TaskStartFailed" and reason in error["message"]
    assert tasks(images) == []


def test_a_registration_whose_registrant_died_is_taken_over(client, images):
    first = post(client, job_body("8", image="busybox:take-over"))
    family = task_definition_of(images, json.loads(first.body)["task_arn"])["family"]
    key = TASK_DEFINITION_KEY.format(family=family)
    # As if a request had claimed the registration and died before recording its revision.
    images.table.update_item(
        Key={TABLE_KEY: key},
        UpdateExpression="REMOVE td_arn SET lease_until = :past",
        ExpressionAttributeValues={":past": int(time.time()) - 1},
    )
    second = post(client, job_body("9", image="busybox:take-over"))
    assert second.status_code == 201, second.body
    record = images.table.get_item(Key={TABLE_KEY: key})["Item"]
    assert (
        record["td_arn"]
        == task_definition_of(images, json.loads(second.body)["task_arn"])["taskDefinitionArn"]
    )
    assert "lease_until" not in record


def test_the_reaper_deregisters_a_task_definition_unused_for_the_idle_time(client, images):
    response = post(client, job_body("10", image="busybox:old"))
    old = task_definition_of(images, json.loads(response.body)["task_arn"])
    later = time.time() + IDLE + 60
    fresh = post(client, job_body("11", image="busybox:fresh"))
    fresh_definition = task_definition_of(images, json.loads(fresh.body)["task_arn"])
    # The fresh one was used just before the reaper runs.
    images.table.update_item(
        Key={TABLE_KEY: TASK_DEFINITION_KEY.format(family=fresh_definition["family"])},
        UpdateExpression="SET deadline = :d",
        ExpressionAttributeValues={":d": int(later + IDLE)},
    )

    report = run_reaper(factory.job_service(), factory.current_settings(), now=later)

    assert report["task_definitions_deregistered"] == 1
    status = images.ecs.describe_task_definition(taskDefinition=old["taskDefinitionArn"])["taskDefinition"]
    assert status["status"] == "INACTIVE"
    kept = images.ecs.describe_task_definition(taskDefinition=fresh_definition["taskDefinitionArn"])
    assert kept["taskDefinition"]["status"] == "ACTIVE"
    assert [r["family"] for r in family_records(images)] == [fresh_definition["family"]]


def test_services_without_an_image_run_beside_a_job_container_of_the_task_image(client, images):
    response = post(client, job_body("12", services=["busybox"]))
    assert response.status_code == 201, response.body
    containers = {
        c["name"]: c
        for c in task_definition_of(images, json.loads(response.body)["task_arn"])["containerDefinitions"]
    }
    job = containers["job"]
    assert job["image"] == containers["ci-coordinator"]["image"] == "registry.example/ci:1"
    # Not the task image's entrypoint (it would start a second sshd, without the job's keys).
    assert job["entryPoint"] == ["/bin/sh", "-c"] and job["command"][-1] == "fargate-ci-job"
    assert containers["service-0"]["image"] == "docker.io/library/busybox:latest"


def environment_of(definition: dict) -> dict[str, str]:
    main = next(c for c in definition["containerDefinitions"] if c["name"] == "ci-coordinator")
    return {e["name"]: e["value"] for e in main["environment"]}


def test_a_service_waits_for_its_images_lowest_exposed_tcp_port_read_once_at_registration(
    client, images, registry
):
    services = [{"name": "registry.example/ci:db", "alias": "db"}]
    first = post(client, job_body("20", image="busybox", services=services))
    assert first.status_code == 201, first.body
    assert lookups(registry) == 1
    definition = task_definition_of(images, json.loads(first.body)["task_arn"])
    assert environment_of(definition)["CI_SERVICE_WAIT"] == "db:5432"  # not 9187, not 53/udp
    assert json.loads(first.body)["service_notes"] is None

    second = post(client, job_body("21", image="busybox", services=services))
    assert second.status_code == 201, second.body
    again = task_definition_of(images, json.loads(second.body)["task_arn"])
    assert again["taskDefinitionArn"] == definition["taskDefinitionArn"]
    assert lookups(registry) == 1  # the repeat uses the registered definition: no lookup


def test_healthcheck_tcp_port_wins_over_the_images_expose_and_needs_no_lookup(client, images, registry):
    services = [
        {"name": "registry.example/ci:db", "alias": "db", "variables": {"HEALTHCHECK_TCP_PORT": "6000"}}
    ]
    response = post(client, job_body("22", image="busybox", services=services))
    assert response.status_code == 201, response.body
    definition = task_definition_of(images, json.loads(response.body)["task_arn"])
    assert environment_of(definition)["CI_SERVICE_WAIT"] == "db:6000"
    assert lookups(registry) == 0


def test_a_service_whose_ports_are_unknown_is_not_waited_for_and_every_job_using_it_is_told_why(
    client, images, registry
):
    services = [
        {"name": "registry.example/ci:missing", "alias": "gone"},
        "busybox",
        {"name": "registry.example/ci:2", "alias": "web"},
    ]
    first = post(client, job_body("23", image="busybox", services=services))
    assert first.status_code == 201, first.body  # never a failed job
    definition = task_definition_of(images, json.loads(first.body)["task_arn"])
    assert environment_of(definition)["CI_SERVICE_WAIT"] == "web:80"
    host = f"127.0.0.1:{registry.server_address[1]}"
    expected = [
        f"Service gone (registry.example/ci:missing): its image's exposed ports are unknown ({host} has no "
        "registry.example/ci:missing); not waiting for it",
        "Service busybox (docker.io/library/busybox:latest): its image exposes no TCP port; "
        "not waiting for it",
    ]
    assert json.loads(first.body)["service_notes"] == expected
    second = post(client, job_body("24", image="busybox", services=services))
    assert json.loads(second.body)["service_notes"] == expected  # from the registration's record
    assert lookups(registry) == 3


def test_a_registry_that_cannot_be_reached_leaves_the_service_unwaited_for(client, images, monkeypatch):
    monkeypatch.setenv("REGISTRY_ENDPOINTS", "registry.example=http://127.0.0.1:9")  # nothing listens
    factory.reset()
    response = post(client, job_body("25", image="busybox", services=[{"name": "registry.example/ci:db"}]))
    assert response.status_code == 201, response.body
    definition = task_definition_of(images, json.loads(response.body)["task_arn"])
    assert "CI_SERVICE_WAIT" not in environment_of(definition)
    [note] = json.loads(response.body)["service_notes"]
    assert "connection refused" in note and "not waiting for it" in note
