"""ECS Task State Change events keep jobs current, in version order, and stop tasks nobody needs."""

from __future__ import annotations

import json

import pytest

from chalicelib import events, launch, observe, stop
from chalicelib.jobs import record_key
from tests.api.conftest import CLUSTER, OWNER, REGION, delete, job_body, post, table_key

CLUSTER_ARN = f"arn:aws:ecs:{REGION}:123456789012:cluster/{CLUSTER}"
STARTED_BY = "gl-" + record_key(OWNER, "t3sT_1234-5005")  # what RunTask got for OWNER's job


def task_event(task_arn: str, last_status: str, version: int, *, started_by: str = STARTED_BY, **detail):
    """An event in AWS's shape (tests/fixtures/aws: the ENI attachment is "eni" in events)."""
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
                "type": "eni",
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
    if version is None:
        del body["version"]
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


@pytest.fixture
def metrics(monkeypatch):
    """Every counter the event handler and the use cases add, as (name, reason)."""
    seen: list[tuple[str, str | None]] = []
    for module in (events, launch, observe, stop):
        real = module.count

        def count(name, value=1, _real=real, **dimensions):
            seen.append((name, dimensions.get("reason")))
            return _real(name, value, **dimensions)

        monkeypatch.setattr(module, "count", count)
    return seen


def record(aws, key="t3sT_1234-5005"):
    return aws.table.get_item(Key=table_key(key))["Item"]


def test_the_running_events_eni_attachment_gives_the_job_its_address_at_once(client, aws, started):
    # AWS's own example event, moved into our cluster and onto our task.
    with open("tests/fixtures/aws/task-state-change-running.json") as f:
        event = json.load(f)
    event["detail"].update(
        clusterArn=CLUSTER_ARN,
        taskArn=started["task_arn"],
        startedBy="gl-t3sT_1234-5005",
        containers=[{**event["detail"]["containers"][0], "name": "ci-coordinator"}],
    )

    deliver(client, event)

    item = record(aws)
    assert item["address"] == "10.0.0.139"
    assert item["state"] == "RUNNING"
    assert item["started_at"] == "2020-01-23T17:57:58.103Z"


def test_awss_versionless_termination_notice_is_applied_once(client, aws, started, metrics):
    arn = started["task_arn"]
    deliver(client, task_event(arn, "RUNNING", 3, startedAt="2026-11-29T20:00:30.000Z"))
    # AWS's own notice (no detail.version, no containers, no startedBy), moved onto our task.
    with open("tests/fixtures/aws/spot-termination-notice.json") as f:
        notice = json.load(f)
    notice["detail"].update(clusterArn=CLUSTER_ARN, taskArn=arn)
    # EventBridge's envelope always has `time` and `region` (the snippet leaves them out; Chalice needs them).
    notice.update(time="2026-11-29T20:01:00Z", region=REGION)
    metrics.clear()

    deliver(client, notice)
    first = record(aws)
    deliver(client, notice)  # AWS delivers at least once

    assert first["stop_code"] == "TerminationNotice"
    assert first["stopped_reason"] == "Your Spot Task was interrupted."
    assert first["state"] == "RUNNING"
    assert first["address"] == "10.9.1.77"  # a notice without attachments takes nothing away
    assert record(aws)["updated_at"] == first["updated_at"]  # the repeat changed nothing
    assert [m for m, _ in metrics if m.startswith("Events")] == ["EventsApplied", "EventsDroppedStale"]


def test_an_event_without_version_never_moves_the_task_status_backwards(client, aws, started):
    arn = started["task_arn"]
    deliver(client, task_event(arn, "STOPPING", 5, startedAt="2026-11-29T20:00:30.000Z"))

    deliver(client, task_event(arn, "DEACTIVATING", None))
    deliver(client, task_event(arn, "RUNNING", None))

    item = record(aws)
    assert item["last_status"] == "STOPPING"
    assert item["state"] == "STOPPING"


def test_late_and_duplicate_events_of_a_job_being_stopped_stop_nothing(client, aws, started, stops, metrics):
    arn = started["task_arn"]
    deliver(client, task_event(arn, "RUNNING", 3, startedAt="2026-11-29T20:00:30.000Z"))
    deliver(client, task_event(arn, "DEACTIVATING", 5, desiredStatus="STOPPED"))
    delete(client, started["job_key"])
    assert stops == [arn]  # the job's cleanup
    metrics.clear()

    deliver(client, task_event(arn, "RUNNING", 3, startedAt="2026-11-29T20:00:30.000Z"))  # duplicate
    deliver(client, task_event(arn, "PENDING", 2))  # late
    deliver(client, task_event(arn, "RUNNING", None))  # late, without version

    assert stops == [arn]
    assert not [m for m in metrics if m[0] == "TasksReaped"]
    assert record(aws)["state"] == "STOPPING"


