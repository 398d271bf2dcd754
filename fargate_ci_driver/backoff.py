"""When prepare looks again (pure: no clock, no I/O; `tests/unit/test_driver_backoff.py` checks every delay).

prepare's one readiness loop (`prepare.Prepare._wait_ready`) waits for two things, the task to run and its
sshd to take our key; this policy says how long each pause is and when to look at the API again.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """first, first * factor, ... up to cap (rounded to the microsecond, so the delays are exact values)."""

    first: float
    factor: float
    cap: float

    def delays(self) -> Iterator[float]:
        delay = self.first
        while True:
            yield round(min(delay, self.cap), 6)
            delay = min(delay * self.factor, self.cap)


@dataclass(frozen=True)
class Readiness:
    # Until the task runs, the API is polled from 50 ms, backing off to 1 s: a task that is quick to start is
    # seen at once, a slow one costs a handful of extra GETs.
    task: Backoff = Backoff(0.05, 1.25, 1.0)
    # Each time the task's status moves on (PENDING, RUNNING) before its host key is published, the polls
    # start again from 25 ms: the container's start is near, and its key comes within a moment of it (the
    # entrypoint publishes it first thing), so that moment is not lost in a long pause. About 7 GETs in the
    # first half second of each, then the same back-off to 1 s.
    task_moved: Backoff = Backoff(0.025, 1.25, 1.0)
    # Once it runs, sshd is tried from 200 ms, backing off to 1 s (the back-off restarts when it runs).
    ssh: Backoff = Backoff(0.2, 2.0, 1.0)
    # While sshd is not up yet, look at the job again this often in case the task died meanwhile.
    state_check_seconds: float = 5.0

    def pauses(self, running: bool, moved: bool = False) -> Iterator[float]:
        """`moved`: the task's status has just changed (and it is not ready for SSH yet)."""
        if running:
            return self.ssh.delays()
        return (self.task_moved if moved else self.task).delays()

    def look_at_api(self, running: bool, since_last_look: float) -> bool:
        """Whether the next look goes to the API too: every pause until the task runs, then now and then."""
        return not running or since_last_look >= self.state_check_seconds


READINESS = Readiness()
