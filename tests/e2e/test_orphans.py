"""Orphans: a task whose runner manager is gone stops by itself, through the task's watchdog (design.md
"Orphans"), while a live job, however long and quiet, keeps its task.

One sandbox for the module, its task definitions carrying shortened watchdog and sshd client-alive timings
(`sandbox start --task-env`), and the orchestrator's heartbeat timeout and deadline left at their defaults
(15 min and more): nothing but the watchdog can stop these tasks in time. The real driver runs through the
runner emulator; a "runner manager" is a process of its own (GitLab Runner and every driver process it
starts) that the tests SIGKILL or SIGSTOP. The session agent is detached from it (its own session), as on a
real manager, so a SIGKILL of the manager leaves the agent running: the worst case for the watchdog.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fargate_ci_driver.agent import client, protocol
from runner_emulator import SUCCESS, JobSpec, RunnerConfig, RunnerEmulator
from sandbox.run_job import driver_command
from tests.conftest import REPO_ROOT, run_sandbox_cli, start_sandbox, stop_sandbox, wait_until
from tests.e2e.conftest import Job, descendants, table_key

pytestmark = pytest.mark.e2e

WATCHDOG_IDLE = 4  # no runner connection for this long stops the task
WATCHDOG_START = 8  # no first connection within this long stops the task
CLIENT_ALIVE = (1, 2)  # sshd drops a silent manager after 2 x 1 x (2 + 1) s (OpenSSH 9.2 probes every other)
AGENT_JOB_IDLE = 2  # the session agent drops a job's connection after this long without a stage
# Long relative to every timing above: a quiet stage this long outlives all of them twice over.
LONG_STAGE = 2 * (WATCHDOG_IDLE + 2 * CLIENT_ALIVE[0] * (CLIENT_ALIVE[1] + 1))
# Only a bound on waiting (a failing test must not hang); the bench measures how long it really takes.
STOP_WAIT = 60
WATCHDOG_LINE = "watchdog: "
AGENT_MODES = pytest.mark.parametrize("agent", ["on", "off"])


@pytest.fixture(scope="module")
def orphans_sandbox(sandbox_root):
    directory = sandbox_root / "orphans"
    running = start_sandbox(
        directory,
        "--task-env",
        f"WATCHDOG_IDLE_SECONDS={WATCHDOG_IDLE}",
        "--task-env",
        f"WATCHDOG_START_SECONDS={WATCHDOG_START}",
        "--task-env",
        "WATCHDOG_INTERVAL_SECONDS=1",
        "--task-env",
        f"SSHD_CLIENT_ALIVE_INTERVAL={CLIENT_ALIVE[0]}",
        "--task-env",
        f"SSHD_CLIENT_ALIVE_COUNT_MAX={CLIENT_ALIVE[1]}",
    )
    try:
        yield running
    finally:
        left = _live_tasks(running)
        client.stop(running.state["metadata_dir"])
        stop_sandbox(directory)
        assert not left, f"tasks still running after the orphan tests: {left}"


def _live_tasks(sandbox) -> list[str]:
    ecs = sandbox.ecs()
    arns = ecs.list_tasks(cluster=sandbox.cluster, desiredStatus="RUNNING")["taskArns"]
    return arns and [t["taskArn"] for t in ecs.describe_tasks(cluster=sandbox.cluster, tasks=arns)["tasks"]]


def manager_env(agent: str) -> dict[str, str]:
    """The runner manager's environment: the session agent on (with a short job idle) or off."""
    if agent == "off":
        return {protocol.ENV_SWITCH: "off"}
    return {protocol.ENV_JOB_IDLE: str(AGENT_JOB_IDLE)}


def key_of(job: JobSpec) -> str:
    return f"{RunnerConfig(run_exec=['x']).short_token}-{job.job_id}"


def record(sandbox, key: str) -> dict:
    item = sandbox.dynamodb().get_item(
        TableName=sandbox.table, Key=table_key(sandbox, key), ConsistentRead=True
    )
    return {k: next(iter(v.values())) for k, v in item.get("Item", {}).items()}


