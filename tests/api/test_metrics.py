"""Every metric the orchestrator emits, asserted by name, dimension, unit and value from its EMF output (the
JSON lines powertools prints, which CloudWatch turns into metrics), and the Lambda context and per-job
correlation id on its log lines. Through the real app (chalice's test client), moto and the reaper.

EMF's shape (`_aws.CloudWatchMetrics[].{Namespace, Dimensions, Metrics[].{Name, Unit}}`, values as
top-level members): https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/CloudWatch_Embedded_Metric_Format_Specification.html
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass

import pytest

from chalicelib import clock, factory, observability
from chalicelib.jobs import record_key
from chalicelib.observability import logger
from chalicelib.reaper import run_reaper
from tests.api.conftest import OWNER, delete, heartbeat, job_body, post, set_fields, table_key
from tests.api.test_run_task_failures import ON_DEMAND, SPOT_FIRST, expect_run_task, no_capacity
from tests.api.test_run_task_failures import stubbed as stubbed  # the fixture: RunTask answers scripted
from tests.api.test_task_events import CLUSTER_ARN, deliver, task_event

NAMESPACE = "FargateCI"
SERVICE = {"service": "fargate-ci"}


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    value: float
    dimensions: tuple[tuple[str, str], ...]

    @property
    def dims(self) -> dict[str, str]:
        return dict(self.dimensions)


def parse_emf(text: str) -> list[Metric]:
    """The metrics in EMF documents among `text`'s lines (other lines are skipped)."""
    found = []
    for line in text.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if not isinstance(doc, dict) or "_aws" not in doc:
            continue
        assert isinstance(doc["_aws"]["Timestamp"], int)
        for directive in doc["_aws"]["CloudWatchMetrics"]:
            assert directive["Namespace"] == NAMESPACE
            names = [name for dimension_set in directive["Dimensions"] for name in dimension_set]
            dimensions = tuple(sorted((name, doc[name]) for name in names))
            for metric in directive["Metrics"]:
                values = doc[metric["Name"]]
                for value in values if isinstance(values, list) else [values]:
                    found.append(Metric(metric["Name"], metric["Unit"], value, dimensions))
    return found


@pytest.fixture
def emf(capsys):
    """Call it to get the metrics emitted since the last call. What earlier tests of this process counted
    outside a handler (services called directly) is still buffered: dropped, or the next flush shows it."""
    observability.metrics.clear_metrics()
    capsys.readouterr()
    return lambda: parse_emf(capsys.readouterr().out)


def named(metrics: list[Metric], name: str) -> list[Metric]:
    return [m for m in metrics if m.name == name]


def one(metrics: list[Metric], name: str, unit: str = "Count", **dimensions: str) -> Metric:
    """The single metric `name` with exactly these dimensions (besides `service`)."""
    matches = [m for m in named(metrics, name) if m.dims == {**SERVICE, **dimensions}]
    assert len(matches) == 1, f"{name} {dimensions}: {named(metrics, name)}"
    assert matches[0].unit == unit
    return matches[0]


def _job(client) -> dict:
    response = post(client, job_body())
    assert response.status_code == 201, response.body
    return json.loads(response.body)


def test_a_started_task_is_counted(client, aws, emf):
    _job(client)
    metric = one(emf(), "TasksStarted")
    assert metric.value == 1


def test_start_latency_is_the_time_from_the_request_to_the_task_running(client, aws, emf):
    job = _job(client)
    started_at = clock.iso(clock.parse(job["created_at"]) + 42.5)
    emf()
    deliver(client, task_event(job["task_arn"], "RUNNING", 3, startedAt=started_at))
    metrics = emf()
    assert one(metrics, "TaskStartLatency", unit="Seconds").value == pytest.approx(42.5, abs=0.01)
    assert one(metrics, "EventsApplied").value == 1
    # A duplicate is not a second start.
    deliver(client, task_event(job["task_arn"], "RUNNING", 3, startedAt=started_at))
    metrics = emf()
    assert not named(metrics, "TaskStartLatency")
    assert one(metrics, "EventsDroppedStale").value == 1


def test_ssh_ready_latency_comes_from_the_first_ready_heartbeat(client, aws, emf):
    job = _job(client)
    emf()
    assert heartbeat(client, job["job_key"], ssh_ready_seconds=1.25).status_code == 200
    assert one(emf(), "SshReadyLatency", unit="Seconds").value == 1.25
    assert heartbeat(client, job["job_key"], ssh_ready_seconds=9).status_code == 200
    assert not named(emf(), "SshReadyLatency")  # once per attempt


def test_events_dropped_and_ignored_are_counted_by_kind(client, aws, emf):
    job = _job(client)
    emf()
    other = task_event(job["task_arn"], "RUNNING", 3, cluster_arn=CLUSTER_ARN.replace("fargate-ci", "other"))
    deliver(client, other)
    deliver(client, task_event(job["task_arn"], "EXPLODED", 4))
    not_ours = task_event(job["task_arn"], "RUNNING", 5)
    not_ours["detail-type"] = "ECS Container Instance State Change"
    deliver(client, not_ours)
    stranger = task_event(
        job["task_arn"].replace(job["task_arn"].rsplit("/", 1)[1], "f" * 32),
        "STOPPED",
        2,
        started_by="someone",
    )
    deliver(client, stranger)
    metrics = emf()
    assert one(metrics, "EventsIgnored", reason="OtherCluster").value == 1
    assert one(metrics, "EventsIgnored", reason="Malformed").value == 1
    assert one(metrics, "EventsIgnored", reason="NotATaskStateChange").value == 1
    assert one(metrics, "EventsDroppedUnknownTask").value == 1


