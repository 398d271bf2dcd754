"""`fargate-driver --config F status [--all] [--json] [--since S]`: the operator's view of this runner
manager's jobs (its IAM identity's, GET /jobs is owner-scoped), as a table or a JSON list.

Not a custom-executor stage: no job, no state files, no session agent. One signed call per page.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TextIO

from fargate_ci_driver.api import ApiClient
from fargate_ci_driver.errors import ApiError, ConfigError
from fargate_ci_driver.settings import Settings

PAGE_SIZE = 100
# 50 pages of 100: far more than a runner manager has running; a table that long says "use --since".
MAX_PAGES = 50
# What --json gives for every job: the API's job view as it is (design.md "HTTP API", the job view).
COLUMNS = (
    ("JOB KEY", "job_key"),
    ("PROJECT", "project"),
    ("STATE", "state"),
    ("AGE", "age"),
    ("TASK", "task"),
    ("ADDRESS", "address"),
    ("CAPACITY", "capacity_provider"),
    ("STOP REASON", "stop_reason"),
)
_DURATION = re.compile(r"(\d{1,6})([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def since_instant(value: str, now: float) -> str:
    """`--since`: a duration back from now (90s, 30m, 2h, 7d) or an ISO 8601 UTC time, as the API takes it."""
    match = _DURATION.fullmatch(value.strip())
    if match:
        then = now - int(match[1]) * _UNITS[match[2]]
        return datetime.fromtimestamp(then, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        parsed = None
    if parsed is None or parsed.utcoffset() is None:
        raise ConfigError(
            f"--since {value!r}: give a duration (30m, 2h, 7d) or a UTC time (2026-12-01T08:00:00Z)"
        )
    return parsed.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def fetch_jobs(api: ApiClient, *, live: bool | None, since: str | None) -> list[dict]:
    """Every page of the caller's jobs, newest first."""
    jobs: list[dict] = []
    cursor = None
    for _ in range(MAX_PAGES):
        page = api.list_jobs(live=live, since=since, limit=PAGE_SIZE, cursor=cursor)
        listed = page.get("jobs")
        if not isinstance(listed, list):
            raise ApiError(200, "BadResponse", "GET /jobs: the answer has no list of jobs")
        jobs.extend(job for job in listed if isinstance(job, dict))
        cursor = page.get("next_cursor")
        if not cursor:
            break
    return jobs


def age(created_at: str | None, now: float) -> str:
    """`5s`, `3m`, `2h05m`, `3d04h`: how long ago the job was created."""
    if not created_at:
        return "-"
    try:
        created = datetime.fromisoformat(created_at.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return "-"
    seconds = max(0, int(now - created))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def row(job: dict, now: float) -> dict[str, str]:
    """One job as the table shows it."""
    task_arn = job.get("task_arn") or ""
    values = {
        "job_key": job.get("job_key"),
        "project": job.get("project_path") or job.get("project_id"),
        "state": job.get("state"),
        "age": age(job.get("created_at"), now),
        "task": task_arn.rsplit("/", 1)[-1][:12] if task_arn else None,
        "address": job.get("address"),
        "capacity_provider": job.get("capacity_provider"),
        "stop_reason": job.get("stopped_reason") or job.get("stop_code"),
    }
    # One line per job whatever a field holds (a stop reason is AWS's free text).
    return {k: " ".join(str(v).split()) if v not in (None, "") else "-" for k, v in values.items()}


def render_table(jobs: Sequence[dict], now: float) -> str:
    rows = [row(job, now) for job in jobs]
    widths = [max([len(title)] + [len(r[name]) for r in rows]) for title, name in COLUMNS]
    lines = []
    for cells in [[title for title, _ in COLUMNS]] + [[r[name] for _, name in COLUMNS] for r in rows]:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip())
    return "\n".join(lines) + "\n"


def status(
    settings: Settings,
    out: TextIO,
    *,
    show_all: bool = False,
    as_json: bool = False,
    since: str | None = None,
    now: Callable[[], float] = time.time,
) -> None:
    """Print the caller's jobs: live ones, or with `show_all` the finished ones the table still keeps too."""
    api = ApiClient(
        settings.orchestrator_url,
        settings.region,
        profile=settings.profile,
        credentials_file=settings.credentials_file,
        timeout=settings.api_timeout,
    )
    started = now()
    try:
        jobs = fetch_jobs(
            api, live=None if show_all else True, since=since_instant(since, started) if since else None
        )
    except ApiError as exc:
        if exc.status == 403:
            who = f"profile {settings.profile!r}" if settings.profile else "botocore's default credentials"
            raise ApiError(
                exc.status,
                exc.code,
                f"the orchestrator at {settings.orchestrator_url} refused the credentials of {who}: "
                f"{exc.message}",
            ) from None
        raise
    if as_json:
        out.write(json.dumps(jobs, indent=2) + "\n")
    elif jobs:
        out.write(render_table(jobs, started))
    else:
        out.write("no live jobs\n" if not show_all else "no jobs\n")
    out.flush()
