"""Issue 17: the job log looks like GitLab's. The real driver through the runner emulator against the
sandbox, with the task's provisioning slowed as Fargate's often is: the task's start in one collapsed
section (GitLab's markers), a keep-alive line while the task provisions, and the section closed before the
job's own output."""

from __future__ import annotations

import re

import pytest

from fargate_ci_driver.prepare import WAITING_FOR
from runner_emulator import SUCCESS, JobSpec, RunnerConfig, RunnerEmulator
from sandbox.run_job import driver_command

pytestmark = pytest.mark.e2e

START = re.compile(
    r"\x1b\[0Ksection_start:(\d+):fargate_task\[collapsed=true\]\r\x1b\[0KStarting a Fargate task"
)
END = re.compile(r"\x1b\[0Ksection_end:(\d+):fargate_task\r\x1b\[0K")


def test_the_tasks_start_is_a_collapsed_section_with_keep_alive_lines(sandbox):
    job = JobSpec(script=["echo job-output-here"])
    # The sandbox spends half of it PROVISIONING, half PENDING: 15 s in each without news from the API, 5 s
    # more than the driver's keep-alive interval (prepare.PROGRESS_EVERY, 10 s), whenever its address shows.
    sandbox.fault(job.job_id, "slow-provisioning", seconds=30)
    config = RunnerConfig.for_driver(driver_command(str(sandbox.toml_path)), preparation_retry_delay=0.2)

    result = RunnerEmulator(config).run(job)

    assert result.status == SUCCESS, result.log
    log = result.log
    starts, ends = list(START.finditer(log)), list(END.finditer(log))
    assert len(starts) == 1 and len(ends) == 1, log
    start, end = starts[0], ends[0]
    assert int(end[1]) - int(start[1]) >= 25  # GitLab shows the section's duration from the two stamps
    inside = log[start.end() : end.start()]
    assert f"Requesting a Fargate task for job t3sT1234-{job.job_id}" in inside
    keep_alive = re.findall(r"Still starting after \d+s: task (\w+)(?: \(\w+\))?, (.+)", inside)
    assert keep_alive, inside
    assert all(state in ("PROVISIONING", "PENDING") for state, _ in keep_alive), keep_alive
    assert all(what in WAITING_FOR.values() for _, what in keep_alive), keep_alive
    after = log[end.end() :]
    assert re.search(r"SSH ready after \d+\.\ds", after)
    assert "job-output-here" in after
