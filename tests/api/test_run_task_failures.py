"""RunTask failures and throttling, surfaced as the API promises (botocore Stubber where moto cannot)."""

from __future__ import annotations

import json

import boto3
import pytest
from botocore.stub import ANY, Stubber

from chalicelib import factory
from chalicelib.ecs import EcsTasks, client_token
from chalicelib.jobs import record_key
from chalicelib.kms import KmsCa
from chalicelib.service import JobService
from chalicelib.settings import current_settings
from chalicelib.store import JobStore
from tests.api.conftest import OWNER, REGION, TABLE, job_body, post, table_key, tasks

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
    stubber.sleeps = []  # the back-off pauses EcsTasks took, instead of sleeping
    settings = current_settings()
    service = JobService(
        settings,
        JobStore(boto3.resource("dynamodb", region_name=REGION).Table(TABLE)),
        EcsTasks(ecs, aws.ec2, settings, sleep=stubber.sleeps.append),
        ca=KmsCa(aws.kms, settings.ca_key_ids),
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


# AWS's words when Fargate has no capacity (re:Post knowledge-center/ecs-fargate-runtask-capacity); RunTask
# answers it as a failure (Failure shape: arn, reason, detail), starting no task.
NO_CAPACITY = (
    "Capacity is unavailable at this time. Please try again later or in a different availability zone"
)
RUN_TASK_PARAMS = (
    "cluster",
    "taskDefinition",
    "count",
    "startedBy",
    "platformVersion",
    "networkConfiguration",
    "overrides",
    "tags",
    "propagateTags",
    "enableECSManagedTags",
)
SPOT_FIRST = [
    {"capacityProvider": "FARGATE_SPOT", "weight": 3, "base": 0},
    {"capacityProvider": "FARGATE", "weight": 1, "base": 0},
]
ON_DEMAND = [{"capacityProvider": "FARGATE", "weight": 1, "base": 0}]


def expect_run_task(stubbed, answer, strategy, token=ANY):
    """The next RunTask answers `answer` and must ask for `strategy` (with `token` when given)."""
    stubbed.add_response(
        "run_task",
        answer,
        {**dict.fromkeys(RUN_TASK_PARAMS, ANY), "clientToken": token, "capacityProviderStrategy": strategy},
    )


def no_capacity():
    return {"tasks": [], "failures": [{"arn": TASK["clusterArn"], "reason": NO_CAPACITY}]}


def running_on(provider):
    return {"tasks": [{**TASK, "capacityProviderName": provider}], "failures": []}


def test_spot_without_capacity_starts_the_job_on_fargate_in_the_same_request(client, aws, stubbed):
    key = record_key(OWNER, "t3sT_1234-5005")
    expect_run_task(stubbed, no_capacity(), SPOT_FIRST, client_token(key, 1))
    expect_run_task(stubbed, running_on("FARGATE"), ON_DEMAND, client_token(key, 1, 0, "FARGATE"))

    response = post(client, job_body())

    assert response.status_code == 201, response.body
    job = json.loads(response.body)
    assert job["task_arn"] == TASK["taskArn"]
    assert job["capacity_provider"] == "FARGATE"
    assert "Fargate Spot had no capacity" in job["capacity_note"]
    assert NO_CAPACITY in job["capacity_note"]
    stubbed.assert_no_pending_responses()


def test_a_repeat_after_the_fallback_asks_for_the_same_on_demand_task(client, aws, stubbed):
    key = record_key(OWNER, "t3sT_1234-5005")
    body = job_body()
    expect_run_task(stubbed, no_capacity(), SPOT_FIRST)
    for _ in range(4):  # the fallback's RunTask fails with the adapter's every retry: a 503
        stubbed.add_client_error("run_task", service_error_code="ServerException", http_status_code=500)
    assert post(client, body).status_code == 503

    # The driver repeats the request: straight to FARGATE, with the fallback's token (never a second task).
    expect_run_task(stubbed, running_on("FARGATE"), ON_DEMAND, client_token(key, 1, 0, "FARGATE"))
    again = post(client, body)

    assert again.status_code == 200, again.body
    assert json.loads(again.body)["capacity_provider"] == "FARGATE"
    stubbed.assert_no_pending_responses()


def test_no_capacity_anywhere_is_a_503_and_a_repeat_calls_run_task_again(client, aws, stubbed):
    key = record_key(OWNER, "t3sT_1234-5005")
    body = job_body()
    expect_run_task(stubbed, no_capacity(), SPOT_FIRST, client_token(key, 1))
    expect_run_task(stubbed, no_capacity(), ON_DEMAND, client_token(key, 1, 0, "FARGATE"))

    response = post(client, body)

    assert response.status_code == 503
    assert json.loads(response.body)["error"] == "NoCapacity"
    assert int(response.headers["Retry-After"]) > 0
    item = aws.table.get_item(Key=table_key("t3sT_1234-5005"))["Item"]
    assert item["state"] == "PROVISIONING" and "live" in item  # waiting for the repeat, not failed
    # The repeat tries Spot again with a fresh token (the failed one can only answer the same failure).
    expect_run_task(stubbed, running_on("FARGATE_SPOT"), SPOT_FIRST, client_token(key, 1, 1))
    again = post(client, body)
    assert again.status_code == 200, again.body
    assert json.loads(again.body)["capacity_provider"] == "FARGATE_SPOT"
    assert json.loads(again.body)["capacity_note"] is None
    stubbed.assert_no_pending_responses()


def test_no_capacity_as_an_error_is_a_capacity_shortage_too(client, stubbed):
    for strategy in (SPOT_FIRST, ON_DEMAND):
        stubbed.add_client_error(
            "run_task",
            service_error_code="InvalidParameterException",
            service_message=NO_CAPACITY,
            http_status_code=400,
            expected_params={
                **dict.fromkeys(RUN_TASK_PARAMS, ANY),
                "clientToken": ANY,
                "capacityProviderStrategy": strategy,
            },
        )

    response = post(client, job_body())

    assert response.status_code == 503
    assert json.loads(response.body)["error"] == "NoCapacity"
    stubbed.assert_no_pending_responses()


def test_throttling_is_retried_with_backoff(client, stubbed):
    for _ in range(2):
        stubbed.add_client_error("run_task", service_error_code="ThrottlingException", http_status_code=400)
    stubbed.add_response("run_task", {"tasks": [TASK], "failures": []})

    response = post(client, job_body())

    assert response.status_code == 201, response.body
    assert json.loads(response.body)["task_arn"] == TASK["taskArn"]
    stubbed.assert_no_pending_responses()
    # Two pauses, exponential from 0.2 s with +-50 % jitter: 0.1-0.3 s, then 0.2-0.6 s.
    first, second = stubbed.sleeps
    assert 0.1 <= first <= 0.3 and 0.2 <= second <= 0.6


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
