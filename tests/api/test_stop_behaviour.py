"""Stopping jobs, as the reaper and the API do it, when the record changed under the decision: every stop is
guarded by a conditional write, and what a stop writes is what GET and the operator see afterwards."""

from __future__ import annotations

import json
import logging
import time

from chalicelib import clock, ecs, factory
from chalicelib import stop as stop_module
from chalicelib.reaper import STUCK_AFTER, run_reaper
from chalicelib.states import CHECKED
from chalicelib.stop import STOP_RETRIES
from chalicelib.store import JobStore
from tests.api.conftest import (
    CLUSTER,
    OWNER,
    delete,
    job_body,
    post,
    race_after,
    record,
    set_fields,
    table_key,
)

HOUR = 3600
REASON = "CI job passed its deadline (job timeout plus grace)"


def service():
    return factory.job_service()


def last_status(aws, arn: str) -> str:
    return aws.ecs.describe_tasks(cluster=CLUSTER, tasks=[arn])["tasks"][0]["lastStatus"]


def running(client, aws, job_id: str = "9001") -> dict:
    job = json.loads(post(client, job_body(job_id=job_id, timeout_seconds=HOUR)).body)
    set_fields(aws, job["job_key"], state="RUNNING", last_status="RUNNING")
    return record(aws, job["job_key"])


def stuck(aws, key: str, *, lease: int) -> dict:
    """A live job that never recorded a task, created long ago, its launch lease until `lease`."""
    created = time.time() - 2 * STUCK_AFTER
    item = {
        **table_key(key),
        "job_key": key,
        "attempt": 1,
        "state": "PROVISIONING",
        "live": "1",
        "owner": OWNER,
        "deadline": int(time.time() + HOUR),
        "launch_lease_until": lease,
        "created_at": clock.iso(created),
        "updated_at": clock.iso(created),
    }
    aws.table.put_item(Item=item)
    return item


# -- the reaper's stop -------------------------------------------------------------------------------------


def test_a_reaped_job_records_why_and_when_and_its_task_stops(client, aws, stops):
    item = running(client, aws)
    now = time.time() + 2 * HOUR

    assert service().reap(item, REASON, "Deadline", overdue={"deadline": int(now)}, now=now) is True

    after = record(aws, item["job_key"])
    assert after["state"] == "STOPPING"
    assert after["stop_requested"] == REASON
    assert after["reaped"] == "Deadline"
    assert after["updated_at"] == clock.iso(now)
    assert stops == [item["task_arn"]]
    assert last_status(aws, item["task_arn"]) == "STOPPED"


def test_a_job_asked_to_stop_meanwhile_is_not_reaped(client, aws, stops):
    item = running(client, aws)
    # The runner's DELETE landed after the reaper listed the job (state not yet moved by ECS's news).
    set_fields(aws, item["job_key"], stop_requested="CI job finished")
    now = time.time() + 2 * HOUR

    assert service().reap(item, REASON, "Deadline", overdue={"deadline": int(now)}, now=now) is False

    after = record(aws, item["job_key"])
    assert after["stop_requested"] == "CI job finished"
    assert "reaped" not in after
    assert stops == []


def test_a_job_whose_task_changed_meanwhile_is_not_reaped(client, aws, stops):
    item = running(client, aws)
    newer = item["task_arn"].rsplit("/", 1)[0] + "/0123456789abcdef0123456789abcdef"
    set_fields(aws, item["job_key"], task_arn=newer)  # a new attempt's task is recorded
    now = time.time() + 2 * HOUR

    assert service().reap(item, REASON, "Deadline", overdue={"deadline": int(now)}, now=now) is False

    after = record(aws, item["job_key"])
    assert after["state"] == "RUNNING"
    assert "stop_requested" not in after and "reaped" not in after
    assert stops == []
    assert last_status(aws, item["task_arn"]) == "RUNNING"


def test_a_job_no_longer_overdue_is_not_reaped(client, aws, stops):
    item = running(client, aws)  # its deadline is an hour away
    now = time.time()

    assert service().reap(item, REASON, "Deadline", overdue={"deadline": int(now)}, now=now) is False

    assert record(aws, item["job_key"])["state"] == "RUNNING"
    assert stops == []


# -- failing a job stuck without a task --------------------------------------------------------------------


def test_a_stuck_job_fails_with_the_reapers_reason_and_code_and_expires_later(aws):
    item = stuck(aws, "t3sT_1234-9101", lease=int(time.time()) - 10)
    now = time.time()

    failed = service().fail_stuck(
        item, "no task was started for this job", overdue={"launch_lease_until": int(now)}
    )

    assert failed is True
    done = time.time()
    after = record(aws, "t3sT_1234-9101")
    assert after["state"] == "FAILED"
    assert after["stop_code"] == "Reaped"
    assert after["stopped_reason"] == "no task was started for this job"
    assert "live" not in after
    retention = factory.current_settings().retention_days * 86400
    assert int(now + retention) <= int(after["expires_at"]) <= done + retention  # kept exactly the retention
    assert clock.parse(after["updated_at"]) >= now - 1