def task_log(sandbox, task_arn: str) -> str:
    path = Path(sandbox.state["logs_dir"]) / "tasks" / f"{task_arn.rsplit('/', 1)[-1]}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def stopped_by_the_watchdog(sandbox, key: str) -> tuple[dict, str]:
    """Wait for the job's task to stop; it must be the watchdog that stopped it. Returns (task, task log)."""
    arn = wait_until(lambda: record(sandbox, key).get("task_arn"), 30, 0.2, f"{key} to have a task")
    ecs = sandbox.ecs()
    task = wait_until(
        lambda: (
            (t := ecs.describe_tasks(cluster=sandbox.cluster, tasks=[arn])["tasks"][0])["lastStatus"]
            == "STOPPED"
            and t
        ),
        STOP_WAIT,
        0.2,
        f"the task of {key} to stop",
    )
    log = task_log(sandbox, arn)
    assert task["stopCode"] == "EssentialContainerExited", task  # the container ended: nobody stopped it
    assert WATCHDOG_LINE in log, log
    # The orchestrator learns of it from the task's events; neither its heartbeat nor deadline reaper acted.
    final = wait_until(
        lambda: (r := record(sandbox, key)).get("last_status") == "STOPPED" and r,
        30,
        0.2,
        f"the record of {key} to see STOPPED",
    )
    assert "reaped" not in final and "live" not in final, final
    return task, log


def emulator(sandbox, agent: str, **knobs) -> RunnerEmulator:
    knobs.setdefault("preparation_retry_delay", 0.2)
    config = RunnerConfig.for_driver(driver_command(str(sandbox.toml_path)), **knobs)
    config.process_env.update(manager_env(agent))
    return RunnerEmulator(config)


# --- a runner manager in a process of its own -----------------------------------------------------------


class Manager:
    """GitLab Runner (the emulator) running one job, in its own process group, logging to a file."""

    def __init__(self, sandbox, job: JobSpec, agent: str, work: Path) -> None:
        self.output = work / "job.log"
        program = textwrap.dedent(
            f"""
            from runner_emulator import JobSpec, RunnerConfig, RunnerEmulator
            from sandbox.run_job import driver_command
            log = open({str(self.output)!r}, "w", buffering=1)
            config = RunnerConfig.for_driver(driver_command({str(sandbox.toml_path)!r}))
            job = JobSpec(script={job.script!r}, job_id={job.job_id})
            RunnerEmulator(config, on_output=log.write).run(job)
            """
        )
        env = {**os.environ, **manager_env(agent)}
        self.process = subprocess.Popen(
            [sys.executable, "-c", program], cwd=REPO_ROOT, env=env, start_new_session=True
        )

    def wait_for_output(self, text: str) -> None:
        wait_until(
            lambda: self.output.exists() and text in self.output.read_text(), 60, 0.2, f"{text!r} in the job"
        )

    def processes(self) -> list[int]:
        return [self.process.pid, *descendants(self.process.pid)]

    def signal(self, signum: int) -> None:
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.process.wait(30)


# --- the manager is gone --------------------------------------------------------------------------------


@AGENT_MODES
def test_runner_manager_sigkilled_mid_job_its_task_stops_through_the_watchdog(
    orphans_sandbox, tmp_path, agent
):
    job = JobSpec(script=["echo STAGE-STARTED", "sleep 3600"])
    manager = Manager(orphans_sandbox, job, agent, tmp_path)
    try:
        manager.wait_for_output("STAGE-STARTED")
    finally:
        manager.kill()  # the kernel closes its sockets: sshd sees the connection end (the agent's lingers)
    key = key_of(job)
    assert record(orphans_sandbox, key)["state"] == "RUNNING"  # nobody ran cleanup

    _, log = stopped_by_the_watchdog(orphans_sandbox, key)

    assert f"no runner manager connected for {WATCHDOG_IDLE} s" in log


