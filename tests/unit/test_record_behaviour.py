"""The small pure facts every use case reads: who the caller is (the job owner), what a record says about its
task, the orchestrator's clock format, and the error shape the API answers with."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from chalicelib import clock
from chalicelib.callers import owner_of
from chalicelib.errors import (
    AttemptMismatch,
    Forbidden,
    InvalidInput,
    JobNotFound,
    OrchestratorError,
    Throttled,
)
from chalicelib.record import check_attempt, claims_task, is_ours, present, ran
from chalicelib.tasks import TaskSnapshot

ARN = "arn:aws:ecs:eu-west-1:123456789012:task/ci/abc"


# -- the caller --------------------------------------------------------------------------------------------


def test_a_user_is_its_own_owner():
    assert owner_of({"userArn": "arn:aws:iam::123456789012:user/runner"}) == (
        "arn:aws:iam::123456789012:user/runner"
    )


def test_every_session_of_a_role_is_the_role():
    for session in ("botocore-session-1", "i-0abc"):
        assert owner_of({"userArn": f"arn:aws:sts::123456789012:assumed-role/runner-role/{session}"}) == (
            "arn:aws:sts::123456789012:assumed-role/runner-role"
        )
    assert owner_of({"userArn": "arn:aws-cn:sts::123456789012:assumed-role/r/s"}) == (
        "arn:aws-cn:sts::123456789012:assumed-role/r"
    )


def test_an_arn_that_only_looks_like_a_session_is_taken_whole():
    odd = "arn:aws:sts::123456789012:assumed-role/r/s/extra"
    assert owner_of({"userArn": odd}) == odd


@pytest.mark.parametrize(
    "identity", [None, {}, {"userArn": None}, {"userArn": ""}, {"userArn": "AIDA123"}, "x"]
)
def test_no_iam_identity_is_forbidden_with_how_to_sign(identity):
    with pytest.raises(Forbidden) as caught:
        owner_of(identity)

    assert caught.value.status == 403
    assert (
        caught.value.message
        == "the request carries no IAM identity; sign it with SigV4 (service execute-api)"
    )


# -- what a record says ------------------------------------------------------------------------------------


def test_a_live_record_claims_its_own_task_and_a_task_it_has_not_recorded_yet():
    assert claims_task({"state": "RUNNING", "task_arn": ARN}, ARN)
    assert claims_task({"state": "PROVISIONING"}, ARN)
    assert not claims_task({"state": "RUNNING", "task_arn": ARN + "x"}, ARN)


@pytest.mark.parametrize("state", ["STOPPED", "FAILED"])
def test_a_finished_or_missing_record_claims_no_task(state):
    assert not claims_task({"state": state, "task_arn": ARN}, ARN)
    assert not claims_task({"state": state}, ARN)
    assert not claims_task(None, ARN)


def test_only_the_current_attempt_may_act():
    check_attempt({"attempt": 2, "job_key": "k-1"}, 2)

    with pytest.raises(AttemptMismatch) as caught:
        check_attempt({"attempt": 2, "job_key": "k-1"}, 1)

    assert caught.value.status == 409
    assert caught.value.message == "attempt 1 of job k-1 is not its current attempt 2"


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ({"state": "PENDING", "started_at": "2026-01-01T00:00:00.000Z"}, True),
        ({"state": "RUNNING"}, True),
        ({"state": "STOPPING", "last_status": "RUNNING"}, True),
        ({"state": "STOPPING", "last_status": "DEACTIVATING"}, True),
        ({"state": "STOPPING", "last_status": "PENDING"}, False),
        ({"state": "PENDING", "started_at": ""}, False),
        ({"state": "FAILED"}, False),
    ],
)
def test_whether_a_record_shows_its_task_ran(item, expected):
    assert ran(item) is expected


def snapshot(started_by=None, tags=None) -> TaskSnapshot:
    return TaskSnapshot(
        task_arn=ARN,
        cluster_arn="c",
        last_status="RUNNING",
        desired_status="RUNNING",
        started_by=started_by,
        version=1,
        tags=tags or {},
    )


def test_a_task_is_ours_by_our_started_by_or_our_tag():
    key = "t3sT_1234-5005/" + "a" * 32
    assert is_ours(snapshot(started_by="gl-" + key))
    assert is_ours(snapshot(tags={"managed-by": "fargate-ci"}))
    assert not is_ours(snapshot(started_by="ecs-svc/1", tags={"managed-by": "other"}))
    assert not is_ours(snapshot())


def test_present_drops_only_missing_values():
    assert present(a=1, b=None, c=0, d="") == {"a": 1, "c": 0, "d": ""}


# -- the clock ---------------------------------------------------------------------------------------------


def test_times_are_iso_utc_with_milliseconds_and_read_back():
    moment = datetime(2026, 11, 29, 20, 0, 30, 123456, tzinfo=UTC).timestamp()

    assert clock.iso(moment) == "2026-11-29T20:00:30.123Z"
    assert clock.parse("2026-11-29T20:00:30.123Z") == pytest.approx(moment, abs=0.001)
    assert clock.parse("2026-11-29T20:00:30.123+00:00") == pytest.approx(moment, abs=0.001)
    assert clock.parse(datetime(2026, 11, 29, 20, 0, 30, tzinfo=UTC)) == moment - 0.123456
    assert clock.parse(12) == 12.0 and isinstance(clock.parse(12), float)
    assert clock.parse(None) is None and clock.parse("") is None


def test_times_are_utc_whatever_the_machines_zone(monkeypatch):
    import time

    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        assert clock.iso(0) == "1970-01-01T00:00:00.000Z"
    finally:
        monkeypatch.undo()
        time.tzset()


def test_the_clock_is_the_real_time():
    import time

    before = time.time()
    assert before <= clock.now() <= time.time()


# -- the API's error shape ---------------------------------------------------------------------------------


def test_every_refusal_has_the_designed_body_and_status():
    assert InvalidInput("bad cpu", field="cpu").body() == {
        "error": "InvalidInput",
        "message": "bad cpu",
        "field": "cpu",
    }
    assert JobNotFound("no job k-1").body() == {
        "error": "JobNotFound",
        "message": "no job k-1",
        "field": None,
    }
    assert (JobNotFound("x").status, Throttled("x").status, OrchestratorError("x").status) == (404, 503, 500)
    assert Throttled("slow", retry_after=2).retry_after == 2
    assert str(InvalidInput("bad cpu")) == "bad cpu"