def test_the_reaper_counts_what_it_reaps_by_reason(client, aws, emf):
    late = _job(client)
    silent = json.loads(post(client, job_body("5006")).body)
    set_fields(aws, late["job_key"], state="RUNNING", last_status="RUNNING", deadline=int(time.time()) - 10)
    set_fields(
        aws,
        silent["job_key"],
        state="RUNNING",
        last_status="RUNNING",
        heartbeat_at=clock.iso(time.time() - 7200),
    )
    emf()
    run_reaper(factory.job_service(), factory.current_settings())
    metrics = emf()
    assert one(metrics, "TasksReaped", reason="Deadline").value == 1
    assert one(metrics, "TasksReaped", reason="HeartbeatLost").value == 1


def test_a_task_no_job_claims_and_a_finished_jobs_task_are_reaped_with_their_reason(client, aws, emf):
    job = _job(client)
    aws.table.delete_item(Key=table_key(job["job_key"]))
    emf()
    deliver(client, task_event(job["task_arn"], "RUNNING", 3))
    assert one(emf(), "TasksReaped", reason="NoJobRecord").value == 1

    finished = json.loads(post(client, job_body("5007")).body)
    set_fields(aws, finished["job_key"], state="STOPPED")
    started_by = "gl-" + record_key(OWNER, finished["job_key"])
    emf()
    deliver(client, task_event(finished["task_arn"], "RUNNING", 9, started_by=started_by))
    assert one(emf(), "TasksReaped", reason="JobFinished").value == 1


def test_cleanup_counts_the_stop(client, aws, emf):
    job = _job(client)
    emf()
    assert delete(client, job["job_key"]).status_code == 200
    assert one(emf(), "TasksStopped", reason="JobCleanup").value == 1


def test_api_errors_are_counted_by_code(client, aws, emf):
    assert client.http.get("/jobs/t3sT-404").status_code == 404
    assert client.http.get("/jobs?limit=0").status_code == 400
    metrics = emf()
    assert one(metrics, "ApiErrors", code="JobNotFound").value == 1
    assert one(metrics, "ApiErrors", code="InvalidInput").value == 1


def test_task_start_failures_are_counted_by_reason(client, aws, stubbed, emf):
    expect_run_task(stubbed, {"tasks": [], "failures": [{"arn": "x", "reason": "MISSING"}]}, SPOT_FIRST)
    assert post(client, job_body("6001")).status_code == 502
    expect_run_task(stubbed, no_capacity(), SPOT_FIRST)
    expect_run_task(stubbed, no_capacity(), ON_DEMAND)
    assert post(client, job_body("6002")).status_code == 503
    for _ in range(4):
        stubbed.add_client_error("run_task", service_error_code="ThrottlingException", http_status_code=400)
    assert post(client, job_body("6003")).status_code == 503
    stubbed.assert_no_pending_responses()
    metrics = emf()
    assert one(metrics, "TaskStartFailures", reason="TaskStartFailed").value == 1
    assert one(metrics, "TaskStartFailures", reason="NoCapacity").value == 1
    assert one(metrics, "TaskStartFailures", reason="Throttled").value == 1
    assert one(metrics, "ApiErrors", code="TaskStartFailed").value == 1
    assert one(metrics, "SpotFallbacks").value == 1  # Spot had none, so FARGATE was asked (and had none)
    assert not named(metrics, "TasksStarted")


@pytest.fixture
def log_lines():
    """The orchestrator's JSON log lines, as CloudWatch Logs would get them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logger.registered_formatter)
    logger.addHandler(handler)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    logger.removeHandler(handler)


def test_log_lines_carry_the_lambda_context_and_the_jobs_correlation_id(client, aws, log_lines):
    job = _job(client)
    deliver(client, task_event(job["task_arn"], "RUNNING", 3, startedAt=clock.iso(time.time())))
    assert client.http.get("/jobs/t3sT_1234-404").status_code == 404
    lines = log_lines()

    correlation = record_key(OWNER, job["job_key"])
    created = next(line for line in lines if line["message"] == "job created")
    assert created["correlation_id"] == correlation and created["job_key"] == job["job_key"]
    assert created["function_name"] and created["function_request_id"]
    assert isinstance(created["cold_start"], bool)
    assert created["api_request_id"]
    # The event's invocation names the same job the same way, under its own Lambda request id.
    event_lines = [line for line in lines if line.get("function_name") == "on_task_state_change"]
    assert event_lines, lines
    assert {line.get("correlation_id") for line in event_lines} == {correlation}
    assert {line["function_request_id"] for line in event_lines}.isdisjoint({created["function_request_id"]})
    # A later request about another job does not inherit the first one's keys.
    refused = next(line for line in lines if line["message"] == "request refused")
    assert refused["job_key"] == "t3sT_1234-404"
    assert refused["correlation_id"] == record_key(OWNER, "t3sT_1234-404")
    assert "task_arn" not in refused
    assert all("ssh_host_key" not in json.dumps(line) for line in lines)
