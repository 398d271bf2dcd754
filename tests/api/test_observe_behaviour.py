"""What the orchestrator learns about a job and writes down: DescribeTasks refreshes (GET, the reaper), a task
ECS no longer knows, late news of a finished job's task, and heartbeats; each guarded so that news about an
older task or a race with another writer changes nothing."""

from __future__ import annotations

import json
import time
from decimal import Decimal

import pytest
from moto.ecs.models import ecs_backends

from chalicelib import clock, ecs, factory
from chalicelib.jobs import started_by
from chalicelib.reaper import QUIET_AFTER, run_reaper
from chalicelib.schema import TABLE_KEY
from chalicelib.store import JobStore
from chalicelib.tasks import snapshot_from_ecs
from tests.api.conftest import (
    ACCOUNT,
    CLUSTER,
    REGION,
    heartbeat,
    job_body,
    post,
    race_after,
    record,
    set_fields,
    table_key,
)

HOUR = 3600


def service():
    return factory.job_service()


def started(client, aws, job_id: str = "9301") -> dict:
    return json.loads(post(client, job_body(job_id=job_id, timeout_seconds=HOUR)).body)


def gone_arn(arn: str) -> str:
    return arn.rsplit("/", 1)[0] + "/0123456789abcdef0123456789abcdef"


def describes(monkeypatch) -> list[list[str]]:
    """Every DescribeTasks the orchestrator sends (still sent to moto)."""
    seen: list[list[str]] = []
    real = ecs.EcsTasks.describe

    def describe(self, arns):
        seen.append(list(arns))
        return real(self, arns)

    monkeypatch.setattr(ecs.EcsTasks, "describe", describe)
    return seen


# -- refresh -----------------------------------------------------------------------------------------------


def test_a_refresh_is_remembered_so_the_reaper_does_not_ask_ecs_again_while_news_is_fresh(
    client, aws, monkeypatch
):
    job = started(client, aws)
    set_fields(aws, job["job_key"], updated_at=clock.iso(time.time() - 2 * QUIET_AFTER))  # quiet since
    asked = describes(monkeypatch)

    run_reaper(service(), factory.current_settings(), now=time.time())
    first = len(asked)
    run_reaper(service(), factory.current_settings(), now=time.time())

    assert [job["task_arn"]] in asked[:first]  # the first run asked ECS about the job...
    assert [job["task_arn"]] not in asked[first:] or asked[first:].count(
        [job["task_arn"]]
    ) == 1  # (the sweep)
    assert len(asked) - first == first - 1  # ...the second only swept
    assert clock.parse(record(aws, job["job_key"])["checked_at"]) >= time.time() - 5


def test_a_refresh_whose_record_moved_to_another_task_meanwhile_marks_nothing(client, aws, monkeypatch):
    job = started(client, aws)
    item = record(aws, job["job_key"])
    other = started(client, aws, job_id="9302")["task_arn"]
    # The task's news is applied, then a new attempt's task is recorded before "checked" is.
    race_after(monkeypatch, "observed", lambda: set_fields(aws, job["job_key"], task_arn=other))

    service().refresh(item)

    after = record(aws, job["job_key"])
    assert after["task_arn"] == other
    assert "checked_at" not in after


def test_get_on_a_quiet_job_refreshes_it_from_ecs(client, aws):
    job = started(client, aws)
    task = ecs_backends[ACCOUNT][REGION].tasks[CLUSTER][job["task_arn"]]
    task.last_status = "RUNNING"
    set_fields(aws, job["job_key"], updated_at=clock.iso(time.time() - 2 * HOUR))

    view = json.loads(client.http.get(f"/jobs/{job['job_key']}").body)

    assert (view["state"], view["last_status"]) == ("RUNNING", "RUNNING")
    assert "checked_at" in record(aws, job["job_key"])


# -- a task ECS no longer knows ----------------------------------------------------------------------------


