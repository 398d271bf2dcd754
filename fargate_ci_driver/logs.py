"""Two outputs. The job log (stdout, which the runner shows in the job's page) gets concise progress lines;
driver diagnostics go to stderr or [LogFile], at [LogLevel], as text or JSON ([LogFormat]).

Neither ever carries a private key, a job token or a request body: call sites log names, ARNs and states only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TextIO

LOGGER_NAME = "fargate_driver"
LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
    "panic": logging.CRITICAL,
}
# Diagnostics on stderr land in the job log; by default only what a job author should see.
DEFAULT_LEVEL = "warning"

log = logging.getLogger(LOGGER_NAME)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """logrus-like `time=... level=... msg=... key=value`, as the Go driver wrote."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))
        parts = [
            f"time={stamp}",
            f"level={record.levelname.lower()}",
            f"msg={json.dumps(record.getMessage())}",
        ]
        parts += [f"{k}={json.dumps(v, default=str)}" for k, v in getattr(record, "fields", {}).items()]
        text = " ".join(parts)
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class SimpleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        fields = getattr(record, "fields", {})
        if fields:
            text += " (" + ", ".join(f"{k}={v}" for k, v in fields.items()) + ")"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup(level: str | None, fmt: str | None, log_file: str | None, stderr: TextIO = sys.stderr) -> None:
    """Configure the driver's logger. Raises OSError if the log file cannot be opened."""
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    if log_file:
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        handler: logging.Handler = logging.StreamHandler(os.fdopen(fd, "a", encoding="utf-8"))
    else:
        handler = logging.StreamHandler(stderr)
    handler.setFormatter(
        {"json": JsonFormatter(), "text_simple": SimpleFormatter()}.get(fmt or "", TextFormatter())
    )
    log.addHandler(handler)
    log.setLevel(LEVELS[(level or DEFAULT_LEVEL).lower()])
    log.propagate = False


def fields(**values: object) -> dict:
    """`log.info("task started", extra=fields(job_key=..., task_arn=...))`."""
    return {"fields": values}


# GitLab Runner's own job-log colours (helpers/ansi_colors.go; common/build_logger.go prints warnings as
# ANSI_BOLD_YELLOW + "WARNING: " ... ANSI_RESET and errors as ANSI_BOLD_RED + "ERROR: " ... ANSI_RESET).
ANSI_BOLD_RED = "\033[31;1m"
ANSI_BOLD_YELLOW = "\033[33;1m"
ANSI_RESET = "\033[0;m"
ANSI_CLEAR = "\033[0K"
# A section name GitLab accepts (docs "Custom collapsible sections": letters, digits, _ . -).
_SECTION_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")


def section_start(name: str, header: str, *, collapsed: bool = True, now: float | None = None) -> str:
    r"""GitLab's collapsible-section start marker and header (docs "CI/CD job logs", gitlab-runner
    helpers/build_section.go): `\e[0Ksection_start:<unix>:<name>[collapsed=true]\r\e[0K<header>`."""
    if not _SECTION_NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a job-log section name")
    options = "[collapsed=true]" if collapsed else ""
    stamp = int(time.time() if now is None else now)
    return f"{ANSI_CLEAR}section_start:{stamp}:{name}{options}\r{ANSI_CLEAR}{header}"


def section_end(name: str, *, now: float | None = None) -> str:
    stamp = int(time.time() if now is None else now)
    return f"{ANSI_CLEAR}section_end:{stamp}:{name}\r{ANSI_CLEAR}"


def warning_line(text: str) -> str:
    """A warning as GitLab Runner prints its own: bold yellow, `WARNING: ` first."""
    body = text if text.startswith("WARNING: ") else "WARNING: " + text
    return f"{ANSI_BOLD_YELLOW}{body}{ANSI_RESET}"


def error_line(text: str) -> str:
    """An error as GitLab Runner prints its own: bold red, `ERROR: ` first."""
    body = text if text.startswith("ERROR: ") else "ERROR: " + text
    return f"{ANSI_BOLD_RED}{body}{ANSI_RESET}"


class JobLog:
    """Progress lines for the job log (stdout), flushed at once so the runner streams them. Thread-safe: the
    progress ticker (`keep_alive`) writes from its own thread."""

    def __init__(self, stream: TextIO = sys.stdout) -> None:
        self.stream = stream
        self.started = time.monotonic()
        self.last_write = self.started
        self._lock = threading.Lock()
        self._section: str | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def say(self, text: str) -> None:
        with self._lock:
            self.stream.write(text + "\n")
            self.stream.flush()
            self.last_write = time.monotonic()

    def warning(self, text: str) -> None:
        self.say(warning_line(text))

    def error(self, text: str) -> None:
        self.say(error_line(text))

    def open_section(self, name: str, header: str) -> None:
        """Start a collapsed section (closing one still open: sections here do not nest)."""
        self.close_section()
        self.say(section_start(name, header))
        self._section = name

    def close_section(self) -> None:
        """End the open section, if any (idempotent: failure paths call it before their reasons, so those
        are not hidden in a collapsed section)."""
        name, self._section = self._section, None
        if name is not None:
            self.say(section_end(name))

    @contextlib.contextmanager
    def keep_alive(self, status: Callable[[], str], every: float = 10.0) -> Iterator[None]:
        """While the block runs, a line from `status()` whenever the log has been quiet for `every` seconds,
        so a long wait (Fargate provisioning, an image pull) shows it is alive: GitLab shows nothing new
        otherwise, and people cancel jobs that look stuck."""
        done = threading.Event()

        def tick() -> None:
            while not done.wait(min(1.0, every)):
                if time.monotonic() - self.last_write >= every:
                    try:
                        self.say(status())
                    except Exception:  # a progress line must never break prepare
                        log.debug("progress line failed", exc_info=True)

        thread = threading.Thread(target=tick, name="job-log-keep-alive", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
