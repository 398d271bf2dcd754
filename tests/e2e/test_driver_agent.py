"""The session agent end to end: the real console script's stages against the sandbox (real sshd), each test
with its own metadata directory and so its own agent, which is stopped at the end."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fargate_ci_driver import pids
from fargate_ci_driver.agent import client, protocol
from fargate_ci_driver.agent.protocol import AgentGone
from runner_emulator.job import JobSpec
from runner_emulator.payload import job_payload, write_job_payload
from tests.conftest import wait_until
from tests.e2e.conftest import next_job_id, table_key

pytestmark = pytest.mark.e2e

# The installed `fargate-driver` (bin/fargate-driver), run by this interpreter so flags can be added.
CONSOLE_SCRIPT = Path(sys.executable).parent / "fargate-driver"
TOKEN = "glcbt-secret-token-agent"


class AgentJob:
    """One job's stages, called as GitLab Runner calls them, with a metadata directory of its own."""

    def __init__(self, sandbox, tmp_path: Path, **agent_env: str) -> None:
        self.sandbox = sandbox
        self.metadata = tmp_path / "metadata"
        self.toml = tmp_path / "fargate.toml"
        self.toml.write_text(
            sandbox.toml_path.read_text().replace(sandbox.state["metadata_dir"], str(self.metadata))
        )
        self.job_id = next_job_id()
        self.key = f"t3sT1234-{self.job_id}"  # the sandbox's [Runner] ShortToken
        self.tmp = tmp_path
        # The runner's per-job directory with the job payload (JOB_RESPONSE_FILE), as the Custom executor.
        self.job_dir = tmp_path / f"custom-executor-{self.job_id}"
        self.job_dir.mkdir(mode=0o700)
        spec = JobSpec(["true"], job_id=int(self.job_id), project_id=42, pipeline_id=7, token=TOKEN)
        payload = write_job_payload(str(self.job_dir), job_payload(spec, "https://gitlab.example.com", []))
        self.env = {
            **os.environ,
            "BUILD_FAILURE_EXIT_CODE": "1",
            "SYSTEM_FAILURE_EXIT_CODE": "2",
            "BUILD_EXIT_CODE_FILE": str(tmp_path / "build_exit_code"),
            "JOB_RESPONSE_FILE": payload,
            "CUSTOM_ENV_CI_RUNNER_SHORT_TOKEN": "t3sT1234",
            "CUSTOM_ENV_CI_SERVER_URL": "https://gitlab.example.com",
            "CUSTOM_ENV_CI_JOB_ID": self.job_id,
            "CUSTOM_ENV_CI_PROJECT_ID": "42",
            "CUSTOM_ENV_CI_PIPELINE_ID": "7",
            "CUSTOM_ENV_CI_JOB_TOKEN": TOKEN,
            "TMPDIR": str(self.job_dir),
            **agent_env,
        }
        self.spot = protocol.Spot.read(str(self.toml), self.env)

    def argv(self, *args: str, python_flags: tuple[str, ...] = ()) -> list[str]:
        return [
            sys.executable,
            *python_flags,
            str(CONSOLE_SCRIPT),
            "--config",
            str(self.toml),
            "custom",
            *args,
        ]

    def stage(self, *args: str, python_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.argv(*args, python_flags=python_flags),
            env=self.env,
            cwd=self.tmp,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def script(self, text: str, name: str = "script") -> str:
        path = self.tmp / name
        path.write_text(text)
        return str(path)

    def run(self, text: str, **kwargs) -> subprocess.CompletedProcess:
        return self.stage("run", self.script(text), "build_script", **kwargs)

    def stats(self) -> dict | None:
        try:
            return client.request(self.spot, {"op": "stats"})
        except AgentGone:
            return None

    def job_stats(self) -> dict | None:
        return ((self.stats() or {}).get("jobs") or {}).get(self.key)

    def agent_pid(self) -> int | None:
        return client.agent_pid(self.spot)

    def wait_connected(self) -> dict:
        return wait_until(
            lambda: (s := self.job_stats()) and s["connected"] and s, 30, 0.05, "the agent to hold the job"
        )

    def stop_agent(self) -> None:
        pid = self.agent_pid()
        with contextlib.suppress(AgentGone):
            client.request(self.spot, {"op": "shutdown"})
        if pid is not None:
            deadline = time.monotonic() + 10
            while pids.alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def agent_job(sandbox, tmp_path):
    job = AgentJob(sandbox, tmp_path)
    yield job
    job.stage("cleanup")
    job.stop_agent()


def _prepared(job: AgentJob) -> None:
    done = job.stage("prepare")
    assert done.returncode == 0, done.stdout + done.stderr
    job.wait_connected()


def test_all_stages_of_a_job_share_one_connection_and_run_loads_only_what_it_needs(agent_job):
    """A stage the agent serves loads no SSH or AWS code, and none of the standard library's costlier modules
    (each would add milliseconds to every stage)."""
    _prepared(agent_job)
    outputs = []
    for n in range(3):
        ran = agent_job.run(f"echo stage-{n} on $(hostname)\n", python_flags=("-X", "importtime"))
        assert ran.returncode == 0, ran.stderr[-2000:]
        outputs.append(ran.stdout)
        imported = [line.rsplit("|", 1)[-1].strip() for line in ran.stderr.splitlines() if "|" in line]
        assert "fargate_ci_driver.agent.fastpath" in imported
        heavy = {"paramiko", "botocore", "boto3", "cryptography", "re", "json", "socket", "enum", "typing"}
        assert [m for m in imported if m.split(".")[0] in heavy] == []
    assert [re.sub(r" on .*", "", out.strip()) for out in outputs] == ["stage-0", "stage-1", "stage-2"]
    stats = agent_job.job_stats()
    assert (stats["connections"], stats["stages"]) == (1, 3)
    log = (agent_job.metadata / protocol.LOG_NAME).read_text()
    assert "PRIVATE KEY" not in log and "glcbt-secret-token-agent" not in log


def test_a_failing_stage_through_the_agent_is_a_build_failure_with_its_status(agent_job):
    _prepared(agent_job)
    ran = agent_job.run("echo to-stderr >&2; echo to-stdout; exit 7\n")
    assert ran.returncode == 1, ran.stderr
    assert (ran.stdout, ran.stderr) == ("to-stdout\n", "to-stderr\n")
    assert (agent_job.tmp / "build_exit_code").read_text().strip() == "7"
    assert agent_job.job_stats()["stages"] == 1


def test_the_next_stage_connects_directly_when_the_agent_is_gone_and_a_new_agent_takes_over(agent_job):
    _prepared(agent_job)
    first = agent_job.agent_pid()
    os.kill(first, signal.SIGKILL)
    # Dead, socket and all: its main thread is a zombie while its other threads still exit, and until the
    # last one has, its socket still accepts (and then resets) a connection.
    wait_until(
        lambda: not pids.alive(first) and _refuses(agent_job.spot.socket), 10, 0.05, "the agent to be gone"
    )

    ran = agent_job.run("echo still-works\n")

    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "still-works\n"
    wait_until(
        lambda: (pid := agent_job.agent_pid()) and pid != first and agent_job.stats(), 30, 0.05, "a new agent"
    )
    again = agent_job.run("echo served-again\n")
    assert again.returncode == 0 and again.stdout == "served-again\n", again.stderr
    assert agent_job.job_stats()["stages"] == 1  # the new agent served this one


def _refuses(path: str) -> bool:
    """Whether nothing listens on the Unix socket `path` any more."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return True
    finally:
        probe.close()
    return False


def _remote_processes(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and pids.alive(int(entry)):
            with contextlib.suppress(OSError):
                if marker in Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode():
                    found.append(int(entry))
    return found


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_cancelled_or_killed_run_kills_the_remote_stage_and_stops_its_heartbeats(agent_job, how):
    _prepared(agent_job)
    marker = f"4242.{os.getpid() % 1000:03d}{how.value}"
    stage = subprocess.Popen(
        agent_job.argv("run", agent_job.script(f"echo sleeping; sleep {marker}\n"), "build_script"),
        env=agent_job.env,
        cwd=agent_job.tmp,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: _remote_processes(f"sleep {marker}"), 30, 0.05, "the remote sleep")
        assert agent_job.job_stats()["active"] == 1
        stage.send_signal(how)
        _, err = stage.communicate(timeout=60)
    finally:
        if stage.poll() is None:
            stage.kill()
            stage.wait()
    if how == signal.SIGTERM:
        assert stage.returncode == 2, err
        assert "ERROR: received SIGTERM" in err
        assert not _remote_processes(f"sleep {marker}")  # killed before the driver exited
    wait_until(lambda: not _remote_processes(f"sleep {marker}"), 30, 0.05, "the remote stage to be killed")
    wait_until(lambda: agent_job.job_stats()["active"] == 0, 30, 0.05, "the agent to let go of the stage")
    # The connection stays for the next stage.
    ran = agent_job.run("echo next\n")
    assert ran.returncode == 0 and ran.stdout == "next\n", ran.stderr


def test_cleanup_drops_the_jobs_connection(agent_job):
    _prepared(agent_job)
    assert agent_job.run("true\n").returncode == 0
    other = agent_job.metadata / "t3sT1234-1.json"  # another job's state: the agent stays for it
    other.write_text("{}")
    done = agent_job.stage("cleanup")
    assert done.returncode == 0, done.stderr
    assert agent_job.job_stats() is None
    assert agent_job.stats() is not None
    other.unlink()


def test_after_the_last_jobs_cleanup_the_agent_stays_warm_and_signs_the_next_prepare(sandbox, tmp_path):
    first = AgentJob(sandbox, tmp_path)
    try:
        _prepared(first)
        pid = first.agent_pid()
        done = first.stage("cleanup")
        assert done.returncode == 0, done.stderr
        assert first.job_stats() is None
        assert first.agent_pid() == pid and pids.alive(pid)
        signed = first.stats()["signed"]
        assert signed >= 1  # at least cleanup's DELETE (the first prepare's calls may precede the agent)
        second = AgentJob(sandbox, tmp_path)
        _prepared(second)
        assert second.agent_pid() == pid
        # The second prepare's API calls (the POST and the polls) were signed by the warm agent...
        assert second.stats()["signed"] >= signed + 2
        # ...and the agent sent its ready report in the background.
        item = wait_until(
            lambda: (
                sandbox.dynamodb()
                .get_item(TableName=sandbox.table, Key=table_key(sandbox, second.key))
                .get("Item", {})
                .get("ssh_ready_seconds")
            ),
            10,
            0.05,
            "the ready report",
        )
        assert 0 < float(item["N"]) < 60
        log = (second.metadata / protocol.LOG_NAME).read_text()
        assert "aws_secret_access_key" not in log.lower() and "signature" not in log.lower()
        second.stage("cleanup")
    finally:
        first.stop_agent()


def test_prepare_ends_when_sshd_answers_even_if_the_api_has_not_seen_the_task_running(sandbox, tmp_path):
    """The RUNNING event is lost, so the API says PENDING until it refreshes the record (10 s here): the
    agent's login attempts, which start as soon as the task's address is known, end prepare anyway."""
    job = AgentJob(sandbox, tmp_path)
    sandbox.fault(job.job_id, "events", drop=["RUNNING"])
    try:
        done = job.stage("prepare")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "SSH ready" in done.stdout and "Task RUNNING" not in done.stdout, done.stdout
        assert job.job_stats()["connected"]
        ran = job.run("echo served\n")
        assert (ran.returncode, ran.stdout) == (0, "served\n"), ran.stderr
    finally:
        job.stage("cleanup")
        job.stop_agent()


def test_a_stopped_task_drops_the_connection_and_the_next_stage_is_a_system_failure(agent_job):
    _prepared(agent_job)
    attempt = agent_job.sandbox.api().get_job(agent_job.key)["attempt"]
    agent_job.sandbox.api().stop_job(agent_job.key, "taken away", attempt=attempt)
    wait_until(lambda: agent_job.job_stats() is None, 30, 0.1, "the agent to drop the dead connection")
    ran = agent_job.run("echo never\n")
    assert ran.returncode == 2, ran.stdout + ran.stderr
    assert "never" not in ran.stdout


def test_an_idle_job_is_dropped_and_an_agent_without_jobs_exits(sandbox, tmp_path):
    job = AgentJob(
        sandbox,
        tmp_path,
        **{protocol.ENV_JOB_IDLE: "1", protocol.ENV_EXIT_IDLE: "1"},
    )
    try:
        _prepared(job)
        pid = job.agent_pid()
        wait_until(lambda: job.job_stats() is None, 30, 0.1, "the idle job to be dropped")
        wait_until(lambda: not pids.alive(pid), 30, 0.1, "the agent to exit")
        assert not os.path.exists(job.spot.socket)
        # A stage after that still works (directly), and brings an agent back.
        ran = job.run("echo after-idle\n")
        assert ran.returncode == 0 and ran.stdout == "after-idle\n", ran.stderr
    finally:
        job.stage("cleanup")
        job.stop_agent()


def test_the_agent_socket_is_private(agent_job):
    _prepared(agent_job)
    sock = Path(agent_job.spot.socket)
    assert sock.name == f"agent-3-{agent_job.spot.digest}.sock"
    assert oct(sock.stat().st_mode & 0o777) == "0o600"
    assert oct(agent_job.metadata.stat().st_mode & 0o777) == "0o700"