def test_a_running_job_whose_task_is_gone_has_stopped_and_leaves_the_live_index(client, aws):
    job = started(client, aws)
    set_fields(
        aws, job["job_key"], state="RUNNING", last_status="RUNNING", task_arn=gone_arn(job["task_arn"])
    )
    before = time.time()

    after = service().refresh(record(aws, job["job_key"]))

    assert after["state"] == "STOPPED"
    assert after["last_status"] == "STOPPED"
    assert after["stopped_reason"] == "ECS no longer knows the task"
    assert "live" not in after
    retention = factory.current_settings().retention_days * 86400
    assert int(after["expires_at"]) >= before + retention - 5
    assert service().live_jobs()[0] == []


def test_a_task_gone_after_a_stop_notice_keeps_the_notices_reason(client, aws):
    job = started(client, aws)
    set_fields(
        aws,
        job["job_key"],
        state="RUNNING",
        last_status="RUNNING",
        stopped_reason="Your Spot Task was interrupted.",
        task_arn=gone_arn(job["task_arn"]),
    )

    after = service().refresh(record(aws, job["job_key"]))

    assert after["stopped_reason"] == "Your Spot Task was interrupted."


def test_a_stopping_job_whose_task_never_ran_and_is_gone_has_stopped_not_failed(client, aws):
    job = started(client, aws)
    set_fields(
        aws, job["job_key"], state="STOPPING", last_status="PENDING", task_arn=gone_arn(job["task_arn"])
    )

    assert service().refresh(record(aws, job["job_key"]))["state"] == "STOPPED"


def test_a_gone_task_of_a_record_that_moved_on_meanwhile_ends_nothing(client, aws, monkeypatch):
    job = started(client, aws)
    set_fields(
        aws, job["job_key"], state="RUNNING", last_status="RUNNING", task_arn=gone_arn(job["task_arn"])
    )
    listed = record(aws, job["job_key"])
    set_fields(aws, job["job_key"], task_arn=job["task_arn"])  # a newer attempt recorded a live task

    after = service().refresh(listed)

    assert after["task_arn"] == job["task_arn"]
    assert after["state"] == "RUNNING"
    assert record(aws, job["job_key"])["live"] == "1"


# -- late news of a finished job's task ----------------------------------------------------------------------


def task_detail(
    arn: str, started_by: str, last_status: str, desired_status: str = "RUNNING", **fields
) -> dict:
    """An "ECS Task State Change" detail for a task of ours, plus `fields` (version, stopCode, ...)."""
    return {
        "taskArn": arn,
        "clusterArn": f"arn:aws:ecs:{REGION}:{ACCOUNT}:cluster/{CLUSTER}",
        "lastStatus": last_status,
        "desiredStatus": desired_status,
        "startedBy": started_by,
        **fields,
    }


def snapshot(arn: str, version: int, started_by: str):
    return snapshot_from_ecs(task_detail(arn, started_by, "RUNNING", version=version), "ci-coordinator")


def finished(client, aws) -> tuple[dict, dict]:
    job = started(client, aws)
    set_fields(aws, job["job_key"], state="FAILED", task_version=2)
    aws.table.update_item(Key=table_key(job["job_key"]), UpdateExpression="REMOVE live")
    item = record(aws, job["job_key"])
    return job, item


def test_two_handlers_racing_on_one_newer_report_of_a_finished_jobs_task_stop_it_once(client, aws, stops):
    job, item = finished(client, aws)
    news = snapshot(job["task_arn"], 3, started_by(item[TABLE_KEY]))

    # Both handlers read the record before either wrote (item is that read).
    service().apply_snapshot(news, dict(item))
    service().apply_snapshot(news, dict(item))

    assert stops == [job["task_arn"]]
    assert int(record(aws, job["job_key"])["task_version"]) == 3


def test_a_newer_report_of_a_task_the_record_no_longer_names_is_not_noted(client, aws, stops):
    job, item = finished(client, aws)
    set_fields(aws, job["job_key"], task_arn=gone_arn(job["task_arn"]))  # the record moved on meanwhile

    service().apply_snapshot(snapshot(job["task_arn"], 3, ""), dict(item))

    assert int(record(aws, job["job_key"])["task_version"]) == 2
    assert stops == []


# -- heartbeats --------------------------------------------------------------------------------------------