def test_a_stuck_job_whose_launch_lease_was_renewed_is_not_failed(aws):
    item = stuck(aws, "t3sT_1234-9102", lease=int(time.time()) - 10)
    set_fields(
        aws, "t3sT_1234-9102", launch_lease_until=int(time.time()) + 60
    )  # a retry took the launch over

    failed = service().fail_stuck(item, "stuck", overdue={"launch_lease_until": int(time.time())})

    assert failed is False
    assert record(aws, "t3sT_1234-9102")["state"] == "PROVISIONING"


def test_a_stuck_job_whose_task_got_recorded_meanwhile_is_not_failed(aws):
    item = stuck(aws, "t3sT_1234-9103", lease=int(time.time()) - 10)
    set_fields(aws, "t3sT_1234-9103", task_arn="arn:aws:ecs:eu-west-1:123456789012:task/fargate-ci/abc")

    failed = service().fail_stuck(item, "stuck", overdue={"launch_lease_until": int(time.time())})

    assert failed is False
    after = record(aws, "t3sT_1234-9103")
    assert after["state"] == "PROVISIONING"
    assert after["live"] == "1"


def test_the_reaper_reports_a_stuck_job_it_could_not_fail_as_changed_meanwhile(aws, monkeypatch):
    item = stuck(aws, "t3sT_1234-9104", lease=int(time.time()) - 10)
    set_fields(aws, "t3sT_1234-9104", task_arn="arn:aws:ecs:eu-west-1:123456789012:task/fargate-ci/abc")
    monkeypatch.setattr(JobStore, "live_jobs", lambda self, **_: ([item], None))  # listed before the write

    report = run_reaper(service(), factory.current_settings(), now=time.time())

    assert report["skipped_changed_meanwhile"] == 1
    assert "jobs_failed_stuck" not in report


# -- settling a job being stopped --------------------------------------------------------------------------


def test_a_lost_stop_is_repeated_exactly_stop_retries_times_then_left_alone(client, aws, monkeypatch):
    item = running(client, aws)
    set_fields(aws, item["job_key"], state="STOPPING", stop_requested="CI job finished")
    # ECS loses every StopTask: the task stays RUNNING and wants to.
    sent: list[tuple[str, str]] = []
    monkeypatch.setattr(ecs.EcsTasks, "stop", lambda self, arn, reason: sent.append((arn, reason)))

    seen = []
    for _ in range(STOP_RETRIES + 2):
        service().settle_stopping(record(aws, item["job_key"]))
        seen.append(int(record(aws, item["job_key"]).get("stop_retries", 0)))

    assert seen == [1, 2, 3, 3, 3]
    assert sent == [(item["task_arn"], "CI job finished")] * STOP_RETRIES
    assert record(aws, item["job_key"])["state"] == "STOPPING"


def test_a_repeated_stop_is_sent_once_when_two_reapers_race(client, aws, stops, monkeypatch):
    item = running(client, aws)
    set_fields(aws, item["job_key"], state="STOPPING", stop_requested="CI job finished")
    race_after(monkeypatch, CHECKED.event, lambda: set_fields(aws, item["job_key"], stop_retries=1))

    after = service().settle_stopping(record(aws, item["job_key"]))

    assert int(after["stop_retries"]) == 1  # the other run's retry, not a second one counted over it
    assert int(record(aws, item["job_key"])["stop_retries"]) == 1
    assert stops == []


def test_a_repeated_stop_for_a_record_whose_task_changed_meanwhile_sends_nothing(
    client, aws, stops, monkeypatch
):
    item = running(client, aws)
    set_fields(aws, item["job_key"], state="STOPPING", stop_requested="CI job finished")
    other = running(client, aws, job_id="9002")
    race_after(
        monkeypatch, CHECKED.event, lambda: set_fields(aws, item["job_key"], task_arn=other["task_arn"])
    )

    after = service().settle_stopping(record(aws, item["job_key"]))

    assert after["task_arn"] == other["task_arn"]
    assert "stop_retries" not in record(aws, item["job_key"])
    assert stops == []


def test_a_stop_requested_through_the_api_records_the_reason_and_time(client, aws, stops):
    item = running(client, aws)
    before = time.time()

    response = delete(client, item["job_key"], reason="pipeline cancelled")

    assert response.status_code == 200
    after = record(aws, item["job_key"])
    assert after["state"] == "STOPPING"
    assert after["stop_requested"] == "pipeline cancelled"
    assert clock.parse(after["updated_at"]) >= before - 1
    assert stops == [item["task_arn"]]
    assert json.loads(response.body)["state"] == "STOPPING"


# -- DELETE racing a launch, and what a stop counts and logs -------------------------------------------------


def race_before(monkeypatch, event: str, write) -> None:
    """Another writer lands right before our `event` write (after we read the record)."""
    real = JobStore.transition
    pending = [write]

    def transition(self, key, change, **guards):
        if change.event == event and pending:
            pending.pop()()
        return real(self, key, change, **guards)

    monkeypatch.setattr(JobStore, "transition", transition)


