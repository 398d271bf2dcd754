"""The reaper against moto: deadlines, lost heartbeats, orphans, stuck and stale records, and the race."""

from __future__ import annotations

import json
import time

import pytest

from chalicelib import clock, factory
from chalicelib.reaper import QUIET_AFTER, decide, run_reaper
from chalicelib.store import JobStore
from tests.api.conftest import CLUSTER, OWNER, job_body, post, record, set_fields, table_key

HOUR = 3600


def reap(now: float) -> dict:
    return run_reaper(factory.job_service(), factory.current_settings(), now=now)


def status(aws, arn):
    task = aws.ecs.describe_tasks(cluster=CLUSTER, tasks=[arn])["tasks"][0]
    return task["lastStatus"], task.get("stoppedReason")


@pytest.fixture
def running_job(client, aws):
    job = json.loads(post(client, job_body(timeout_seconds=HOUR)).body)
    set_fields(aws, job["job_key"], state="RUNNING", last_status="RUNNING")
    return job


def test_a_live_job_inside_its_deadline_with_fresh_heartbeats_is_left_alone(aws, running_job):
    report = reap(time.time() + 60)

    assert status(aws, running_job["task_arn"])[0] == "RUNNING"
    assert report["jobs_checked"] == 1
    assert not any(k.startswith("tasks_stopped") for k in report)


def test_a_job_past_its_deadline_is_stopped_with_the_reason(aws, running_job):
    set_fields(aws, running_job["job_key"], heartbeat_at=clock.iso(time.time() + 3 * HOUR))

    report = reap(time.time() + 2 * HOUR)  # timeout 1 h + grace 10 min

    assert report["tasks_stopped_Deadline"] == 1
    assert status(aws, running_job["task_arn"]) == (
        "STOPPED",
        "CI job passed its deadline (job timeout plus grace)",
    )
    item = record(aws, running_job["job_key"])
    assert item["state"] == "STOPPING"
    assert item["reaped"] == "Deadline"


def test_a_job_whose_runner_manager_vanished_is_reaped_well_before_its_deadline(aws, running_job):
    report = reap(time.time() + 1000)  # heartbeat timeout 900 s, deadline 70 min away

    assert report["tasks_stopped_HeartbeatLost"] == 1
    assert status(aws, running_job["task_arn"])[0] == "STOPPED"


def test_a_heartbeat_that_lands_between_the_decision_and_the_stop_saves_the_job(
    client, aws, running_job, monkeypatch
):
    key = running_job["job_key"]
    later = time.time() + 1000
    stale = record(aws, key)
    assert decide(stale, later, factory.current_settings()).why == "HeartbeatLost"
    set_fields(aws, key, heartbeat_at=clock.iso(later))  # the runner's heartbeat wins the race
    # The reaper decides on the copy it listed, from before the heartbeat.
    monkeypatch.setattr(JobStore, "live_jobs", lambda self, **_: ([stale], None))

    report = reap(later)

    assert report["skipped_changed_meanwhile"] == 1
    assert "tasks_stopped_HeartbeatLost" not in report
    assert status(aws, running_job["task_arn"])[0] == "RUNNING"


def test_running_tasks_of_ours_that_no_record_claims_are_stopped_and_others_are_not(client, aws, running_job):
    orphan = json.loads(post(client, job_body(job_id="6006")).body)
    aws.table.delete_item(Key=table_key(orphan["job_key"]))
    foreign = aws.ecs.run_task(
        cluster=CLUSTER,
        taskDefinition="ci-other",
        launchType="FARGATE",
        networkConfiguration={
            "awsvpcConfiguration": {
                "subnets": factory.current_settings().subnets[:1],
                "securityGroups": list(factory.current_settings().security_groups),
            }
        },
    )["tasks"][0]["taskArn"]

    report = reap(time.time() + 60)

    assert report["tasks_stopped_NoJobRecord"] == 1
    assert status(aws, orphan["task_arn"]) == ("STOPPED", "no CI job claims this task")
    assert status(aws, foreign)[0] == "RUNNING"
    assert status(aws, running_job["task_arn"])[0] == "RUNNING"


def test_a_record_whose_task_is_gone_is_repaired(aws, running_job):
    aws.ecs.stop_task(
        cluster=CLUSTER, task=running_job["task_arn"], reason="Essential container in task exited"
    )
    set_fields(aws, running_job["job_key"], heartbeat_at=clock.iso(time.time() + HOUR))

    report = reap(time.time() + 120)

    assert report["records_repaired"] == 1
    item = record(aws, running_job["job_key"])
    assert item["state"] in ("STOPPED", "FAILED")
    assert item["stopped_reason"] == "Essential container in task exited"


def test_a_job_stuck_without_a_task_is_failed(aws):
    aws.table.put_item(
        Item={
            **table_key("t3sT_1234-88"),
            "job_key": "t3sT_1234-88",
            "attempt": 1,
            "state": "PROVISIONING",
            "live": "1",
            "owner": OWNER,
            "deadline": int(time.time() + HOUR),
            "launch_lease_until": int(time.time()),
            "created_at": clock.iso(time.time()),
        }
    )

    report = reap(time.time() + 600)

    assert report["jobs_failed_stuck"] == 1
    item = record(aws, "t3sT_1234-88")
    assert item["state"] == "FAILED"
    assert "live" not in item


