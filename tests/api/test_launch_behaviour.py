"""POST /jobs repeated while a launch is in flight, taken over after its launcher died, restarted after a
finished attempt, and what a new attempt's record holds. The service runs on a fake clock so that the
5-second wait for another launcher costs no real time."""

from __future__ import annotations

import time

import boto3
import pytest

from chalicelib import factory
from chalicelib.clock import iso
from chalicelib.ecs import EcsTasks
from chalicelib.errors import JobConflict, TaskStartFailed, Throttled
from chalicelib.jobs import parse_job_request, record_key
from chalicelib.kms import KmsCa
from chalicelib.schema import TABLE_KEY
from chalicelib.service import JobService
from chalicelib.store import JobStore
from tests.api.conftest import ACCOUNT, CLUSTER, OWNER, REGION, TABLE, job_body, table_key, tasks

KEY = "t3sT_1234-5005"


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(aws):
    return FakeClock()


@pytest.fixture
def service(aws, clock):
    settings = factory.current_settings()
    table = boto3.resource("dynamodb", region_name=REGION).Table(TABLE)
    ecs_tasks = EcsTasks(aws.ecs, aws.ec2, settings)
    ca = KmsCa(boto3.client("kms", region_name=REGION), settings.ca_key_ids)
    return JobService(settings, JobStore(table), ecs_tasks, ca=ca, now=clock, sleep=clock.sleep)


def request(body: dict | None = None):
    return parse_job_request(body or BODY, factory.current_settings(), ACCOUNT)


BODY = job_body()


def record(aws) -> dict:
    return aws.table.get_item(Key=table_key(KEY), ConsistentRead=True)["Item"]


def in_flight(aws, clock, **fields) -> None:
    """The record a launcher wrote before its RunTask: live, no task, `fields` (its lease) as given."""
    item = {
        **table_key(KEY),
        "job_key": KEY,
        "attempt": 1,
        "state": "PROVISIONING",
        "live": "1",
        "owner": OWNER,
        "request_hash": request().request_hash,
        "deadline": int(clock.now + 7200),
        **fields,
    }
    aws.table.put_item(Item=item)


def test_a_repeat_waits_five_seconds_for_the_launch_in_flight_then_asks_for_a_retry(aws, clock, service):
    in_flight(aws, clock, launch_lease_until=int(clock.now + 30))

    with pytest.raises(Throttled) as caught:
        service.start(request(), OWNER)

    assert caught.value.retry_after == 1
    assert caught.value.message == "the job's task is being started by another request; retry"
    assert sum(clock.sleeps) == pytest.approx(5.0)
    assert set(clock.sleeps) == {0.2}
    assert tasks(aws) == []


def test_a_repeat_answers_with_the_task_once_the_launch_in_flight_records_it(
    aws, clock, service, monkeypatch
):
    in_flight(aws, clock, launch_lease_until=int(clock.now + 30))
    arn = f"arn:aws:ecs:{REGION}:{ACCOUNT}:task/fargate-ci/0123456789abcdef0123456789abcdef"
    real = JobStore.get

    def get(self, key):
        if len(clock.sleeps) == 3:  # the other launcher records its task while we wait
            aws.table.update_item(
                Key=table_key(KEY),
                UpdateExpression="SET task_arn = :a",
                ExpressionAttributeValues={":a": arn},
            )
        return real(self, key)

    monkeypatch.setattr(JobStore, "get", get)

    job, created = service.start(request(), OWNER)

    assert (job["task_arn"], created) == (arn, False)
    assert len(clock.sleeps) == 3
    assert tasks(aws) == []


@pytest.mark.parametrize("ago", [0, 5])
def test_a_launch_whose_launcher_died_is_taken_over_with_a_new_lease(aws, clock, service, ago):
    clock.now = float(int(clock.now))
    in_flight(aws, clock, launch_lease_until=int(clock.now) - ago)

    job, created = service.start(request(), OWNER)

    assert created is False
    assert job["task_arn"] in tasks(aws)
    assert clock.sleeps == []
    assert "launch_lease_until" not in record(aws)  # the task is recorded: no lease any more


def test_a_launch_in_flight_without_any_lease_is_taken_over_not_spun_on(aws, clock, service):
    # No writer leaves such a record today; if one did, a repeat must launch, never loop rereading it.
    in_flight(aws, clock)

    job, created = service.start(request(), OWNER)

    assert created is False
    assert job["task_arn"] in tasks(aws)


