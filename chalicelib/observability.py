"""Structured logs and metrics (powertools), created once for the whole orchestrator.

Logs: every line of an invocation carries the Lambda context (function name and request id, cold start) and,
once a job is known, `job_key`, `task_arn` and `correlation_id`: the job's record key, the same in every
invocation that touches the job (POST, GET, heartbeats, DELETE, its task's events, the reaper), so one
CloudWatch Logs Insights filter follows a job through all of them. The record key names no secret (it is
the task's `startedBy` already).

Metrics: CloudWatch embedded metric format (EMF) on stdout, namespace `FargateCI`, dimension `service`, plus
the dimension a counter names (`reason`, `code`). tests/api/test_metrics.py asserts each from its EMF output.

Tracing: none (design.md "Observability": RunTask and DynamoDB are tens of milliseconds against a minute
of Fargate provisioning that no trace can see; the start latency metrics measure what matters).
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit, single_metric

SERVICE = "fargate-ci"
NAMESPACE = "FargateCI"

# What became of an ECS Task State Change event (design.md "Events").
EVENTS_APPLIED = "EventsApplied"  # the job record took it
EVENTS_STALE = "EventsDroppedStale"  # older than, or a duplicate of, what the record already shows
EVENTS_UNKNOWN_TASK = "EventsDroppedUnknownTask"  # no job record stands for the event's task
EVENTS_IGNORED = "EventsIgnored"  # not ours or malformed (dimension `reason`)

# Keys that belong to one job: dropped at the start of every invocation (a warm Lambda keeps the logger).
JOB_KEYS = ["job_key", "task_arn", "correlation_id"]

logger = Logger(service=SERVICE)
metrics = Metrics(namespace=NAMESPACE, service=SERVICE)
_cold = [True]


def begin_invocation(context: Any, *, request_id: str | None = None) -> None:
    """Start an invocation's logs: forget the previous one's job, add this one's Lambda context (and, for an
    API call, API Gateway's request id)."""
    logger.remove_keys([*JOB_KEYS, "api_request_id"])
    fields: dict[str, Any] = {"cold_start": _cold[0]}
    _cold[0] = False
    for key, attribute in (
        ("function_name", "function_name"),
        ("function_request_id", "aws_request_id"),
        ("function_arn", "invoked_function_arn"),
        ("function_memory_size", "memory_limit_in_mb"),
    ):
        value = getattr(context, attribute, None)
        if value not in (None, ""):
            fields[key] = value
    if request_id:
        fields["api_request_id"] = request_id
    logger.append_keys(**fields)


def for_job(record_key: str, job_key: str, task_arn: str | None = None) -> None:
    """From here on this invocation's lines are about this job (its record key is the correlation id)."""
    logger.append_keys(job_key=job_key, correlation_id=record_key)
    if task_arn:
        logger.append_keys(task_arn=task_arn)


def count(name: str, value: float = 1, **dimensions: str) -> None:
    """Add a counter. With dimensions (e.g. reason=...) it is its own metric set, flushed at once."""
    if not dimensions:
        metrics.add_metric(name=name, unit=MetricUnit.Count, value=value)
        return
    with single_metric(name=name, unit=MetricUnit.Count, value=value, namespace=NAMESPACE) as metric:
        metric.add_dimension(name="service", value=SERVICE)
        for key, dim in dimensions.items():
            metric.add_dimension(name=key, value=dim[:250])


def seconds(name: str, value: float) -> None:
    metrics.add_metric(name=name, unit=MetricUnit.Seconds, value=round(value, 3))
