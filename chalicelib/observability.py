"""Structured logs and metrics (powertools), created once for the whole orchestrator."""

from __future__ import annotations

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit, single_metric

SERVICE = "fargate-ci"
NAMESPACE = "FargateCI"

# What became of an ECS Task State Change event (design.md "Events").
EVENTS_APPLIED = "EventsApplied"  # the job record took it
EVENTS_STALE = "EventsDroppedStale"  # older than, or a duplicate of, what the record already shows
EVENTS_UNKNOWN_TASK = "EventsDroppedUnknownTask"  # no job record stands for the event's task
EVENTS_IGNORED = "EventsIgnored"  # not ours or malformed (dimension `reason`)

logger = Logger(service=SERVICE)
metrics = Metrics(namespace=NAMESPACE, service=SERVICE)


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