def launching(client, aws, job_id: str = "9201") -> dict:
    """A job whose RunTask has not answered yet (its task exists in ECS, not yet on the record)."""
    job = json.loads(post(client, job_body(job_id=job_id, timeout_seconds=HOUR)).body)
    aws.table.update_item(Key=table_key(job["job_key"]), UpdateExpression="REMOVE task_arn")
    return job


def test_a_cancel_that_races_runtasks_answer_stops_the_task_it_started(client, aws, stops, monkeypatch):
    job = launching(client, aws)
    race_before(
        monkeypatch, "launch failed", lambda: set_fields(aws, job["job_key"], task_arn=job["task_arn"])
    )

    response = delete(client, job["job_key"], reason="pipeline cancelled")

    assert response.status_code == 200
    assert json.loads(response.body)["state"] == "STOPPING"
    assert stops == [job["task_arn"]]
    after = record(aws, job["job_key"])
    assert (after["state"], after["stop_requested"]) == ("STOPPING", "pipeline cancelled")


def test_a_cancel_that_races_the_launch_failing_answers_with_the_failed_job(client, aws, stops, monkeypatch):
    job = launching(client, aws)
    race_before(
        monkeypatch,
        "launch failed",
        lambda: set_fields(
            aws, job["job_key"], state="FAILED", stopped_reason="ECS could not start the task: X"
        ),
    )

    response = delete(client, job["job_key"])

    assert response.status_code == 200
    assert json.loads(response.body)["state"] == "FAILED"
    assert json.loads(response.body)["stopped_reason"] == "ECS could not start the task: X"
    assert stops == []


def test_a_cancel_that_races_a_new_attempt_is_refused_and_stops_nothing(client, aws, stops, monkeypatch):
    job = launching(client, aws)
    race_before(monkeypatch, "launch failed", lambda: set_fields(aws, job["job_key"], attempt=2))

    response = delete(client, job["job_key"], attempt=1)

    assert response.status_code == 409
    assert stops == []
    assert record(aws, job["job_key"])["state"] == "PROVISIONING"


def test_a_stop_whose_record_moved_to_another_task_meanwhile_is_not_marked(client, aws, stops, monkeypatch):
    item = running(client, aws)
    other = running(client, aws, job_id="9202")["task_arn"]
    race_before(monkeypatch, "stop requested", lambda: set_fields(aws, item["job_key"], task_arn=other))

    response = delete(client, item["job_key"])

    assert response.status_code == 200
    body = json.loads(response.body)
    assert (body["state"], body["task_arn"]) == ("RUNNING", other)
    assert "stop_requested" not in record(aws, item["job_key"])


def test_a_stop_marks_the_record_as_updated_now(client, aws, stops):
    item = running(client, aws)
    set_fields(aws, item["job_key"], updated_at="2000-01-01T00:00:00.000Z")

    delete(client, item["job_key"])

    assert clock.parse(record(aws, item["job_key"])["updated_at"]) >= time.time() - 5


def test_stops_are_counted_by_why_and_a_stop_ecs_keeps_ignoring_is_an_error(client, aws, monkeypatch, caplog):
    counted = []
    monkeypatch.setattr(
        stop_module, "count", lambda name, value=1, **d: counted.append((name, d.get("reason")))
    )
    monkeypatch.setattr(ecs.EcsTasks, "stop", lambda self, arn, reason: None)  # ECS ignores every StopTask
    caplog.set_level(logging.INFO, logger="fargate-ci")
    item = running(client, aws)

    delete(client, item["job_key"])
    for _ in range(STOP_RETRIES + 1):
        service().settle_stopping(record(aws, item["job_key"]))

    assert counted == [("TasksStopped", "JobCleanup")] + [("TasksStopped", "StopRetried")] * STOP_RETRIES + [
        ("TaskStopsIgnored", None)
    ]
    (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert error.getMessage() == "task still running after repeated stop requests"
    assert error.task_arn == item["task_arn"]


def test_a_job_ecs_is_stopping_without_our_request_is_stopped_again_with_a_generic_reason(
    client, aws, monkeypatch
):
    sent = []
    monkeypatch.setattr(ecs.EcsTasks, "stop", lambda self, arn, reason: sent.append(reason))
    item = running(client, aws)
    set_fields(aws, item["job_key"], state="STOPPING")  # ECS said so; we never asked

    service().settle_stopping(record(aws, item["job_key"]))

    assert sent == ["CI job is being stopped"]


def test_the_sweep_leaves_the_task_of_a_launch_in_flight_alone(client, aws, stops):
    job = launching(client, aws)

    report = run_reaper(service(), factory.current_settings(), now=time.time())

    assert stops == []
    assert report.get("tasks_stopped_NoJobRecord", 0) == 0
    assert report["tasks_seen"] == 1
    assert last_status(aws, job["task_arn"]) == "RUNNING"
