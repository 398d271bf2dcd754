"""The job log's GitLab forms: collapsible sections, GitLab Runner's colours for warnings and errors, and
the keep-alive line during long waits. The format is GitLab's (docs "CI/CD job logs", custom collapsible
sections) and gitlab-runner's (helpers/build_section.go, helpers/ansi_colors.go, common/build_logger.go)."""

from __future__ import annotations

import io
import re
import threading
import time

import pytest

from fargate_ci_driver import logs
from fargate_ci_driver.logs import JobLog, error_line, section_end, section_start, warning_line
from fargate_ci_driver.prepare import WAITING_FOR, Prepare


def test_section_markers_are_gitlabs():
    assert (
        section_start("fargate_task", "Starting a Fargate task", now=1764662400.7)
        == "\x1b[0Ksection_start:1764662400:fargate_task[collapsed=true]\r\x1b[0KStarting a Fargate task"
    )
    assert section_start("a.b-c_1", "x", collapsed=False, now=5) == "\x1b[0Ksection_start:5:a.b-c_1\r\x1b[0Kx"
    assert (
        section_end("fargate_task", now=1764662460) == "\x1b[0Ksection_end:1764662460:fargate_task\r\x1b[0K"
    )


@pytest.mark.parametrize("name", ["", "with space", "colon:name", "x" * 101, "brackets[]"])
def test_a_section_name_gitlab_would_misread_is_refused(name):
    with pytest.raises(ValueError):
        section_start(name, "header")


def test_warnings_and_errors_in_gitlab_runners_colours():
    assert warning_line("slow") == "\x1b[33;1mWARNING: slow\x1b[0;m"
    assert warning_line("WARNING: already said") == "\x1b[33;1mWARNING: already said\x1b[0;m"
    assert error_line("no") == "\x1b[31;1mERROR: no\x1b[0;m"


def test_sections_do_not_nest_and_closing_twice_writes_one_end():
    out = io.StringIO()
    job_log = JobLog(out)
    job_log.open_section("one", "First")
    job_log.say("inside")
    job_log.open_section("two", "Second")  # closes "one" first
    job_log.close_section()
    job_log.close_section()
    text = re.sub(r":\d+:", ":T:", out.getvalue())
    assert text == (
        "\x1b[0Ksection_start:T:one[collapsed=true]\r\x1b[0KFirst\n"
        "inside\n"
        "\x1b[0Ksection_end:T:one\r\x1b[0K\n"
        "\x1b[0Ksection_start:T:two[collapsed=true]\r\x1b[0KSecond\n"
        "\x1b[0Ksection_end:T:two\r\x1b[0K\n"
    )


def test_keep_alive_speaks_only_when_the_log_has_been_quiet():
    out = io.StringIO()
    job_log = JobLog(out)
    calls = []

    def status() -> str:
        calls.append(1)
        return f"still waiting {len(calls)}"

    with job_log.keep_alive(status, every=0.1):
        for _ in range(3):  # busy: a line every 20 ms leaves the ticker nothing to say
            job_log.say("busy")
            time.sleep(0.02)
        assert not calls
        deadline = time.monotonic() + 10
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    said = len(calls)
    time.sleep(0.3)
    assert said >= 2 and len(calls) == said  # and nothing after the block
    assert "still waiting 1\n" in out.getvalue()
    assert not [t for t in threading.enumerate() if t.name == "job-log-keep-alive"]


def test_a_failing_status_never_breaks_the_wait():
    job_log = JobLog(io.StringIO())

    def broken() -> str:
        raise RuntimeError("no status")

    with job_log.keep_alive(broken, every=0.05):
        time.sleep(0.2)


@pytest.mark.parametrize(
    ("seen", "words"),
    [
        (None, "no task yet, waiting for the orchestrator"),
        (("PROVISIONING", None), "task PROVISIONING, Fargate is finding capacity"),
        (("PENDING", "PROVISIONING"), "task PENDING (PROVISIONING), Fargate is finding capacity"),
        (("PENDING", "PENDING"), "task PENDING, pulling the image"),
        (("RUNNING", "RUNNING"), "task RUNNING, waiting for the task's sshd"),
    ],
)
def test_the_keep_alive_line_says_what_prepare_waits_for(seen, words):
    prep = Prepare.__new__(Prepare)  # only the clock and what was seen matter here
    prep.started = time.monotonic() - 47
    prep._seen = seen
    line = prep._progress()
    assert line.startswith("Still starting after 47s: ")
    assert words in line


def test_every_ecs_status_before_running_has_words():
    assert set(WAITING_FOR) == {"PROVISIONING", "PENDING", "ACTIVATING", "RUNNING"}
    assert logs.ANSI_RESET == "\x1b[0;m"
