"""EventBridge "ECS Task State Change" events: check them, then hand the task's state to the service."""

from __future__ import annotations

from typing import Any

from chalicelib.observability import count, logger
from chalicelib.settings import Settings
from chalicelib.tasks import snapshot_from_ecs

_ARN = "arn:aws"


def handle_task_event(event: dict[str, Any], service: Any, settings: Settings) -> str:
    """Apply one event. Returns what happened: applied, dropped or ignored (never raises on bad input)."""
    detail = event.get("detail")
    if (
        event.get("source") != "aws.ecs"
        or event.get("detail-type") != "ECS Task State Change"
        or not isinstance(detail, dict)
        or not isinstance(detail.get("taskArn"), str)
        or not detail["taskArn"].startswith(_ARN)
        or not isinstance(detail.get("lastStatus"), str)
    ):
        count("EventsIgnored", reason="NotATaskStateChange")
        logger.warning("event ignored: not an ECS task state change", event_id=event.get("id"))
        return "ignored"
    if not _our_cluster(str(detail.get("clusterArn", "")), settings.cluster):
        count("EventsIgnored", reason="OtherCluster")
        return "ignored"
    try:
        snapshot = snapshot_from_ecs(detail, settings.container_name)
        snapshot.job_state()
    except (KeyError, TypeError, ValueError) as exc:
        count("EventsIgnored", reason="Malformed")
        logger.warning("event ignored: malformed detail", event_id=event.get("id"), error=str(exc))
        return "ignored"
    _, applied = service.apply_snapshot(snapshot)
    outcome = "applied" if applied else "dropped"
    count("EventsApplied" if applied else "EventsDropped")
    # Never log the event itself: its `overrides` carry the task's host key.
    logger.info(
        "task event " + outcome,
        task_arn=snapshot.task_arn,
        last_status=snapshot.last_status,
        version=snapshot.version,
        stop_code=snapshot.stop_code,
    )
    return outcome


def _our_cluster(cluster_arn: str, cluster: str) -> bool:
    return cluster_arn == cluster or cluster_arn.endswith(":cluster/" + cluster)