@AGENT_MODES
def test_a_job_that_ends_without_cleanup_has_its_task_stopped(orphans_sandbox, agent):
    job = JobSpec(script=["echo done"])
    runner = emulator(orphans_sandbox, agent)
    runner.config.cleanup_exec = ["/bin/false"]  # cleanup never reaches the orchestrator

    result = runner.run(job)

    assert result.status == SUCCESS, result.log
    assert record(orphans_sandbox, key_of(job))["state"] == "RUNNING"
    stopped_by_the_watchdog(orphans_sandbox, key_of(job))


@AGENT_MODES
def test_runner_manager_machine_gone_client_alive_and_the_watchdog_stop_its_task(
    orphans_sandbox, tmp_path, agent
):
    """SIGSTOP: every process of the manager (the session agent too) stops answering, and no FIN is ever
    sent, just as when its machine is gone. sshd's client-alive probes drop the connection; the watchdog
    then stops the task."""
    job = JobSpec(script=["echo STAGE-STARTED", "sleep 3600"])
    manager = Manager(orphans_sandbox, job, agent, tmp_path)
    agent_pid = None
    try:
        manager.wait_for_output("STAGE-STARTED")
        if agent == "on":
            agent_pid = client.agent_pid(orphans_sandbox.state["metadata_dir"])
            assert agent_pid is not None
            os.kill(agent_pid, signal.SIGSTOP)
        manager.signal(signal.SIGSTOP)

        _, log = stopped_by_the_watchdog(orphans_sandbox, key_of(job))
    finally:
        manager.kill()
        if agent_pid is not None:  # the machine "comes back" without its agent: the next stage starts one
            os.kill(agent_pid, signal.SIGKILL)

    assert "Timeout, client not responding" in log, log  # sshd's client-alive probes went unanswered


def test_a_task_nobody_ever_connects_to_stops_after_the_start_grace(orphans_sandbox):
    """The manager died during prepare, after RunTask and before it reached sshd."""
    job = Job(orphans_sandbox)  # RunTask through the API, and nothing more
    try:
        _, log = stopped_by_the_watchdog(orphans_sandbox, job.key)
    finally:
        job.stop("test over")  # a no-op once the task stopped

    assert f"no runner manager connected in the {WATCHDOG_START} s since the task started" in log


# --- a live job keeps its task --------------------------------------------------------------------------


@AGENT_MODES
def test_a_long_quiet_healthy_job_keeps_its_task(orphans_sandbox, agent):
    job = JobSpec(script=[f"sleep {LONG_STAGE}", "echo STILL-HERE"], after_script=["echo AFTER"])

    result = emulator(orphans_sandbox, agent).run(job)

    assert result.status == SUCCESS, result.log
    assert "STILL-HERE" in result.log and "AFTER" in result.log
    final = wait_until(
        lambda: (r := record(orphans_sandbox, key_of(job))).get("last_status") == "STOPPED" and r,
        30,
        0.2,
        "the job's record to see its task stopped",
    )
    assert final["stop_code"] == "UserInitiated"  # by the driver's cleanup, not by the watchdog
    assert WATCHDOG_LINE not in task_log(orphans_sandbox, final["task_arn"])


# --- the sandbox's knob ---------------------------------------------------------------------------------


def test_sandbox_task_env_reaches_every_task_definition_and_refuses_a_malformed_pair(
    orphans_sandbox, tmp_path
):
    assert orphans_sandbox.state["task_env"]["WATCHDOG_IDLE_SECONDS"] == str(WATCHDOG_IDLE)
    for arn in orphans_sandbox.state["task_definitions"].values():
        definition = orphans_sandbox.ecs().describe_task_definition(taskDefinition=arn)["taskDefinition"]
        environment = {e["name"]: e["value"] for e in definition["containerDefinitions"][0]["environment"]}
        assert environment["WATCHDOG_IDLE_SECONDS"] == str(WATCHDOG_IDLE)
        assert environment["SSH_PORT"] == str(orphans_sandbox.state["ssh_port"])

    refused = run_sandbox_cli("start", "--dir", str(tmp_path / "bad"), "--task-env", "WATCHDOG_IDLE_SECONDS")

    assert refused.returncode == 2
    assert "--task-env wants NAME=VALUE, got 'WATCHDOG_IDLE_SECONDS'" in refused.stderr
