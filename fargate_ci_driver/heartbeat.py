"""Telling the orchestrator a job is still being driven: at the start of a stage, then every [Job]
HeartbeatInterval while it runs (its reaper stops RUNNING jobs whose heartbeats stop).

Used by the session agent for the stages it serves and by `run` on its direct path. A daemon thread, never
waited for: it costs the stage nothing and can never fail it. Each beat names the job's attempt (from its
state file); when the orchestrator answers that the attempt is over (409 AttemptMismatch) or the job is not
ours (404), the beats stop for good.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from fargate_ci_driver.errors import ApiError, attempt_over
from fargate_ci_driver.logs import fields, log

if TYPE_CHECKING:
    from fargate_ci_driver.api import ApiClient

HEARTBEAT_TIMEOUT = 5.0


class Heartbeat:
    def __init__(
        self,
        api: Callable[[], ApiClient],
        key: str,
        attempt: int,
        interval: float,
        first_delay: float = 0.0,
        on_beat: Callable[[], None] | None = None,
        on_over: Callable[[str], None] | None = None,
    ) -> None:
        self.api = api
        self.key = key
        self.attempt = attempt
        self.on_over = on_over
        self.interval = interval
        # The session agent beats once per job and interval, not once per stage: a stage that starts soon
        # after the job's last beat waits for the rest of the interval.
        self.first_delay = first_delay
        self.on_beat = on_beat
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{key}", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def _beat(self) -> None:
        if self.first_delay > 0 and self._stop.wait(self.first_delay):
            return
        while True:  # the stage's first beat is sent even when the stage is already over
            try:
                self.api().heartbeat(self.key, attempt=self.attempt)
                if self.on_beat is not None:
                    self.on_beat()
            except ApiError as exc:
                if attempt_over(exc):
                    log.warning(
                        "the orchestrator says this attempt is over: no more heartbeats",
                        extra=fields(job_key=self.key, attempt=self.attempt, error=str(exc)),
                    )
                    self._stop.set()
                    if self.on_over is not None:
                        self.on_over(str(exc))
                    return
                log.debug("heartbeat failed", extra=fields(job_key=self.key, error=str(exc)))
            except Exception as exc:  # noqa: BLE001 - best effort: a heartbeat must never disturb the stage
                log.debug("heartbeat failed", extra=fields(job_key=self.key, error=str(exc)))
            if self._stop.wait(self.interval):
                return
