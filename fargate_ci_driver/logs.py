"""Two outputs. The job log (stdout, which the runner shows in the job's page) gets concise progress lines;
driver diagnostics go to stderr or [LogFile], at [LogLevel], as text or JSON ([LogFormat]).

Neither ever carries a private key, a job token or a request body: call sites log names, ARNs and states only.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
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


class JobLog:
    """Progress lines for the job log (stdout), flushed at once so the runner streams them."""

    def __init__(self, stream: TextIO = sys.stdout) -> None:
        self.stream = stream
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def say(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()
