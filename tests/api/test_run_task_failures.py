"""RunTask failures and throttling, surfaced as the API promises (botocore Stubber where moto cannot)."""

from __future__ import annotations

import json

import boto3
import pytest
from botocore.stub import ANY, Stubber

from chalicelib import factory
from chalicelib.ecs import EcsTasks
from chalicelib.service import JobService
from chalicelib.settings import current_settings
from chalicelib.store import JobStore
from tests.api.conftest import REGION, TABLE, job_body, post, table_key, tasks

TASK = {
    "taskArn": "arn:aws:ecs:eu-west-1:123456789012:task/fargate-ci/0123456789abcdef",
    "clusterArn": "arn:aws:ecs:eu-west-1:123456789012:cluster/fargate-ci",
    "lastStatus": "PROVISIONING",
    "desiredStatus": "RUNNING",
    "startedBy": "gl-t3sT_1234-5005",
}


@pytest.fixture
def stubbed(aws):
    """The real service and table, with an ECS client whose answers the test scripts."""
    ecs = boto3.client("ecs", region_name=REGION)
    stubber = Stubber(ecs)
    settings = current_settings()
    service = JobService(
        settings,
        JobStore(boto3.resource("dynamodb", region_name=REGION).Table(TABLE)),
        EcsTasks(ecs, aws.ec2, settings, sleep=lambda _: None),
    )
    with pytest.MonkeyPatch.context() as patch, stubber:
        patch.setattr(factory, "job_service", lambda: service)
        yield stubber


def test_run_task_failures_become_a_clear_error_with_awss_reason(client, aws, stubbed):
    stubbed.add_response(
        "run_task",
        {"tasks": [], "failures": [{"arn": "arn:aws:ecs:x", "reason": "MISSING", "detail": "no image"}]},
        {
            **{
                k: ANY
                for k in (
                    "cluster",
                    "taskDefinition",
                    "count",
                    "startedBy",
                    "clientToken",
                    "platformVersion",
                    "networkConfiguration",
                    "overrides",
                    "tags",
                    "propagateTags",
                    "enableECSManagedTags",
                    "capacityProviderStrategy",
                )
            }
        },
    )
    body = job_body()

    response = post(client, body)

    assert response.status_code == 502
    error = json.loads(response.body)
    assert error["error"] == "TaskStartFailed"
    assert "MISSING" in error["message"] and "no image" in error["message"]
    item = aws.table.get_item(Key=table_key("t3sT_1234-5005"))["Item"]
    assert item["state"] == "FAILED"
    assert "MISSING" in item["stopped_reason"]
    # The same request again answers the same failure without a second RunTask (the stub has none left).
    assert post(client, body).status_code == 502


def test_no_capacity_is_a_503_with_retry_after(client, stubbed):
    stubbed.add_response(
        "run_task", {"tasks": [], "failures": [{"reason": "Capacity is unavailable at this time."}]}
    )

    response = post(client, job_body())

    assert response.status_code == 503
    assert json.loads(response.body)["error"] == "NoCapacity"
    assert int(response.headers["Retry-After"]) > 0


def test_throttling_is_retried_with_backoff(client, stubbed):
    for _ in range(2):
        stubbed.add_client_error("run_task", service_error_code="ThrottlingException", http_status_code=400)
    stubbed.add_response("run_task", {"tasks": [TASK], "failures": []})

    response = post(client, job_body())

    assert response.status_code == 201, response.body
    assert json.loads(response.body)["task_arn"] == TASK["taskArn"]
    stubbed.assert_no_pending_responses()


def test_persistent_throttling_is_a_503_with_retry_after_and_a_retry_can_start_the_job(client, stubbed):
    for _ in range(4):
        stubbed.add_client_error("run_task", service_error_code="ThrottlingException", http_status_code=400)
    body = job_body()

    response = post(client, body)

    assert response.status_code == 503
    assert json.loads(response.body)["error"] == "Throttled"
    assert response.headers["Retry-After"] == "2"
    stubbed.add_response("run_task", {"tasks": [TASK], "failures": []})
    again = post(client, body)
    assert again.status_code == 200
    assert json.loads(again.body)["task_arn"] == TASK["taskArn"]


def test_task_definition_unknown_to_ecs_is_reported_with_awss_words(client, aws):
    response = post(client, job_body(task_definition="ci-missing"))  # allowed, but never registered

    assert response.status_code == 502
    assert "RunTask refused" in json.loads(response.body)["message"]
    assert tasks(aws) == []
