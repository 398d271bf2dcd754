"""One job's SSH connection as the session agent holds it: the connection, the attempt its heartbeats name,
and the counters the agent's housekeeping and `stats` read."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

TYPE_CHECKING = False
if TYPE_CHECKING:
    from fargate_ci_driver.ssh import TaskConnection


@dataclass
class JobSession:
    key: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    connection: TaskConnection | None = None
    fingerprint: tuple = ()
    # The attempt its state file names, which every heartbeat carries; `beats_over` once the orchestrator
    # said that attempt is over (409 AttemptMismatch, or 404).
    attempt: int | None = None
    beats_over: bool = False
    active: int = 0
    connections: int = 0
    stages: int = 0
    heartbeats: int = 0
    last_beat: float | None = None
    last_used: float = field(default_factory=time.monotonic)
    attempt: int = 1  # the job's attempt, as prepare recorded it: heartbeats name it

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None