def test_a_newer_live_event_for_a_finished_job_stops_its_task_once(client, aws, started, stops, metrics):
    arn = started["task_arn"]
    aws.table.update_item(
        Key=table_key("t3sT_1234-5005"),
        UpdateExpression="SET #s = :f, task_version = :v REMOVE live",
        ExpressionAttributeNames={"#s": "state"},
        ExpressionAttributeValues={":f": "FAILED", ":v": 2},
    )

    deliver(client, task_event(arn, "RUNNING", 3))
    deliver(client, task_event(arn, "RUNNING", 3))  # duplicate

    assert stops == [arn]
    assert [m for m in metrics if m[0] == "TasksReaped"] == [("TasksReaped", "JobFinished")]


def test_a_stopped_event_without_started_at_keeps_a_job_that_ran_stopped_not_failed(client, aws, started):
    arn = started["task_arn"]
    deliver(client, task_event(arn, "RUNNING", 3, startedAt="2026-11-29T20:00:30.000Z"))

    deliver(client, task_event(arn, "STOPPED", 7, stopCode="EssentialContainerExited"))

    item = record(aws)
    assert item["state"] == "STOPPED"
    assert item["started_at"] == "2026-11-29T20:00:30.000Z"


def test_a_later_event_clears_stop_facts_an_earlier_one_gave(client, aws, started):
    arn = started["task_arn"]
    deliver(
        client,
        task_event(
            arn, "RUNNING", 3, stopCode="TerminationNotice", stoppedReason="Your Spot Task was interrupted."
        ),
    )
    assert record(aws)["stop_code"] == "TerminationNotice"

    deliver(client, task_event(arn, "RUNNING", 4))  # ECS says otherwise now

    item = record(aws)
    assert "stop_code" not in item and "stopped_reason" not in item
    deliver(client, task_event(arn, "STOPPED", 6, stopCode="SpotInterruption", stoppedReason="gone"))
    assert record(aws)["stop_code"] == "SpotInterruption"


def test_a_sidecars_exit_code_is_not_the_jobs(client, aws, started):
    event = task_event(
        started["task_arn"],
        "STOPPED",
        6,
        stopCode="EssentialContainerExited",
        startedAt="2026-11-29T20:00:30.000Z",
    )
    event["detail"]["containers"] = [{"name": "log-router", "lastStatus": "STOPPED", "exitCode": 0}]

    deliver(client, event)

    item = record(aws)
    assert item["state"] == "STOPPED"
    assert "exit_code" not in item


@pytest.mark.parametrize(
    "cluster_arn",
    [
        f"arn:aws:ecs:us-east-1:123456789012:cluster/{CLUSTER}",  # another region
        f"arn:aws:ecs:{REGION}:999999999999:cluster/{CLUSTER}",  # another account
        f"arn:aws:ecs:{REGION}:123456789012:cluster/x-{CLUSTER}",
    ],
)
def test_events_of_a_cluster_with_our_name_elsewhere_are_ignored(client, aws, started, metrics, cluster_arn):
    deliver(client, task_event(started["task_arn"], "RUNNING", 3, cluster_arn=cluster_arn))

    assert record(aws)["state"] == "PROVISIONING"
    assert ("EventsIgnored", "OtherCluster") in metrics


def test_unknown_task_and_stale_drops_are_counted_apart(client, aws, started, metrics):
    arn = started["task_arn"]
    deliver(client, task_event(arn, "RUNNING", 3))
    deliver(client, task_event(arn, "PENDING", 2))
    unknown = arn.rsplit("/", 1)[0] + "/0123456789abcdef0123456789abcdef"
    deliver(client, task_event(unknown, "STOPPED", 9, started_by="someone-else"))

    names = [m for m, _ in metrics if m.startswith("Events")]
    assert names == ["EventsApplied", "EventsDroppedStale", "EventsDroppedUnknownTask"]


def test_a_late_event_of_the_same_status_does_not_undo_newer_news(client, aws, started, metrics):
    arn = started["task_arn"]
    deliver(
        client,
        task_event(
            arn, "RUNNING", 4, stopCode="TerminationNotice", stoppedReason="Your Spot Task was interrupted."
        ),
    )
    metrics.clear()

    deliver(client, task_event(arn, "RUNNING", 3))  # older: still without the notice

    item = record(aws)
    assert item["stop_code"] == "TerminationNotice"
    assert int(item["task_version"]) == 4
    assert [m for m, _ in metrics if m.startswith("Events")] == ["EventsDroppedStale"]