def test_a_takeover_renews_the_lease_before_its_run_task(aws, clock, service, monkeypatch):
    clock.now = float(int(clock.now))
    in_flight(aws, clock, launch_lease_until=int(clock.now) - 5)
    leases = []
    real = EcsTasks.run

    def run(self, *args, **kwargs):
        leases.append(int(record(aws)["launch_lease_until"]))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(EcsTasks, "run", run)

    service.start(request(), OWNER)

    assert leases == [int(clock.now) + factory.current_settings().launch_lease]


def test_a_takeover_that_loses_the_lease_to_another_repeat_waits_for_it(aws, clock, service, monkeypatch):
    clock.now = float(int(clock.now))
    in_flight(aws, clock, launch_lease_until=int(clock.now) - 5)
    real = JobStore.create

    def create(self, item):
        existing = real(self, item)
        # Another repeat takes the lease over between our read and our write.
        aws.table.update_item(
            Key=table_key(KEY),
            UpdateExpression="SET launch_lease_until = :l",
            ExpressionAttributeValues={":l": int(clock.now) + 30},
        )
        return existing

    monkeypatch.setattr(JobStore, "create", create)

    with pytest.raises(Throttled):
        service.start(request(), OWNER)

    assert tasks(aws) == []
    assert sum(clock.sleeps) == pytest.approx(5.0)  # it waited for the other repeat's launch


def test_a_repeat_of_a_job_that_could_not_start_is_refused_with_awss_reason(aws, clock, service):
    in_flight(aws, clock, state="FAILED", stopped_reason="ECS could not start the task: MISSING")
    aws.table.update_item(Key=table_key(KEY), UpdateExpression="REMOVE live")

    with pytest.raises(TaskStartFailed, match=r"^ECS could not start the task: MISSING$"):
        service.start(request(), OWNER)


def test_a_repeat_of_a_job_that_could_not_start_without_a_reason_says_so(aws, clock, service):
    in_flight(aws, clock, state="FAILED")

    with pytest.raises(TaskStartFailed, match=r"^the task could not be started$"):
        service.start(request(), OWNER)


def test_the_same_job_live_with_other_parameters_is_a_conflict_naming_its_state(aws, clock, service):
    in_flight(aws, clock, launch_lease_until=int(clock.now + 30), request_hash="another request")

    with pytest.raises(JobConflict) as caught:
        service.start(request(), OWNER)

    assert caught.value.message == (
        f"job {KEY} is already PROVISIONING with different parameters; "
        "stop it (cleanup) before starting it again"
    )


def test_a_record_of_another_owner_under_our_key_is_never_shared(aws, clock, service):
    in_flight(aws, clock, owner="arn:aws:iam::123456789012:user/someone-else")

    with pytest.raises(JobConflict, match=f"^job {KEY} cannot be recorded for this caller$"):
        service.start(request(), OWNER)


def test_a_new_attempt_starts_clean_with_the_new_requests_facts(aws, clock, service):
    old = record_key(OWNER, KEY)
    in_flight(
        aws,
        clock,
        state="STOPPED",
        attempt=3,
        request_hash="the previous request",
        task_arn="arn:aws:ecs:eu-west-1:123456789012:task/fargate-ci/old",
        stop_code="EssentialContainerExited",
        exit_code=1,
        stop_requested="CI job finished",
        expires_at=int(clock.now + 3600),
        ssh_ready_seconds=3,
    )
    aws.table.update_item(Key=table_key(KEY), UpdateExpression="REMOVE live")

    _, created = service.start(request(job_body(job_name="test", timeout_seconds=600)), OWNER)

    assert created is True
    item = record(aws)
    assert item[TABLE_KEY] == old
    assert int(item["attempt"]) == 4
    assert item["state"] == "PROVISIONING"
    assert item["live"] == "1"
    assert item["job_name"] == "test"
    assert int(item["deadline"]) == int(clock.now + 600 + factory.current_settings().grace_seconds)
    for gone in ("stop_code", "exit_code", "stop_requested", "expires_at", "ssh_ready_seconds"):
        assert gone not in item
    assert item["task_arn"] != "arn:aws:ecs:eu-west-1:123456789012:task/fargate-ci/old"


