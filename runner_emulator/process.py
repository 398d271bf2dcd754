"""Running one driver exec the way GitLab Runner does, and reading its exit code the way it does.

Each exec gets its own process group (`Setpgid`), no stdin, cwd = the job's temp dir. When its context ends
(cancel, timeout) the group gets SIGTERM, then after graceful_kill_timeout SIGKILL, then after
force_kill_timeout the runner gives up on it (helpers/process/killer.go).
"""

from __future__ import annotations

import codecs
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

# Why an exec's context ended early.
CANCELED = "canceled"
TIMED_OUT = "timed_out"


@dataclass
class ExecResult:
    argv: list[str]
    returncode: int | None  # None: abandoned after SIGKILL (the runner's KillProcessError)
    stopped_by: str | None = None  # CANCELED / TIMED_OUT when the runner killed it
    stdout: bytes = b""  # only when captured (config_exec)


class Interrupt:
    """What can end a running exec early: the job being cancelled. Each exec also has its own deadline."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._wake: list[threading.Event] = []
        self._lock = threading.Lock()

    def set(self) -> None:
        with self._lock:
            self._event.set()
            for wake in self._wake:
                wake.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def watch(self, wake: threading.Event) -> None:
        with self._lock:
            self._wake.append(wake)
            if self._event.is_set():
                wake.set()

    def unwatch(self, wake: threading.Event) -> None:
        with self._lock:
            if wake in self._wake:
                self._wake.remove(wake)


def run_exec(
    argv: list[str],
    env: dict[str, str],
    cwd: str,
    deadline: float | None,
    output: Callable[[str], None],
    interrupts: tuple[Interrupt, ...] = (),
    graceful_kill_timeout: float = 600.0,
    force_kill_timeout: float = 10.0,
    capture_stdout: bool = False,
) -> ExecResult:
    """Run one exec to completion or until its deadline (time.monotonic()) passes or an interrupt fires."""
    try:
        process = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            process_group=0,
        )
    except OSError as exc:
        output(f"ERROR: cannot start {argv[0]}: {exc}\n")
        return ExecResult(argv, returncode=-1)
    captured: list[bytes] = []
    readers = [
        threading.Thread(target=_pump, args=(process.stderr, output, None), daemon=True),
        threading.Thread(
            target=_pump, args=(process.stdout, output, captured if capture_stdout else None), daemon=True
        ),
    ]
    for reader in readers:
        reader.start()
    done = threading.Event()
    threading.Thread(target=lambda: (process.wait(), done.set()), daemon=True).start()
    for interrupt in interrupts:
        interrupt.watch(done)
    stopped_by = None
    try:
        while not done.is_set():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                stopped_by = TIMED_OUT
                break
            done.wait(remaining)
            if process.poll() is None and any(i.is_set() for i in interrupts):
                stopped_by = CANCELED
                break
    finally:
        for interrupt in interrupts:
            interrupt.unwatch(done)
    returncode = process.poll()
    if returncode is None:
        returncode = _kill(process, graceful_kill_timeout, force_kill_timeout)
    for reader in readers:
        # A grandchild that kept the pipes open must not hang the runner forever.
        reader.join(timeout=5.0)
    return ExecResult(argv, returncode, stopped_by, b"".join(captured))


def _kill(process: subprocess.Popen, graceful: float, force: float) -> int | None:
    for signum, wait in ((signal.SIGTERM, graceful), (signal.SIGKILL, force)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)
        try:
            return process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return None


def _pump(stream: BinaryIO, output: Callable[[str], None], capture: list[bytes] | None) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    while chunk := stream.read1(65536):
        if capture is not None:
            capture.append(chunk)
        else:
            output(decoder.decode(chunk))
    if capture is None:
        tail = decoder.decode(b"", final=True)
        if tail:
            output(tail)
    stream.close()


# --- exit codes (executors/custom/command/command.go) ---


@dataclass(frozen=True)
class Failure:
    """A failed exec as the runner sees it. `build_error` failures are the job's fault (script_failure) and
    stop prepare retries; all others are system failures."""

    message: str
    build_error: bool = False
    exit_code: int | None = None
    stopped_by: str | None = None


def classify(result: ExecResult, build_code: int, system_code: int, exit_code_file: str) -> Failure | None:
    if result.returncode == 0 and result.stopped_by is None:
        return None
    if result.returncode is None:
        return Failure(
            f"failed to kill {result.argv[0]}, likely process is dormant", stopped_by=result.stopped_by
        )
    code = result.returncode
    if code == 0:  # it exited cleanly, but only after the runner told it to stop
        return Failure(f"stopped ({result.stopped_by})", stopped_by=result.stopped_by)
    if code == build_code:
        try:
            with open(exit_code_file, encoding="utf-8") as f:
                first = f.readline().strip()
        except FileNotFoundError:
            return Failure("exit status 1", build_error=True, exit_code=1, stopped_by=result.stopped_by)
        try:
            status = int(first)
        except ValueError:
            return Failure(
                f"unknown Custom executor executable exit code {code}; executable execution terminated with "
                f"BUILD_EXIT_CODE_FILE content {first!r}",
                stopped_by=result.stopped_by,
            )
        return Failure(
            f"exit status {status}", build_error=True, exit_code=status, stopped_by=result.stopped_by
        )
    if code == system_code:
        return Failure(f"exit status {code}", stopped_by=result.stopped_by)
    if code < 0:
        return Failure(f"signal: {signal.Signals(-code).name}", stopped_by=result.stopped_by)
    return Failure(f"unknown Custom executor executable exit code {code}", stopped_by=result.stopped_by)
