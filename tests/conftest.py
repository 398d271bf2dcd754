"""Shared fixtures: a real sandbox (moto, the Chalice app behind SigV4, bwrap-confined sshd tasks).

`sandbox` starts one per test session on first use, in a temporary directory, with a short provisioning
delay and a fast reaper schedule, and stops it at the end. A session-finish check fails the run if any
process this session's sandboxes started (moto host, API host, bwrap, sshd) is still alive.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fargate_ci_driver.agent import client

REPO_ROOT = Path(__file__).resolve().parent.parent
PROVISION_DELAY = 0.3
SCHEDULE_RATE = 2.0


def run_sandbox_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m sandbox ...` as a user types it."""
    return subprocess.run(
        [sys.executable, "-m", "sandbox", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass
class Sandbox:
    """A running sandbox, as tests see it (the fields of DIR/sandbox.json plus boto3 helpers)."""

    dir: Path
    state: dict[str, Any]
    _clients: dict[str, Any] = field(default_factory=dict)

    @property
    def toml_path(self) -> Path:
        return Path(self.state["toml_path"])

    @property
    def api_url(self) -> str:
        return self.state["api_url"]

    @property
    def aws_endpoint_url(self) -> str:
        return self.state["aws_endpoint_url"]

    @property
    def region(self) -> str:
        return self.state["region"]

    @property
    def cluster(self) -> str:
        return self.state["cluster"]

    @property
    def table(self) -> str:
        return self.state["table"]

    @property
    def control_url(self) -> str:
        return self.state["control_url"]

    @property
    def credentials_file(self) -> str:
        return self.state["credentials_file"]

    def client(self, service: str) -> Any:
        """A boto3 client on the sandbox's moto (any key works there)."""
        if service not in self._clients:
            import boto3

            self._clients[service] = boto3.client(
                service,
                region_name=self.region,
                endpoint_url=self.aws_endpoint_url,
                aws_access_key_id="sandbox-tests",
                aws_secret_access_key="sandbox-tests",
            )
        return self._clients[service]

    def ecs(self) -> Any:
        return self.client("ecs")

    def dynamodb(self) -> Any:
        return self.client("dynamodb")

    def api(self, profile: str = "sandbox") -> Any:
        """The driver's signed API client, as one of the sandbox's two identities."""
        from fargate_ci_driver.api import ApiClient

        return ApiClient(self.api_url, self.region, profile=profile, credentials_file=self.credentials_file)

    def fault(self, job_id: str | int, kind: str, **params: Any) -> dict[str, Any]:
        """Arm a fault (POST /faults on the control URL) for the next task of GitLab job `job_id`."""
        body = json.dumps({"job_id": str(job_id), "kind": kind, **params}).encode()
        request = urllib.request.Request(  # noqa: S310 (the sandbox's loopback URL)
            self.control_url + "/faults",
            data=body,
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return json.loads(response.read())["fault"]

    def clear_faults(self) -> None:
        request = urllib.request.Request(self.control_url + "/faults", method="DELETE")  # noqa: S310
        with urllib.request.urlopen(request, timeout=10):  # noqa: S310
            pass


def start_sandbox(directory: Path, *extra: str) -> Sandbox:
    result = run_sandbox_cli(
        "start",
        "--dir",
        str(directory),
        "--provision-delay",
        str(PROVISION_DELAY),
        "--schedule-rate",
        str(SCHEDULE_RATE),
        *extra,
    )
    if result.returncode != 0:
        logs = directory / "logs"
        tails = "".join(
            f"\n--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            for log in sorted(logs.glob("*.log"))
        )
        pytest.fail(f"sandbox did not start ({result.returncode}): {result.stderr.strip()}{tails}")
    return Sandbox(dir=directory, state=json.loads((directory / "sandbox.json").read_text()))


def stop_sandbox(directory: Path) -> None:
    result = run_sandbox_cli("stop", "--dir", str(directory))
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="session")
def sandbox_root(no_sandbox_process_left: Path) -> Path:
    """Where this session's sandboxes live. Not pytest's tmp_path: concurrent pytest runs on the machine
    prune each other's old basetemps, which would pull a running sandbox's directory away."""
    return no_sandbox_process_left


@pytest.fixture(scope="session")
def sandbox(sandbox_root: Path) -> Iterator[Sandbox]:
    directory = sandbox_root / "session"
    running = start_sandbox(directory)
    try:
        yield running
    finally:
        stop_sandbox(directory)


# --- no process left behind -------------------------------------------------------------------------


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def sandbox_processes(root: Path) -> list[str]:
    """Live processes that belong to a sandbox under `root`: their own or an ancestor's argv names it."""
    marker = str(root)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid() or _is_zombie(int(entry)):
            continue
        pid, hops = int(entry), 0
        while pid > 1 and hops < 32:
            line = _cmdline(pid)
            if marker in line and ("sandbox" in line or "bwrap" in line):
                found.append(f"{entry}: {_cmdline(int(entry))[:160]}")
                break
            pid, hops = _parent(pid), hops + 1
    return found


def wait_until(
    condition: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1, what: str = ""
) -> Any:
    """Poll until `condition()` is truthy; fail the test (not hang it) after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what or condition}")
        time.sleep(interval)


@pytest.fixture(scope="session", autouse=True)
def no_sandbox_process_left(request: pytest.FixtureRequest) -> Iterator[Path]:
    """Owns the session's sandbox root; at the very end, no process of any sandbox under it may be left.

    The root (with every sandbox's logs) is kept when a test failed, and its path printed."""
    root = Path(tempfile.mkdtemp(prefix="fargate-ci-tests-"))
    try:
        yield root
        # Stopping is synchronous, but give the kernel a moment to reap what a stop killed.
        deadline = time.monotonic() + 10
        while (left := sandbox_processes(root)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, "sandbox processes left running after the tests:\n" + "\n".join(left)
    finally:
        if request.session.testsfailed:
            print(f"\nsandbox logs kept in {root}")
        elif not sandbox_processes(root):
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def no_session_agent_left(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Driver stages in tests start session agents in their tests' directories, and an agent stays up for a
    minute after its last job: stop the ones this session started rather than leave them behind."""
    yield
    base = str(tmp_path_factory.getbasetemp())
    for entry in os.listdir("/proc"):
        argv = _cmdline(int(entry)).split() if entry.isdigit() else []
        if "fargate_ci_driver.agent" in argv and "--dir" in argv and argv.index("--dir") + 1 < len(argv):
            directory = argv[argv.index("--dir") + 1]
            if directory.startswith(base):
                client.stop(directory)


# --- summary lines -------------------------------------------------------------------------------------

SUMMARY_LINES: list[str] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Lines a suite asks to show at the end of the run (e.g. the fault scenarios' tally)."""
    for line in SUMMARY_LINES:
        terminalreporter.write_line(line)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Under pytest-xdist, a worker hands its summary lines to the controller, which prints them."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["summary_lines"] = list(SUMMARY_LINES)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    SUMMARY_LINES.extend(getattr(node, "workeroutput", {}).get("summary_lines", []))
