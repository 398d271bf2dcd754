"""ECS Task State Change events keep jobs current, in version order, and stop tasks nobody needs."""

from __future__ import annotations

import json

import pytest

from chalicelib.jobs import record_key
from tests.api.conftest import CLUSTER, OWNER, REGION, delete, job_body, post, table_key

CLUSTER_ARN = f"arn:aws:ecs:{REGION}:123456789012:cluster/{CLUSTER}"
STARTED_BY = "gl-" + record_key(OWNER, "t3sT_1234-5005")  # what RunTask got for OWNER's job


def task_event(task_arn: str, last_status: str, version: int, *, started_by: str = STARTED_BY, **detail):
    """An event in AWS's shape (aws-and-peers.md)."""
    body = {
        "clusterArn": detail.pop("cluster_arn", CLUSTER_ARN),
        "taskArn": task_arn,
        "taskDefinitionArn": f"arn:aws:ecs:{REGION}:123456789012:task-definition/ci-coordinator:1",
        "group": "family:ci-coordinator",
        "startedBy": started_by,
        "capacityProviderName": "FARGATE_SPOT",
        "lastStatus": last_status,
        "desiredStatus": "STOPPED" if last_status in ("STOPPING", "STOPPED", "DEPROVISIONING") else "RUNNING",
        "containers": [{"name": "ci-coordinator", "lastStatus": last_status, **detail.pop("container", {})}],
        "attachments": [
            {
                "type": "ElasticNetworkInterface",
                "status": "ATTACHED",
                "details": [
                    {"name": "networkInterfaceId", "value": "eni-1"},
                    {"name": "privateIPv4Address", "value": "10.9.1.77"},
                ],
            }
        ],
        "createdAt": "2026-11-29T20:00:00.000Z",
        "updatedAt": "2026-11-29T20:00:05.000Z",
        "version": version,
        **detail,
    }
    return {
        "version": "0",
        "id": f"evt-{version}",
        "detail-type": "ECS Task State Change",
        "source": "aws.ecs",
        "account": "123456789012",
        "time": "2026-11-29T20:00:05Z",
        "region": REGION,
        "resources": [task_arn],
        "detail": body,
    }


def deliver(client, event):
    client.lambda_.invoke("on_task_state_change", event)


def job(client, key="t3sT_1234-5005"):
    return json.loads(client.http.get(f"/jobs/{key}").body)


@pytest.fixture
def started(client, aws):
    return json.loads(post(client, job_body()).body)


def task_status(aws, arn):
    return aws.ecs.describe_tasks(cluster=CLUSTER, tasks=[arn])["tasks"][0]["lastStatus"]


def test_events_in_version_order_win_over_late_and_duplicate_ones(client, aws, started):
    arn = started["task_arn"]
    deliver(client, task_event(arn, "RUNNING", 3, startedAt="2026-11-29T20:00:30.000Z"))
    deliver(client, task_event(arn, "PENDING", 2))  # late
    deliver(client, task_event(arn, "RUNNING", 3, startedAt="2026-11-29T20:00:30.000Z"))  # duplicate

    running = job(client)
    assert running["state"] == "RUNNING"
    assert running["address"] == "10.9.1.77"
    assert running["capacity_provider"] == "FARGATE_SPOT"
    assert running["started_at"] == "2026-11-29T20:00:30.000Z"

    deliver(
        client,
        task_event(
            arn,
            "STOPPED",
            6,
            stopCode="EssentialContainerExited",
            stoppedReason="Essential container in task exited",
            startedAt="2026-11-29T20:00:30.000Z",
            stoppedAt="2026-11-29T20:05:00.000Z",
            container={"exitCode": 3, "reason": "OutOfMemoryError"},
        ),
    )
    deliver(client, task_event(arn, "STOPPING", 5))  # late again

    stopped = job(client)
    assert stopped["state"] == "STOPPED"
    assert stopped["stop_code"] == "EssentialContainerExited"
    assert stopped["stopped_reason"] == "Essential container in task exited"
    assert stopped["exit_code"] == 3
    assert stopped["container_reason"] == "OutOfMemoryError"
    assert stopped["stopped_at"] == "2026-11-29T20:05:00.000Z"
    item = aws.table.get_item(Key=table_key("t3sT_1234-5005"))["Item"]
    assert int(item["task_version"]) == 6
    assert "live" not in item and int(item["expires_at"]) > 0


def test_a_task_that_failed_to_start_fails_the_job_with_awss_reason(client, started):
    deliver(
        client,
        task_event(
            started["task_arn"],
            "STOPPED",
            4,
            stopCode="TaskFailedToStart",
            stoppedReason="CannotPullContainerError: pull image manifest has been retried 5 time(s)",
            container={"reason": "CannotPullContainerError: ref not found"},
        ),
    )

    failed = job(client)
    assert failed["state"] == "FAILED"
    assert failed["stopped_reason"].startswith("CannotPullContainerError")
    assert failed["container_reason"] == "CannotPullContainerError: ref not found"


def test_a_task_that_comes_up_for_a_cancelled_job_is_stopped(client, aws, started):
    arn = started["task_arn"]
    delete(client, started["job_key"])
    # moto stops at once; put it back to RUNNING as if the stop had raced the start.
    deliver(client, task_event(arn, "RUNNING", 3, startedAt="2026-11-29T20:00:30.000Z"))

    assert job(client)["state"] == "STOPPING"
    assert task_status(aws, arn) == "STOPPED"


def test_a_running_task_of_ours_without_a_record_is_stopped(client, aws, started):
    arn = started["task_arn"]
    aws.table.delete_item(Key=table_key(started["job_key"]))

    deliver(client, task_event(arn, "RUNNING", 3))

    task = aws.ecs.describe_tasks(cluster=CLUSTER, tasks=[arn])["tasks"][0]
    assert task["lastStatus"] == "STOPPED"
    assert task["stoppedReason"] == "no CI job claims this task"


def test_events_of_other_clusters_and_malformed_events_are_ignored(client, aws, started):
    arn = started["task_arn"]
    deliver(
        client, task_event(arn, "RUNNING", 3, cluster_arn="arn:aws:ecs:eu-west-1:123456789012:cluster/other")
    )
    malformed = task_event(arn, "RUNNING", 4)
    malformed["detail"]["taskArn"] = 7
    deliver(client, malformed)
    deliver(client, task_event(arn, "EXPLODED", 9))

    assert job(client)["state"] == "PROVISIONING"
    assert task_status(aws, arn) == "RUNNING"


def test_an_event_for_a_live_job_that_has_not_recorded_its_task_yet_stops_nothing(client, aws, started):
    # RunTask's answer is late or lost: the job is live, its record has no task yet, its lease ran out.
    aws.table.update_item(
        Key=table_key(started["job_key"]),
        UpdateExpression="REMOVE task_arn SET launch_lease_until = :zero",
        ExpressionAttributeValues={":zero": 0},
    )

    deliver(client, task_event(started["task_arn"], "RUNNING", 3))

    assert task_status(aws, started["task_arn"]) == "RUNNING"  # a retry recovers it with the same clientToken