def test_the_first_heartbeat_records_how_long_ssh_took_and_later_ones_never_overwrite_it(client, aws):
    job = started(client, aws)

    first = heartbeat(client, job["job_key"], ssh_ready_seconds=4.56789)
    heartbeat(client, job["job_key"], ssh_ready_seconds=99.0)
    heartbeat(client, job["job_key"])

    assert first.status_code == 200
    item = record(aws, job["job_key"])
    assert item["ssh_ready_seconds"] == Decimal("4.568")
    assert clock.parse(item["heartbeat_at"]) >= time.time() - 5


def test_a_heartbeat_for_a_finished_job_changes_nothing(client, aws):
    job = started(client, aws)
    set_fields(aws, job["job_key"], state="STOPPED", heartbeat_at="2000-01-01T00:00:00.000Z")

    response = heartbeat(client, job["job_key"], ssh_ready_seconds=1.0)

    assert response.status_code == 200
    assert json.loads(response.body)["state"] == "STOPPED"
    item = record(aws, job["job_key"])
    assert item["heartbeat_at"] == "2000-01-01T00:00:00.000Z"
    assert "ssh_ready_seconds" not in item


def test_a_heartbeat_that_loses_a_race_with_a_new_attempt_is_refused(client, aws, monkeypatch):
    job = started(client, aws)
    before = record(aws, job["job_key"])["heartbeat_at"]
    real = JobStore.get
    calls = []

    def get(self, key):
        item = real(self, key)
        calls.append(1)
        if len(calls) == 1:  # a new attempt lands right after the heartbeat read the record
            set_fields(aws, job["job_key"], attempt=2)
        return item

    monkeypatch.setattr(JobStore, "get", get)

    response = heartbeat(client, job["job_key"])

    assert response.status_code == 409
    assert record(aws, job["job_key"])["heartbeat_at"] == before


# -- GET ---------------------------------------------------------------------------------------------------


def test_get_of_a_finished_job_never_asks_ecs(client, aws, monkeypatch):
    job = started(client, aws)
    set_fields(aws, job["job_key"], state="FAILED", updated_at=clock.iso(time.time() - 2 * HOUR))
    asked = describes(monkeypatch)

    view = json.loads(client.http.get(f"/jobs/{job['job_key']}").body)

    assert view["state"] == "FAILED"
    assert asked == []


def test_get_of_a_job_without_a_task_yet_never_asks_ecs(client, aws, monkeypatch):
    job = started(client, aws)
    aws.table.update_item(
        Key=table_key(job["job_key"]),
        UpdateExpression="REMOVE task_arn SET updated_at = :u",
        ExpressionAttributeValues={":u": clock.iso(time.time() - 2 * HOUR)},
    )
    asked = describes(monkeypatch)

    client.http.get(f"/jobs/{job['job_key']}")

    assert asked == []


def test_get_counts_a_recent_check_as_news(client, aws, monkeypatch):
    job = started(client, aws)
    set_fields(
        aws, job["job_key"], updated_at=clock.iso(time.time() - 2 * HOUR), checked_at=clock.iso(time.time())
    )
    asked = describes(monkeypatch)

    client.http.get(f"/jobs/{job['job_key']}")

    assert asked == []


def test_the_first_heartbeat_emits_the_ssh_ready_latency(client, aws, monkeypatch):
    from chalicelib import observe

    emitted = []
    monkeypatch.setattr(observe, "seconds", lambda name, value: emitted.append((name, value)))
    job = started(client, aws)

    heartbeat(client, job["job_key"], ssh_ready_seconds=2.5)
    heartbeat(client, job["job_key"], ssh_ready_seconds=3.5)

    assert emitted == [("SshReadyLatency", 2.5)]


# -- task reports ------------------------------------------------------------------------------------------


def test_a_report_about_a_task_the_record_no_longer_names_changes_nothing(client, aws):
    job = started(client, aws)
    item = record(aws, job["job_key"])
    set_fields(aws, job["job_key"], task_arn=gone_arn(job["task_arn"]))  # a newer attempt's task meanwhile

    service().apply_snapshot(snapshot(job["task_arn"], 5, started_by(item[TABLE_KEY])), dict(item))

    after = record(aws, job["job_key"])
    assert after["state"] == "PROVISIONING"
    assert "task_version" not in after


