"""`fargate-driver status`'s pure parts (ages, --since, the table, paging) and its command line; the whole
command against the sandbox is tests/e2e/test_status.py."""

from __future__ import annotations

import ast
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fargate_ci_driver import cli
from fargate_ci_driver.errors import ApiError, ConfigError
from fargate_ci_driver.status import age, fetch_jobs, render_table, row, since_instant

NOW = datetime(2026, 12, 2, 8, 0, 0, tzinfo=UTC).timestamp()
DRIVER = Path(cli.__file__).parent


@pytest.mark.parametrize(
    ("created", "shown"),
    [
        ("2026-12-02T07:59:55.000Z", "5s"),
        ("2026-12-02T07:57:00.000Z", "3m"),
        ("2026-12-02T05:55:00.000Z", "2h05m"),
        ("2026-11-29T04:00:00.000Z", "3d04h"),
        ("2026-12-02T08:00:30.000Z", "0s"),  # a clock a little ahead is not a negative age
        (None, "-"),
        ("not a time", "-"),
    ],
)
def test_age(created, shown):
    assert age(created, NOW) == shown


@pytest.mark.parametrize(
    ("value", "instant"),
    [
        ("90s", "2026-12-02T07:58:30Z"),
        ("30m", "2026-12-02T07:30:00Z"),
        ("2h", "2026-12-02T06:00:00Z"),
        ("7d", "2026-11-25T08:00:00Z"),
        ("2026-12-01T10:00:00Z", "2026-12-01T10:00:00Z"),
        ("2026-12-01T12:00:00+02:00", "2026-12-01T10:00:00Z"),
    ],
)
def test_since_takes_a_duration_or_a_zoned_time(value, instant):
    assert since_instant(value, NOW) == instant


@pytest.mark.parametrize("value", ["yesterday", "2h30m", "-2h", "2026-12-01T10:00:00", ""])
def test_since_refuses_what_it_cannot_place(value):
    with pytest.raises(ConfigError, match="--since"):
        since_instant(value, NOW)


def test_a_row_shows_the_short_task_id_the_project_and_one_line_stop_reason():
    shown = row(
        {
            "job_key": "t3sT-1",
            "project_path": "",
            "project_id": "7",
            "state": "STOPPED",
            "task_arn": "arn:aws:ecs:eu-west-1:123456789012:task/ci/0123456789abcdef0123",
            "stopped_reason": "Essential container\nin task exited",
            "created_at": "2026-12-02T07:00:00.000Z",
        },
        NOW,
    )
    assert shown == {
        "job_key": "t3sT-1",
        "project": "7",
        "state": "STOPPED",
        "age": "1h00m",
        "task": "0123456789ab",
        "address": "-",
        "capacity_provider": "-",
        "stop_reason": "Essential container in task exited",
    }


def test_the_table_lines_up_its_columns():
    jobs = [
        {"job_key": "a-1", "state": "RUNNING", "address": "10.0.0.1"},
        {"job_key": "longer-22", "state": "PROVISIONING"},
    ]
    lines = render_table(jobs, NOW).splitlines()
    assert len(lines) == 3
    starts = {
        line.index(word) for line, word in zip(lines, ("STATE", "RUNNING", "PROVISIONING"), strict=True)
    }
    assert len(starts) == 1


class _Pages:
    """An ApiClient stand-in that serves fixed pages and records what it was asked."""

    def __init__(self, pages):
        self.pages = list(pages)
        self.asked = []

    def list_jobs(self, **query):
        self.asked.append(query)
        return self.pages.pop(0)


def test_fetch_follows_the_cursor_to_the_last_page():
    api = _Pages([{"jobs": [{"job_key": "a"}], "next_cursor": "c1"}, {"jobs": [{"job_key": "b"}]}])
    assert [j["job_key"] for j in fetch_jobs(api, live=True, since=None)] == ["a", "b"]
    assert [q["cursor"] for q in api.asked] == [None, "c1"]
    assert all(q["live"] is True for q in api.asked)


def test_fetch_refuses_an_answer_without_a_list():
    with pytest.raises(ApiError, match="no list of jobs"):
        fetch_jobs(_Pages([{"jobs": "nope"}]), live=None, since=None)


def test_status_parses_as_its_own_command():
    args = cli.parse_args(["--config", "f.toml", "status", "--all", "--json", "--since", "2h"])
    assert (args.command, args.show_all, args.as_json, args.since, args.config) == (
        "status",
        True,
        True,
        "2h",
        "f.toml",
    )
    args = cli.parse_args(["status"])
    assert (args.show_all, args.as_json, args.since) == (False, False, None)


def _actions(parser):
    import argparse

    for action in parser._actions:
        yield action
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                yield from _actions(sub)


def test_help_gives_every_flag_a_meaning():
    import argparse

    parser = cli.build_parser()
    flags = [a for a in _actions(parser) if a.option_strings and a.help != argparse.SUPPRESS]
    assert len(flags) >= 12
    for action in flags:
        assert action.help, f"{action.option_strings} has no help text"
    text = parser.format_help()
    for action in parser._actions:
        for option in action.option_strings:
            assert option in text


def _read_variables() -> set[str]:
    """Every `FARGATE_*` name the driver reads: string literals naming them in its modules."""
    names = set()
    for path in DRIVER.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and re.fullmatch(r"FARGATE_[A-Z_]+", node.value)
            ):
                names.add(node.value)
    return names


def test_help_lists_every_environment_variable_the_driver_reads(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    # Names the driver only mentions to say where a setting went (settings.MOVED_TO_ORCHESTRATOR) are the
    # orchestrator's, not read here.
    from fargate_ci_driver.settings import MOVED_TO_ORCHESTRATOR

    moved = {name for name in MOVED_TO_ORCHESTRATOR.values() if name}
    read = _read_variables() - moved
    assert "FARGATE_CPU" in read and "FARGATE_DRIVER_AGENT" in read  # the scan finds them at all
    for name in read:
        assert name in text, f"--help does not list {name}"
    for name in ("JOB_RESPONSE_FILE", "BUILD_FAILURE_EXIT_CODE", "SYSTEM_FAILURE_EXIT_CODE", "AWS_"):
        assert name in text
