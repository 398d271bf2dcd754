"""The orchestrator's structured log lines an operator searches for (CloudWatch Logs Insights on `message`
and its keys): jobs created and restarted, tasks started, stopped, already gone and reaped, and the reaper's
summary. Each names the job's task so one query follows a job."""

from __future__ import annotations

import io
import json
import logging
import time

import pytest

from chalicelib import clock, ecs, factory
from chalicelib.errors import TaskNotFound
from chalicelib.reaper import run_reaper
from tests.api.conftest import delete, job_body, post, table_key


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.INFO, logger="fargate-ci")
    return caplog


def lines(logs, message: str) -> list[logging.LogRecord]:
    return [r for r in logs.records if r.name == "fargate-ci" and r.getMessage() == message]


def test_a_new_job_and_its_task_are_logged_with_attempt_and_task_definition(client, aws, logs):
    job = json.loads(post(client, job_body()).body)

    (created,) = lines(logs, "job created")
    assert created.attempt == 1
    (started,) = lines(logs, "task started")
    assert (started.task_definition, started.attempt, started.levelno) == ("ci-coordinator", 1, logging.INFO)
    assert job["task_arn"]


def test_a_new_attempt_is_logged_with_its_number(client, aws, logs):
    job = json.loads(post(client, job_body()).body)
    delete(client, job["job_key"])
    aws.table.update_item(
        Key=table_key(job["job_key"]),
        UpdateExpression="SET #s = :s REMOVE live",
        ExpressionAttributeNames={"#s": "state"},
        ExpressionAttributeValues={":s": "STOPPED"},
    )

    post(client, job_body())

    (restarted,) = lines(logs, "job attempt started")
    assert restarted.attempt == 2


def test_a_stop_is_logged_with_the_task_and_reason(client, aws, logs):
    job = json.loads(post(client, job_body()).body)

    delete(client, job["job_key"], reason="pipeline cancelled")

    (stopped,) = lines(logs, "task stop requested")
    assert (stopped.task_arn, stopped.reason) == (job["task_arn"], "pipeline cancelled")


def test_a_stop_of_a_task_ecs_no_longer_knows_is_logged_as_gone(client, aws, logs, monkeypatch):
    job = json.loads(post(client, job_body()).body)

    def gone(self, arn, reason):
        raise TaskNotFound(f"task {arn} is not known to ECS")

    monkeypatch.setattr(ecs.EcsTasks, "stop", gone)

    response = delete(client, job["job_key"])

    assert response.status_code == 200
    (line,) = lines(logs, "task already gone")
    assert line.task_arn == job["task_arn"]
    assert lines(logs, "task stop requested") == []


def test_a_reaped_task_and_the_reapers_summary_are_logged(client, aws, logs):
    job = json.loads(post(client, job_body(timeout_seconds=3600)).body)
    aws.table.update_item(
        Key=table_key(job["job_key"]),
        UpdateExpression="SET heartbeat_at = :h",
        ExpressionAttributeValues={":h": clock.iso(time.time() + 3 * 3600)},
    )

    # The job's keys are the logger's (observability.for_job), so only a formatted line has them: format
    # each line as it is emitted, with the app's own JSON formatter.
    from chalicelib.observability import logger

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logger.registered_formatter)
    logging.getLogger("fargate-ci").addHandler(handler)
    try:
        report = run_reaper(factory.job_service(), factory.current_settings(), now=time.time() + 2 * 3600)
    finally:
        logging.getLogger("fargate-ci").removeHandler(handler)

    printed = [json.loads(x) for x in out.getvalue().splitlines()]
    (reaped,) = [x for x in printed if x.get("message") == "task reaped"]
    assert (reaped["job_key"], reaped["task_arn"]) == (job["job_key"], job["task_arn"])
    assert reaped["reason"] == "CI job passed its deadline (job timeout plus grace)"
    (summary,) = lines(logs, "reaper finished")
    assert summary.tasks_stopped_Deadline == 1 == report["tasks_stopped_Deadline"]
    assert summary.jobs_checked == report["jobs_checked"]