def test_the_scheduled_handler_is_wired(client, aws, running_job):
    # A job whose runner manager went silent long ago: the scheduled run (at the real time) must reap it.
    set_fields(aws, running_job["job_key"], heartbeat_at=clock.iso(time.time() - 2 * HOUR))

    response = client.lambda_.invoke(
        "reaper", client.events.generate_cw_event("Scheduled Event", "aws.events", {}, [])
    )

    assert response.payload is None
    assert status(aws, running_job["task_arn"]) == (
        "STOPPED",
        "runner manager stopped sending heartbeats for this job",
    )
    assert record(aws, running_job["job_key"])["reaped"] == "HeartbeatLost"


def test_the_task_of_a_job_stuck_without_a_recorded_task_is_stopped_once_the_job_is_failed(aws, client):
    job = json.loads(post(client, job_body(job_id="7007")).body)
    aws.table.update_item(
        Key=table_key(job["job_key"]),
        UpdateExpression="REMOVE task_arn SET launch_lease_until = :zero",
        ExpressionAttributeValues={":zero": 0},
    )

    report = reap(time.time() + 600)

    assert report["jobs_failed_stuck"] == 1
    assert report["tasks_stopped_NoJobRecord"] == 1
    assert status(aws, job["task_arn"]) == ("STOPPED", "no CI job claims this task")


@pytest.mark.parametrize(
    ("why", "when"),
    [("Deadline", 2 * HOUR), ("HeartbeatLost", 1000)],  # timeout 1 h + grace 10 min; heartbeat timeout 900 s
)
def test_a_reaped_job_whose_stopped_event_is_lost_ends_and_its_task_is_reaped_once(
    aws, running_job, stops, why, when
):
    key, arn = running_job["job_key"], running_job["task_arn"]
    if why == "Deadline":
        set_fields(aws, key, heartbeat_at=clock.iso(time.time() + 3 * HOUR))
    first = reap(time.time() + when)
    assert first[f"tasks_stopped_{why}"] == 1
    assert record(aws, key)["state"] == "STOPPING"
    # No STOPPED event ever arrives. The next runs ask ECS instead of stopping the task again.

    later = [reap(time.time() + when + 5), reap(time.time() + when + 60), reap(time.time() + when + 120)]

    assert stops == [arn]
    assert not any(k.startswith("tasks_stopped") for run in later for k in run)
    item = record(aws, key)
    assert item["state"] == "STOPPED"
    assert item["last_status"] == "STOPPED"
    assert "live" not in item
    assert item["reaped"] == why


def test_a_stop_ecs_never_took_is_repeated(aws, running_job, stops):
    key, arn = running_job["job_key"], running_job["task_arn"]
    # We asked for a stop, but ECS still wants the task running (the StopTask was lost).
    set_fields(aws, key, state="STOPPING", stop_requested="CI job finished", stop_retries=2)

    report = reap(time.time() + 60)

    assert stops == [arn]
    assert int(record(aws, key)["stop_retries"]) == 3
    assert status(aws, arn) == ("STOPPED", "CI job finished")
    assert not any(k.startswith("tasks_stopped") for k in report)  # not a second reaping


def test_a_stop_ecs_never_took_is_repeated_a_bounded_number_of_times(aws, running_job, stops):
    key, arn = running_job["job_key"], running_job["task_arn"]
    set_fields(aws, key, state="STOPPING", stop_requested="CI job finished", stop_retries=3)

    reap(time.time() + 60)

    assert stops == []
    assert status(aws, arn)[0] == "RUNNING"
    assert record(aws, key)["state"] == "STOPPING"  # still live: the reaper keeps asking ECS


def test_a_stopping_job_whose_task_ecs_no_longer_knows_has_stopped(aws, running_job):
    key = running_job["job_key"]
    gone = running_job["task_arn"].rsplit("/", 1)[0] + "/0123456789abcdef0123456789abcdef"
    set_fields(aws, key, state="STOPPING", stop_requested="CI job finished", task_arn=gone)

    report = reap(time.time() + 60)

    assert report["records_repaired"] == 1
    item = record(aws, key)
    assert item["state"] == "STOPPED"
    assert item["stopped_reason"] == "ECS no longer knows the task"


def test_a_job_whose_task_never_ran_and_is_gone_failed(aws, client):
    job = json.loads(post(client, job_body(job_id="8008")).body)
    gone = job["task_arn"].rsplit("/", 1)[0] + "/0123456789abcdef0123456789abcdef"
    set_fields(aws, job["job_key"], task_arn=gone, state="PENDING", last_status="PENDING")

    reap(time.time() + QUIET_AFTER + 60)

    assert record(aws, job["job_key"])["state"] == "FAILED"
