"""Driver diagnostics honour LogLevel, LogFormat and LogFile; the job log is separate (stdout)."""

from __future__ import annotations

import io
import json

from fargate_ci_driver import logs
from fargate_ci_driver.logs import fields, log


def test_json_lines_to_a_private_log_file(tmp_path):
    path = tmp_path / "driver.log"
    logs.setup("info", "json", str(path))
    log.debug("not at info level")
    log.info("task started", extra=fields(job_key="t3sT1234-1", task_arn="arn:aws:ecs:x"))
    logs.setup("warning", "text", None, io.StringIO())  # close the file handler
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert (entry["level"], entry["msg"], entry["job_key"], entry["task_arn"]) == (
        "info",
        "task started",
        "t3sT1234-1",
        "arn:aws:ecs:x",
    )
    assert path.stat().st_mode & 0o777 == 0o600


def test_text_is_logrus_like_on_stderr_and_warn_is_the_default_level():
    stream = io.StringIO()
    logs.setup(None, None, None, stream)
    log.info("hidden by default: stderr is the job log")
    log.warning("stop failed", extra=fields(job_key="k-1"))
    text = stream.getvalue()
    assert "hidden" not in text
    assert 'level=warning msg="stop failed" job_key="k-1"' in text
    assert text.startswith("time=")
