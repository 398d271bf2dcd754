"""A benchmark's view of the sandbox: starting and stopping it, and calling the driver's stages for a job as
GitLab Runner does (the real console script, pipes for stdout/stderr), timed."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from runner_emulator.job import JobSpec
from runner_emulator.payload import job_payload, write_job_payload

REPO_ROOT = Path(__file__).resolve().parent.parent
RUNNER = "t3sT1234"  # the sandbox's [Runner] ShortToken: job keys are RUNNER-<job id>
_job_ids = itertools.count(int(time.time() * 1000) % 10**12)


def start_sandbox(directory: Path, provision_delay: float, *extra: str) -> dict:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sandbox",
            "start",
            "--dir",
            str(directory),
            "--provision-delay",
            str(provision_delay),
            *extra,
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"sandbox did not start: {result.stderr.strip()[-2000:]}")
    return json.loads((directory / "sandbox.json").read_text())


def stop_sandbox(directory: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "sandbox", "stop", "--dir", str(directory)],
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=180,
        check=False,
    )


def driver_command() -> list[str]:
    beside = Path(sys.executable).parent / "fargate-driver"
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "fargate_ci_driver"]


@dataclass
class Job:
    """One CI job's stages through `fargate-driver`."""

    state: dict
    work: Path
    job_id: str
    agent: bool = True
    variables: dict[str, str] = field(default_factory=dict)  # the job's CI/CD variables (CUSTOM_ENV_*)
    last_stdout: str = ""

    @classmethod
    def new(cls, state: dict, work: Path, agent: bool = True, variables: dict[str, str] | None = None) -> Job:
        work.mkdir(parents=True, exist_ok=True)
        job = cls(state, work, str(next(_job_ids)), agent, dict(variables or {}))
        # The runner's per-job directory with the job payload (JOB_RESPONSE_FILE): the job's identity.
        job.job_dir.mkdir(mode=0o700, exist_ok=True)
        spec = JobSpec(["true"], job_id=int(job.job_id), project_id=1, pipeline_id=1)
        write_job_payload(str(job.job_dir), job_payload(spec, "https://gitlab.example.com", []))
        return job

    @property
    def job_dir(self) -> Path:
        return self.work / f"custom-executor-{self.job_id}"

    @property
    def key(self) -> str:
        return f"{RUNNER}-{self.job_id}"

    @property
    def metadata(self) -> str:
        return self.state["metadata_dir"]

    def env(self) -> dict[str, str]:
        env = {
            **os.environ,
            "BUILD_FAILURE_EXIT_CODE": "1",
            "SYSTEM_FAILURE_EXIT_CODE": "2",
            "BUILD_EXIT_CODE_FILE": str(self.work / f"exit-{self.job_id}"),
            "TMPDIR": str(self.job_dir),
            "JOB_RESPONSE_FILE": str(self.job_dir / "response.json"),
            "CUSTOM_ENV_CI_RUNNER_SHORT_TOKEN": RUNNER,
            "CUSTOM_ENV_CI_SERVER_URL": "https://gitlab.example.com",
            "CUSTOM_ENV_CI_JOB_ID": self.job_id,
            "CUSTOM_ENV_CI_PROJECT_ID": "1",
            "CUSTOM_ENV_CI_PIPELINE_ID": "1",
        }
        if not self.agent:
            env["FARGATE_DRIVER_AGENT"] = "off"
        env.update({f"CUSTOM_ENV_{name}": value for name, value in self.variables.items()})
        return env

    def argv(self, *args: str) -> list[str]:
        return [*driver_command(), "--config", self.state["toml_path"], "custom", *args]

    def stage(self, *args: str) -> float:
        """Run one stage; its wall time in seconds. Raises when it fails."""
        started = time.perf_counter()
        done = subprocess.run(
            self.argv(*args), env=self.env(), cwd=self.work, capture_output=True, timeout=300, check=False
        )
        elapsed = time.perf_counter() - started
        self.last_stdout = done.stdout.decode(errors="replace")
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args[:1])} of {self.key} exited {done.returncode}: {done.stderr[-800:]}"
            )
        return elapsed

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            self.argv(*args), env=self.env(), cwd=self.work, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )

    def script(self, text: str) -> str:
        path = self.work / "script.sh"
        path.write_text(text)
        return str(path)

    def job_state(self) -> dict:
        return json.loads((Path(self.metadata) / f"{self.key}.json").read_text())

    def cleanup(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.stage("cleanup")


class OpenSsh:
    """OpenSSH's client on a prepared job's task, with the job's key and pinned host key."""

    def __init__(self, job: Job) -> None:
        state = job.job_state()
        self.address, self.port = state["address"], state["ssh_port"]
        self.dir = job.work / "openssh"
        self.dir.mkdir(exist_ok=True)
        key = self.dir / "id"
        # The key file holds the private key, then its certificate (which OpenSSH reads from id-cert.pub).
        private, _, certificate = (
            (Path(job.metadata) / f"{job.key}.key").read_text().partition("ssh-ed25519-cert")
        )
        key.write_text(private)
        key.chmod(0o600)
        (self.dir / "id-cert.pub").write_text("ssh-ed25519-cert" + certificate)
        known = self.dir / "known_hosts"
        known.write_text(f"[{self.address}]:{self.port} {state['host_public_key']}\n")
        self.control = self.dir / "cm.sock"
        self.options = [
            "-F", "/dev/null",
            "-i", str(key),
            "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={known}",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes",
            "-p", str(self.port),
        ]  # fmt: skip
        self.target = f"{state['ssh_user']}@{self.address}"

    def run(self, script: str, master: bool = False) -> float:
        extra = ["-o", f"ControlPath={self.control}"] if master else []
        started = time.perf_counter()
        with open(script, "rb") as stdin:
            done = subprocess.run(
                ["ssh", *self.options, *extra, self.target, "bash"],
                stdin=stdin,
                capture_output=True,
                timeout=60,
                check=False,
            )
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"ssh exited {done.returncode}: {done.stderr[-500:]!r}")
        return elapsed

    def start_master(self) -> None:
        subprocess.run(
            [
                "ssh",
                *self.options,
                "-o",
                "ControlMaster=yes",
                "-o",
                f"ControlPath={self.control}",
                "-o",
                "ControlPersist=300",
                "-f",
                "-N",
                self.target,
            ],
            capture_output=True,
            timeout=60,
            check=True,
        )

    def stop_master(self) -> None:
        subprocess.run(
            ["ssh", *self.options, "-o", f"ControlPath={self.control}", "-O", "exit", self.target],
            capture_output=True,
            timeout=60,
            check=False,
        )


def pss_kib(pid: int) -> int:
    """Proportional set size: shared pages (the interpreter, libraries) split among their users."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def wait_for(condition, timeout: float = 60.0, interval: float = 0.05, what: str = "a condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(interval)
