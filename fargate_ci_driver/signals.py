"""SIGTERM (and SIGINT) from the runner: cancel, job timeout or runner shutdown.

The first signal raises `Cancelled` in the main thread, wherever it is blocked, so each stage unwinds through
its own clean-up path (stop the task, kill the remote stage). Later signals are ignored: that clean-up must
finish, and the runner follows up with SIGKILL if it takes too long.
"""

from __future__ import annotations

import signal
import threading

from fargate_ci_driver.errors import Cancelled

_cancelled = threading.Event()


def install() -> None:
    _cancelled.clear()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _on_signal)


def cancelled() -> bool:
    return _cancelled.is_set()


def _on_signal(signum: int, _frame: object) -> None:
    if _cancelled.is_set():
        return
    _cancelled.set()
    raise Cancelled(f"received {signal.Signals(signum).name} from the runner (job cancelled or timed out)")
