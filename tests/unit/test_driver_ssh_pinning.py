"""The SSH adapter against a real OpenSSH sshd on loopback: it logs in only to the host key pinned for the
job, streams a stage's output and exit status, and kills a stage's process group.

A fast-tier test on purpose: replacing the pinned key with auto-add, or never loading it, must fail here and
not only end to end.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fargate_ci_driver.errors import HostKeyMismatch, SshError, SshUnavailable
from fargate_ci_driver.ssh import TaskConnection

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not Path(SSHD).exists(), reason="needs root and OpenSSH's sshd (make setup)"
)


def _keypair() -> tuple[str, str]:
    """(private PEM in OpenSSH format, public `ssh-ed25519 ...` line)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public.decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sshd:
    def __init__(self, directory: Path, host_key_type: str = "ed25519") -> None:
        self.port = _free_port()
        self.client_private, client_public = _keypair()
        host_key = directory / f"host_{host_key_type}"
        if host_key_type == "ed25519":
            private, self.host_public = _keypair()
            host_key.write_text(private)
        else:
            subprocess.run(
                ["ssh-keygen", "-q", "-t", host_key_type, "-N", "", "-f", str(host_key)], check=True
            )
            self.host_public = ""
        host_key.chmod(0o600)
        (directory / "authorized_keys").write_text(client_public + "\n")
        config = directory / "sshd_config"
        config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
            f"AuthorizedKeysFile {directory / 'authorized_keys'}\nStrictModes no\nUsePAM no\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
            f"PidFile {directory / 'sshd.pid'}\n"
        )
        self.process = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError("sshd did not start: " + self.process.stderr.read().decode(errors="replace"))

    def connection(self, host_public: str | None = None) -> TaskConnection:
        return TaskConnection(
            "127.0.0.1",
            self.port,
            "root",
            self.client_private,
            host_public if host_public is not None else self.host_public,
            timeout=5.0,
        )

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture
def sshd(tmp_path):
    server = Sshd(tmp_path)
    yield server
    server.stop()


def test_logs_in_to_the_pinned_host_key_and_runs_true(sshd):
    with sshd.connection() as connection:
        connection.check()
        assert connection.is_active()


def test_refuses_a_host_that_presents_another_key(sshd):
    _, stranger = _keypair()
    with pytest.raises(HostKeyMismatch, match="not the one pinned"):
        sshd.connection(host_public=stranger).connect()


def test_refuses_a_host_that_offers_no_ed25519_key(tmp_path):
    server = Sshd(tmp_path, host_key_type="rsa")
    try:
        _, pinned = _keypair()
        with pytest.raises(HostKeyMismatch):
            server.connection(host_public=pinned).connect()
    finally:
        server.stop()


def test_a_malformed_pinned_key_is_an_error_before_connecting(sshd):
    with pytest.raises(SshError, match="ssh-ed25519"):
        sshd.connection(host_public="ssh-rsa AAAA").connect()


def test_nothing_listening_is_unavailable(sshd):
    sshd.stop()
    with pytest.raises(SshUnavailable):
        sshd.connection().connect()
    sshd.process = subprocess.Popen(["true"])  # the fixture's stop() needs a process


def test_a_stage_streams_output_and_returns_the_scripts_status(sshd):
    stdout, stderr = io.BytesIO(), io.BytesIO()
    pids: list[int] = []
    script = io.BytesIO(b"echo out; echo err >&2; exit 3\n")
    with sshd.connection() as connection:
        status = connection.run_script(script, "bash", stdout, stderr, on_started=pids.append)
    assert status == 3
    assert stdout.getvalue() == b"out\n"  # the PID marker line is not output
    assert stderr.getvalue() == b"err\n"
    assert len(pids) == 1 and pids[0] > 1


def test_killing_a_stage_ends_its_whole_process_group(sshd):
    status, _, left = kill_running_stage(sshd, b"sleep 300 & sleep 300\n", grace=0.5)
    assert status != 0
    # Nothing of the stage's group is left (the background sleep included), once the kernel has reaped it.
    assert not left


def kill_running_stage(sshd, script: bytes, grace: float) -> tuple[int, int, list[str]]:
    """Run `script` as a stage, kill its process group from a second connection once it has started; return
    the stage's status, its pid, and what is left of its group after up to 10 s for the kernel to reap it."""
    pids: list[int] = []
    started = threading.Event()
    result: dict[str, int] = {}

    def on_started(pid: int) -> None:
        pids.append(pid)
        started.set()

    with sshd.connection() as stage, sshd.connection() as killer:
        runner = threading.Thread(
            target=lambda: result.update(
                status=stage.run_script(io.BytesIO(script), "bash", io.BytesIO(), io.BytesIO(), on_started)
            )
        )
        runner.start()
        assert started.wait(10)
        killer.kill_process_group(pids[0], grace=grace)
        runner.join(20)
        assert not runner.is_alive()
    deadline = time.monotonic() + 10
    while (left := _group(pids[0])) and time.monotonic() < deadline:
        time.sleep(0.05)
    return result["status"], pids[0], left


def _group(pgid: int) -> list[str]:
    """The live (not zombie) processes of a process group, as `ps` lines."""
    ps = subprocess.run(["ps", "-o", "pid=,stat=,args=", "-g", str(pgid)], capture_output=True, text=True)
    return [line for line in ps.stdout.splitlines() if line.split()[1][0] != "Z"]
