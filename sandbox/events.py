"""ECS "Task State Change" events in AWS's shape, delivered through moto's EventBridge (rule → SQS).

AWS delivers these at least once and not necessarily in order; the `events` fault makes that visible:
it drops the events of some statuses, duplicates every event, or swaps neighbours.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sandbox.layout import ACCOUNT_ID, REGION

log = logging.getLogger("sandbox.events")

SOURCE = "aws.ecs"
DETAIL_TYPE = "ECS Task State Change"


def iso(moment: datetime | None) -> str | None:
    """AWS's event timestamps: UTC, milliseconds, `Z`."""
    if moment is None:
        return None
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def drop_empty(values: dict[str, Any]) -> dict[str, Any]:
    """AWS leaves out the fields a task does not have yet."""
    return {key: value for key, value in values.items() if value is not None}


# DescribeTasks calls the task's ENI attachment "ElasticNetworkInterface"; events call it "eni" (AWS's
# example event, tests/fixtures/aws/task-state-change-running.json).
API_ENI_TYPE = "ElasticNetworkInterface"
EVENT_ENI_TYPE = "eni"


def as_event_detail(detail: dict[str, Any]) -> dict[str, Any]:
    """A task as DescribeTasks shows it (timestamps already ISO strings) → as its event's detail shows it."""
    attachments = [
        {**a, "type": EVENT_ENI_TYPE} if a.get("type") == API_ENI_TYPE else a
        for a in detail.get("attachments") or []
    ]
    return {**detail, "attachments": attachments} if "attachments" in detail else dict(detail)


def _epoch(stamp: str | None) -> float:
    if not stamp:
        return datetime.now(UTC).timestamp()
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


class EventFaults:
    """How one task's events misbehave (from its `events` faults)."""

    def __init__(
        self,
        drop: set[str] | None = None,
        duplicate: bool = False,
        reorder: bool = False,
        versionless_notice: bool = False,
    ) -> None:
        self.drop = drop or set()
        self.duplicate = duplicate
        self.reorder = reorder
        # AWS's published Spot termination notice has no `detail.version`: send it so, and deliver it again
        # (at least once) after the task's next event.
        self.versionless_notice = versionless_notice
        self._held: dict[str, Any] | None = None
        self._late: list[dict[str, Any]] = []

    def apply(self, detail: dict[str, Any], final: bool) -> list[dict[str, Any]]:
        """The events to deliver now, in order, for one state change."""
        if self.versionless_notice and detail.get("stopCode") == "TerminationNotice":
            notice = {k: v for k, v in detail.items() if k != "version"}
            self._late.append(notice)
            return [notice]
        late, self._late = self._late, []
        return [*self._misbehave(detail, final), *late]

    def _misbehave(self, detail: dict[str, Any], final: bool) -> list[dict[str, Any]]:
        if detail["lastStatus"] in self.drop:
            out: list[dict[str, Any]] = []
        else:
            out = [detail, detail] if self.duplicate else [detail]
        if self.reorder and out:
            if self._held is None and not final:
                self._held, out = out[0], out[1:]
            elif self._held is not None:
                out, self._held = [*out, self._held], None
        if final and self._held is not None:
            out, self._held = [*out, self._held], None
        return out


class EventBus:
    """One thread that puts events into moto's EventBridge in the order the tasks produced them."""

    def __init__(self, put_events: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> None:
        self._put_events = put_events
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="event-bus", daemon=True)
        self._thread.start()

    def publish(self, detail: dict[str, Any]) -> None:
        self._queue.put(as_event_detail(detail))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while (detail := self._queue.get()) is not None:
            entry = {
                "Source": SOURCE,
                "DetailType": DETAIL_TYPE,
                "Detail": json.dumps(detail),
                "Resources": [detail["taskArn"]],
                "Time": _epoch(detail.get("updatedAt")),
            }
            try:
                results = self._put_events([entry])
            except Exception:
                log.exception("put_events failed for %s %s", detail["taskArn"], detail["lastStatus"])
                continue
            failed = [r for r in results if r.get("ErrorCode")]
            if failed:
                log.error("put_events refused an event: %s", failed[0])
            else:
                # Only names and numbers: the detail's overrides hold the job's host key.
                log.info(
                    "event task=%s lastStatus=%s desiredStatus=%s version=%s",
                    detail["taskArn"].rsplit("/", 1)[-1],
                    detail["lastStatus"],
                    detail["desiredStatus"],
                    detail.get("version"),
                )


# What EventBridge hands a target; moto's default leaves out `account`. (`time` stays a number here:
# moto's SQS delivery turns it into AWS's ISO string.)
AWS_ENVELOPE = (
    '{"version": "0", "id": "<id>", "detail-type": "<detail-type>", "source": "<source>", '
    '"account": "<account>", "time": <time>, "region": "<region>", "resources": <resources>, '
    '"detail": <detail>}'
)


def moto_put_events(account_id: str = ACCOUNT_ID, region: str = REGION) -> Callable:
    """moto's own put_events, called in-process (one hop less, same rule matching and SQS delivery)."""
    from moto.events.models import events_backends
    from moto.events.utils import EventTemplateParser

    EventTemplateParser.DEFAULT_EVENT_INPUT_TEMPLATE = AWS_ENVELOPE

    return events_backends[account_id][region].put_events
