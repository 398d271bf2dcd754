"""What the ECS event handler tells the operator: its outcome, the `EventsIgnored`/`EventsApplied`... metrics
with their reasons (design.md "Events"), and one structured log line per event that an operator can query
by task, status, version and stop code, and that never carries the event itself (its overrides hold the
task's host key)."""

from __future__ import annotations

import json
import logging

import pytest

from chalicelib import events, factory
from chalicelib.events import handle_task_event
from tests.api.conftest import job_body, post
from tests.api.test_task_events import CLUSTER_ARN, task_event


@pytest.fixture
def counted(monkeypatch):
    seen: list[tuple[str, str | None]] = []
    real = events.count

    def count(name, value=1, **dimensions):
        seen.append((name, dimensions.get("reason")))
        return real(name, value, **dimensions)

    monkeypatch.setattr(events, "count", count)
    return seen


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.INFO, logger="fargate-ci")
    return caplog


def handle(event: dict) -> str:
    return handle_task_event(event, factory.job_service(), factory.current_settings())


@pytest.fixture
def started(client, aws):
    return json.loads(post(client, job_body()).body)


def warnings(logs) -> list[logging.LogRecord]:
    return [r for r in logs.records if r.name == "fargate-ci" and r.levelno == logging.WARNING]


@pytest.mark.parametrize(
    "spoil",
    [
        lambda e: e.update(source="aws.ec2"),
        lambda e: e.update({"detail-type": "ECS Container Instance State Change"}),
        lambda e: e.update(detail="not an object"),
        lambda e: e["detail"].update(taskArn=12345),
        lambda e: e["detail"].update(taskArn="task/fargate-ci/abc"),
        lambda e: e["detail"].pop("lastStatus"),
        lambda e: e["detail"].update(lastStatus=["RUNNING"]),
    ],
)
def test_anything_but_a_task_state_change_is_ignored_counted_and_logged_by_its_id(
    started, counted, logs, spoil
):
    event = task_event(started["task_arn"], "RUNNING", 3)
    event["id"] = "evt-odd"
    spoil(event)

    assert handle(event) == "ignored"

    assert counted == [("EventsIgnored", "NotATaskStateChange")]
    (record,) = warnings(logs)
    assert record.getMessage() == "event ignored: not an ECS task state change"
    assert record.event_id == "evt-odd"


def test_an_event_of_another_cluster_is_ignored_quietly(started, counted, logs):
    event = task_event(
        started["task_arn"], "RUNNING", 3, cluster_arn=CLUSTER_ARN.replace("fargate-ci", "other")
    )

    assert handle(event) == "ignored"

    assert counted == [("EventsIgnored", "OtherCluster")]
    assert warnings(logs) == []


def test_a_malformed_detail_is_ignored_counted_and_logged_with_why(started, counted, logs):
    event = task_event(started["task_arn"], "SPINNING", 3)
    event["id"] = "evt-bad"

    assert handle(event) == "ignored"

    assert counted == [("EventsIgnored", "Malformed")]
    (record,) = warnings(logs)
    assert record.getMessage() == "event ignored: malformed detail"
    assert record.event_id == "evt-bad"
    assert record.error == "unknown ECS task status 'SPINNING'"


def test_an_applied_event_is_counted_and_logged_by_task_status_version_and_stop_code(started, counted, logs):
    event = task_event(
        started["task_arn"], "STOPPED", 9, stopCode="SpotInterruption", stoppedReason="reclaimed"
    )
    event["detail"]["overrides"] = {
        "containerOverrides": [
            {"name": "ci-coordinator", "environment": [{"name": "SSH_HOST_KEY", "value": "SECRET"}]}
        ]
    }

    assert handle(event) == "applied"

    assert counted == [("EventsApplied", None)]
    (record,) = [r for r in logs.records if r.getMessage().startswith("task event ")]
    assert record.getMessage() == "task event applied"
    assert (record.task_arn, record.last_status, record.version, record.stop_code) == (
        started["task_arn"],
        "STOPPED",
        9,
        "SpotInterruption",
    )
    assert "SECRET" not in logs.text
    assert all("SECRET" not in json.dumps(vars(r), default=str) for r in logs.records)


def test_a_stale_event_and_one_for_an_unknown_task_are_counted_apart(started, counted, logs):
    handle(task_event(started["task_arn"], "RUNNING", 5))
    counted.clear()

    assert handle(task_event(started["task_arn"], "PENDING", 4)) == "stale"
    unknown = started["task_arn"].rsplit("/", 1)[0] + "/0123456789abcdef0123456789abcdef"
    assert handle(task_event(unknown, "STOPPED", 2, started_by="someone-else")) == "unknown-task"

    assert counted == [("EventsDroppedStale", None), ("EventsDroppedUnknownTask", None)]
    messages = [r.getMessage() for r in logs.records if r.getMessage().startswith("task event ")]
    assert messages[-2:] == ["task event stale", "task event unknown-task"]
