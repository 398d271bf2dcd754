"""EventBridge "ECS Task State Change" events: check them, then hand the task's state to the service."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from chalicelib.observability import (
    EVENTS_APPLIED,
    EVENTS_IGNORED,
    EVENTS_STALE,
    EVENTS_UNKNOWN_TASK,
    count,
    logger,
)
from chalicelib.observe import APPLIED, STALE, UNKNOWN_TASK
from chalicelib.settings import Settings
from chalicelib.tasks import snapshot_from_ecs

if TYPE_CHECKING:
    from chalicelib.service import JobService

_ARN = "arn:aws"
_METRIC = {APPLIED: EVENTS_APPLIED, STALE: EVENTS_STALE, UNKNOWN_TASK: EVENTS_UNKNOWN_TASK}


def handle_task_event(event: dict[str, Any], service: JobService, settings: Settings) -> str:
    """Apply one event. Returns what happened: applied, stale, unknown-task or ignored (never raises on bad
    input). AWS may add fields at any time; unknown ones are ignored."""
    detail = event.get("detail")
    if (
        event.get("source") != "aws.ecs"
        or event.get("detail-type") != "ECS Task State Change"
        or not isinstance(detail, dict)
        or not isinstance(detail.get("taskArn"), str)
        or not detail["taskArn"].startswith(_ARN)
        or not isinstance(detail.get("lastStatus"), str)
    ):
        count(EVENTS_IGNORED, reason="NotATaskStateChange")
        logger.warning("event ignored: not an ECS task state change", event_id=event.get("id"))
        return "ignored"
    if detail.get("clusterArn") != service.cluster_arn():
        count(EVENTS_IGNORED, reason="OtherCluster")
        return "ignored"
    try:
        snapshot = snapshot_from_ecs(detail, settings.container_name)
        snapshot.job_state()
    except (KeyError, TypeError, ValueError) as exc:
        count(EVENTS_IGNORED, reason="Malformed")
        logger.warning("event ignored: malformed detail", event_id=event.get("id"), error=str(exc))
        return "ignored"
    _, outcome = service.apply_snapshot(snapshot)
    count(_METRIC[outcome])
    # Never log the event itself: its `overrides` carry the task's host key.
    logger.info(
        "task event " + outcome,
        task_arn=snapshot.task_arn,
        last_status=snapshot.last_status,
        version=snapshot.version,
        stop_code=snapshot.stop_code,
    )
    return outcome