def test_the_task_start_latency_is_emitted_once_when_the_job_starts_running(client, aws, monkeypatch):
    from chalicelib import observe

    emitted = []
    monkeypatch.setattr(observe, "seconds", lambda name, value: emitted.append((name, round(value, 3))))
    job = started(client, aws)
    item = record(aws, job["job_key"])
    created = clock.parse(item["created_at"])

    def report(status: str, version: int, started_at: float | None):
        detail = task_detail(job["task_arn"], started_by(item[TABLE_KEY]), status, version=version)
        if started_at is not None:
            detail["startedAt"] = clock.iso(started_at)
        service().apply_snapshot(snapshot_from_ecs(detail, "ci-coordinator"))

    report("PENDING", 2, None)
    report("RUNNING", 3, created + 12.5)
    report("RUNNING", 4, created + 12.5)  # news about a job already running

    assert emitted == [("TaskStartLatency", 12.5)]


def test_a_finished_jobs_late_task_is_stopped_with_the_reason_ecs_records(client, aws):
    job, item = finished(client, aws)

    service().apply_snapshot(snapshot(job["task_arn"], 3, started_by(item[TABLE_KEY])), dict(item))

    task = aws.ecs.describe_tasks(cluster=CLUSTER, tasks=[job["task_arn"]])["tasks"][0]
    assert task["stoppedReason"] == "CI job already finished or was cancelled"


def test_a_repeated_versionless_stop_report_is_stale_the_second_time(client, aws):
    job = started(client, aws)
    item = record(aws, job["job_key"])
    detail = task_detail(
        job["task_arn"], started_by(item[TABLE_KEY]), "STOPPED", "STOPPED", stopCode="SpotInterruption"
    )

    _, first = service().apply_snapshot(snapshot_from_ecs(detail, "ci-coordinator"))
    _, second = service().apply_snapshot(snapshot_from_ecs(detail, "ci-coordinator"))

    assert (first, second) == ("applied", "stale")


@pytest.fixture
def public_addresses(aws, monkeypatch):
    """Settings that make the driver SSH to the task's public address; EC2's answers recorded."""
    monkeypatch.setenv("FARGATE_ADDRESS", "public")
    monkeypatch.setenv("FARGATE_ASSIGN_PUBLIC_IP", "true")
    factory.reset()
    asked: list[str] = []

    def public_address(self, eni_id):
        asked.append(eni_id)
        return "203.0.113.9"

    monkeypatch.setattr(ecs.EcsTasks, "public_address", public_address)
    yield asked
    factory.reset()


def eni_report(job: dict, item: dict, status: str, version: int, eni: bool = True):
    eni_details = [{"name": "privateIPv4Address", "value": "10.9.1.77"}]
    eni_details += [{"name": "networkInterfaceId", "value": "eni-7"}] if eni else []
    detail = task_detail(
        job["task_arn"],
        started_by(item[TABLE_KEY]),
        status,
        version=version,
        attachments=[{"type": "eni", "details": eni_details}],
    )
    service().apply_snapshot(snapshot_from_ecs(detail, "ci-coordinator"))


def test_a_public_address_is_looked_up_once_when_the_task_runs(client, aws, public_addresses):
    job = started(client, aws)
    item = record(aws, job["job_key"])

    eni_report(job, item, "PENDING", 2)
    assert public_addresses == []
    eni_report(job, item, "RUNNING", 3)
    eni_report(job, item, "RUNNING", 4)

    assert public_addresses == ["eni-7"]
    assert record(aws, job["job_key"])["address"] == "203.0.113.9"


def test_no_public_address_is_looked_up_without_an_eni(client, aws, public_addresses):
    job = started(client, aws)

    eni_report(job, record(aws, job["job_key"]), "RUNNING", 3, eni=False)

    assert public_addresses == []
    assert "address" not in record(aws, job["job_key"])