def test_two_new_attempts_racing_start_one(aws, clock, service, monkeypatch):
    in_flight(aws, clock, state="FAILED", attempt=1, request_hash="the previous request")
    real = JobStore.create

    def create(self, item):
        existing = real(self, item)
        aws.table.update_item(  # the other request's new attempt lands first
            Key=table_key(KEY), UpdateExpression="SET attempt = :a", ExpressionAttributeValues={":a": 2}
        )
        return existing

    monkeypatch.setattr(JobStore, "create", create)

    with pytest.raises(Throttled) as caught:
        service.start(request(), OWNER)

    assert caught.value.message == "the job is being restarted by another request; retry"
    assert caught.value.retry_after == 1
    assert tasks(aws) == []


def test_a_new_jobs_record_holds_its_request_owner_deadline_and_lease(aws, clock, service, monkeypatch):
    clock.now = float(int(clock.now))
    seen = []
    real = EcsTasks.run

    def run(self, *args, **kwargs):
        seen.append(record(aws))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(EcsTasks, "run", run)
    body = job_body(timeout_seconds=10**6, cpu=1024, memory=2048)

    job, created = service.start(request(body), OWNER)

    assert created is True
    before = seen[0]  # what the record held while RunTask ran
    s = factory.current_settings()
    assert before["state"] == "PROVISIONING" and before["live"] == "1" and int(before["attempt"]) == 1
    assert before["owner"] == OWNER
    assert int(before["launch_lease_until"]) == int(clock.now) + s.launch_lease
    assert int(before["deadline"]) == int(clock.now) + s.max_timeout + s.grace_seconds
    assert int(before["timeout_seconds"]) == s.max_timeout
    assert (int(before["cpu"]), int(before["memory"])) == (1024, 2048)
    for name in ("runner", "job_id", "project_id", "pipeline_id", "project_path", "job_name", "gitlab_url"):
        assert before[name] == body[name]
    assert before["task_definition"] == "ci-coordinator"
    assert before["platform_version"] == "LATEST"
    assert before["created_at"] == before["updated_at"] == before["heartbeat_at"]
    assert "ssh_host_key" not in before
    after = record(aws)
    assert after["task_arn"] == job["task_arn"]
    described = aws.ecs.describe_tasks(cluster=CLUSTER, tasks=[job["task_arn"]])["tasks"][0]
    assert after["last_status"] == described["lastStatus"]  # what RunTask answered
    assert "launch_lease_until" not in after


def test_a_repeat_of_an_attempt_whose_task_ran_and_failed_answers_with_the_job(aws, clock, service):
    arn = f"arn:aws:ecs:{REGION}:{ACCOUNT}:task/fargate-ci/0123456789abcdef0123456789abcdef"
    in_flight(aws, clock, state="FAILED", task_arn=arn, stop_code="EssentialContainerExited")

    job, created = service.start(request(), OWNER)

    assert (job["state"], job["task_arn"], created) == ("FAILED", arn, False)


def test_launch_metrics_name_what_happened(aws, clock, service, monkeypatch):
    from chalicelib import launch

    counted = []
    monkeypatch.setattr(launch, "count", lambda name, value=1, **d: counted.append((name, d.get("reason"))))

    service.start(request(), OWNER)

    def throttled(self, *args, **kwargs):
        raise Throttled("AWS is throttling ECS run_task; retry shortly", retry_after=2)

    monkeypatch.setattr(EcsTasks, "run", throttled)
    with pytest.raises(Throttled):
        service.start(request(job_body(job_id="6001")), OWNER)

    def refused(self, *args, **kwargs):
        raise TaskStartFailed("ECS could not start the task: MISSING")

    monkeypatch.setattr(EcsTasks, "run", refused)
    with pytest.raises(TaskStartFailed):
        service.start(request(job_body(job_id="6002")), OWNER)

    assert counted == [
        ("TasksStarted", None),
        ("TaskStartFailures", "Throttled"),
        ("TaskStartFailures", "TaskStartFailed"),
    ]


def test_a_launched_task_marks_the_record_updated_at_launch(aws, clock, service):
    clock.now = float(int(clock.now))
    in_flight(aws, clock, launch_lease_until=int(clock.now) - 5, updated_at="2000-01-01T00:00:00.000Z")

    service.start(request(), OWNER)

    assert record(aws)["updated_at"] == iso(clock.now)
