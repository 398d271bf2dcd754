"""How jobs end when no task ever ran, and which tasks the orchestrator counts as its own: paths the
mutation run showed no fast test pinned (stop codes, the tag that marks our tasks, ECS already stopping)."""

from __future__ import annotations

import json
import time

from moto.ecs.models import ecs_backends

from chalicelib import clock, factory
from chalicelib.reaper import QUIET_AFTER, run_reaper
from tests.api.conftest import (
    ACCOUNT,
    CLUSTER,
    OWNER,
    REGION,
    delete,
    job_body,
    post,
    record,
    table_key,
)

HOUR = 3600


def reap(now: float) -> dict:
    return run_reaper(factory.job_service(), factory.current_settings(), now=now)


def launch_in_flight(aws, key: str) -> None:
    """A job whose RunTask has not answered yet: live, no task recorded, its launch lease running."""
    now = time.time()
    aws.table.put_item(
        Item={
            **table_key(key),
            "job_key": key,
            "attempt": 1,
            "state": "PROVISIONING",
            "live": "1",
            "owner": OWNER,
            "deadline": int(now + HOUR),
            "launch_lease_until": int(now + 30),
            "created_at": clock.iso(now),
            "updated_at": clock.iso(now),
        }
    )


def run_our_task(aws, *, tags: list[dict], started_by: str | None = None) -> str:
    settings = factory.current_settings()
    params = {
        "cluster": CLUSTER,
        "taskDefinition": "ci-coordinator",
        "launchType": "FARGATE",
        "networkConfiguration": {
            "awsvpcConfiguration": {
                "subnets": list(settings.subnets[:1]),
                "securityGroups": list(settings.security_groups),
            }
        },
        "tags": tags,
    }
    if started_by:
        params["startedBy"] = started_by
    return aws.ecs.run_task(**params)["tasks"][0]["taskArn"]


def last_status(aws, arn: str) -> str:
    return aws.ecs.describe_tasks(cluster=CLUSTER, tasks=[arn])["tasks"][0]["lastStatus"]


def test_a_job_cancelled_before_its_task_started_fails_as_user_initiated(client, aws, stops):
    launch_in_flight(aws, "t3sT_1234-7007")

    response = delete(client, "t3sT_1234-7007", reason="pipeline cancelled")

    assert response.status_code == 200, response.body
    item = record(aws, "t3sT_1234-7007")
    assert item["state"] == "FAILED"
    assert item["stop_code"] == "UserInitiated"
    assert item["stopped_reason"] == "Cancelled before a task was started: pipeline cancelled"
    assert "live" not in item and "launch_lease_until" not in item
    assert int(item["expires_at"]) > time.time()
    assert stops == []  # there was no task to stop


def test_a_task_that_could_not_start_fails_its_job_with_run_task_failed(client, aws):
    response = post(client, job_body(job_id="7008", task_definition="ci-missing"))  # allowed, not registered

    assert response.status_code == 502
    item = record(aws, "t3sT_1234-7008")
    assert item["state"] == "FAILED"
    assert item["stop_code"] == "RunTaskFailed"
    assert "RunTask refused" in item["stopped_reason"]
    assert "live" not in item


def test_a_running_task_tagged_as_ours_that_no_job_claims_is_swept(aws, stops):
    ours = run_our_task(aws, tags=[{"key": "managed-by", "value": "fargate-ci"}])
    foreign = run_our_task(aws, tags=[{"key": "managed-by", "value": "someone-else"}])

    report = reap(time.time() + 60)

    assert report["tasks_stopped_NoJobRecord"] == 1
    assert stops == [ours]
    assert last_status(aws, ours) == "STOPPED"
    assert last_status(aws, foreign) == "RUNNING"


def test_a_stopping_job_whose_task_ecs_is_already_stopping_is_not_stopped_again(client, aws, stops):
    job = json.loads(post(client, job_body(job_id="7009")).body)
    # ECS took our StopTask and is on its way (moto would jump to STOPPED at once): desired STOPPED, the task
    # still DEACTIVATING.
    task = ecs_backends[ACCOUNT][REGION].tasks[CLUSTER][job["task_arn"]]
    task.desired_status, task.last_status = "STOPPED", "DEACTIVATING"
    aws.table.update_item(
        Key=table_key(job["job_key"]),
        UpdateExpression="SET #s = :s, stop_requested = :r, updated_at = :u",
        ExpressionAttributeNames={"#s": "state"},
        ExpressionAttributeValues={":s": "STOPPING", ":r": "CI job finished", ":u": clock.iso(time.time())},
    )

    reap(time.time() + QUIET_AFTER + 60)

    assert stops == []
    item = record(aws, job["job_key"])
    assert "stop_retries" not in item
    assert (item["state"], item["last_status"]) == ("STOPPING", "DEACTIVATING")  # news taken, not ended
