"""The metrics an operator's dashboards and alarms read, in CloudWatch's embedded metric format: namespace,
dimensions, units and values as emitted."""

from __future__ import annotations

import json

import pytest

from chalicelib.observability import count, metrics, seconds


@pytest.fixture(autouse=True)
def clean_metrics():
    metrics.clear_metrics()
    yield
    metrics.clear_metrics()


def test_counters_and_latencies_share_the_services_metric_set():
    seconds("SshReadyLatency", 1.23456)
    count("TasksStarted")
    count("TasksStarted", 2)

    emitted = metrics.serialize_metric_set()

    (definition,) = emitted["_aws"]["CloudWatchMetrics"]
    assert definition["Namespace"] == "FargateCI"
    assert definition["Dimensions"] == [["service"]]
    assert {m["Name"]: m["Unit"] for m in definition["Metrics"]} == {
        "SshReadyLatency": "Seconds",
        "TasksStarted": "Count",
    }
    assert emitted["service"] == "fargate-ci"
    assert emitted["SshReadyLatency"] == [1.235]
    assert emitted["TasksStarted"] == [1.0, 2.0]


def test_a_counter_with_a_reason_is_its_own_metric_emitted_at_once(capsys):
    count("TasksReaped", reason="Deadline")

    emitted = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    (definition,) = emitted["_aws"]["CloudWatchMetrics"]
    assert definition["Namespace"] == "FargateCI"
    assert definition["Dimensions"] == [["service", "reason"]]
    assert definition["Metrics"] == [{"Name": "TasksReaped", "Unit": "Count"}]
    assert (emitted["service"], emitted["reason"], emitted["TasksReaped"]) == (
        "fargate-ci",
        "Deadline",
        [1.0],
    )
    assert "TasksReaped" not in metrics.metric_set  # not added to the shared set as well


def test_a_dimension_value_is_cut_to_what_cloudwatch_takes(capsys):
    count("ApiErrors", 3, code="x" * 300)

    emitted = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert emitted["code"] == "x" * 250
    assert emitted["ApiErrors"] == [3.0]
