"""The task entrypoint (images/debian/entrypoint.sh) against a fake ECS and orchestrator, with the real sshd
and ssh: it refuses to start without what ECS gives it, publishes its own host key signed with the task
role, lets sshd listen while the publish runs (nothing logs in before the orchestrator has named the CA),
and stops the task when the key is refused, even once sshd is up."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

ENTRYPOINT = Path(__file__).resolve().parents[2] / "images" / "debian" / "entrypoint.sh"
TASK_ID = "0123456789abcdef0123456789abcdef"
TARGET = ("root@127.0.0.1", "echo logged-in")


def _bwrap(*, die_with_parent: bool = False) -> list[str]:
    """A throwaway mount namespace (its own /run), so the entrypoint cannot touch the host's files."""
    argv = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/run"]
    return [*argv, *(["--die-with-parent"] if die_with_parent else []), "--", str(ENTRYPOINT)]


def _entrypoint(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        _bwrap(),
        env={"PATH": "/usr/sbin:/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class _FakeEcsAndOrchestrator:
    """What a task reaches at boot: the metadata and credentials endpoints and the orchestrator, which answers
    the host key's PUT with `status` and `answer` once `release` is set (every PUT is recorded)."""

    def __init__(self, status: int, answer: dict, *, held: bool = False, task_arn: str | None = None) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        fake = self
        self.puts: list[tuple[str, dict, bytes]] = []
        self.release = threading.Event()
        if not held:
            self.release.set()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/meta/task":
                    self._send(200, {"TaskARN": task_arn or f"arn:aws:ecs:eu-west-1:1:task/c/{TASK_ID}"})
                else:
                    self._send(200, {"AccessKeyId": "ASIAX", "SecretAccessKey": "s3cr3t", "Token": "t0k"})

            def do_PUT(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                fake.puts.append((self.path, dict(self.headers), body))
                fake.release.wait(30)
                self._send(status, answer)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def env(self) -> dict[str, str]:
        return {
            "FARGATE_CI_API_URL": f"{self.url}/api",
            "ECS_CONTAINER_METADATA_URI_V4": f"{self.url}/meta",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": f"{self.url}/creds",
            "AWS_REGION": "eu-west-1",
        }

    def published_key(self) -> str:
        return json.loads(self.puts[0][2])["host_key"]


class _Task:
    """The entrypoint running (sshd on a port of its own on 127.0.0.1), its stderr in a file."""

    def __init__(self, fake: _FakeEcsAndOrchestrator, tmp_path: Path) -> None:
        self.port = _free_port()
        self.log = tmp_path / "task.log"
        env = {
            "PATH": "/usr/sbin:/usr/bin:/bin",
            **fake.env(),
            "SSH_PORT": str(self.port),
            "SSHD_LISTEN_ADDRESS": "127.0.0.1",
        }
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                _bwrap(die_with_parent=True),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    def stderr(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)


@pytest.fixture
def tasks(tmp_path):
    started: list[_Task] = []

    def start(fake: _FakeEcsAndOrchestrator) -> _Task:
        task = _Task(fake, tmp_path)
        started.append(task)
        return task

    yield start
    for task in started:
        task.stop()


class _Client:
    """OpenSSH's client with a key certified by a CA of our own for the task's id (its principal), pinning
    the host key the task published."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path / "client"
        self.dir.mkdir()
        keygen = ["ssh-keygen", "-q", "-N", ""]
        subprocess.run([*keygen, "-t", "ecdsa", "-b", "256", "-f", str(self.dir / "ca")], check=True)
        subprocess.run([*keygen, "-t", "ed25519", "-f", str(self.dir / "id")], check=True)
        certify = [
            "ssh-keygen",
            "-q",
            "-s",
            str(self.dir / "ca"),
            "-I",
            "test",
            "-n",
            TASK_ID,
            "-V",
            "-5m:+1h",
        ]
        subprocess.run([*certify, str(self.dir / "id.pub")], check=True)
        self.ca_line = " ".join((self.dir / "ca.pub").read_text().split()[:2])

    def login(self, port: int, host_key: str) -> subprocess.CompletedProcess:
        known = self.dir / "known_hosts"
        known.write_text(f"[127.0.0.1]:{port} {host_key}\n")
        options = {
            "IdentitiesOnly": "yes",
            "CertificateFile": self.dir / "id-cert.pub",
            "BatchMode": "yes",
            "UserKnownHostsFile": known,
            "StrictHostKeyChecking": "yes",
            "ConnectTimeout": 10,
        }
        flags = [part for name, value in options.items() for part in ("-o", f"{name}={value}")]
        return subprocess.run(
            ["ssh", "-F", "/dev/null", "-i", str(self.dir / "id"), *flags, "-p", str(port), *TARGET],
            capture_output=True,
            text=True,
            timeout=30,
        )


@pytest.mark.parametrize(
    "missing", ["FARGATE_CI_API_URL", "ECS_CONTAINER_METADATA_URI_V4", "AWS_CONTAINER_CREDENTIALS_FULL_URI"]
)
def test_entrypoint_refuses_to_start_without_what_ecs_and_the_orchestrator_give_it(missing: str):
    env = _FakeEcsAndOrchestrator(200, {}).env()
    del env[missing]
    result = _entrypoint(env)
    assert result.returncode == 78
    assert "entrypoint:" in result.stderr and ("not set" in result.stderr)


@pytest.mark.parametrize(
    "task_arn", ["arn:aws:ecs:eu-west-1:1:task/c/$(reboot)", "arn:aws:ecs:eu-west-1:1:task/c/"]
)
def test_entrypoint_refuses_a_task_id_it_cannot_read_before_publishing_anything(task_arn: str):
    fake = _FakeEcsAndOrchestrator(200, {}, task_arn=task_arn)
    result = _entrypoint({**fake.env(), "SSH_PORT": str(_free_port())})
    assert result.returncode == 78, result.stderr
    assert "cannot read the task's id from the task metadata endpoint" in result.stderr
    assert fake.puts == []


def test_entrypoint_publishes_its_own_host_key_signed_and_stops_when_the_orchestrator_refuses_it():
    fake = _FakeEcsAndOrchestrator(409, {"error": "HostKeyConflict", "message": "a different key"})
    env = {**fake.env(), "SSH_PORT": str(_free_port()), "SSHD_LISTEN_ADDRESS": "127.0.0.1"}
    result = _entrypoint(env)
    # Stopped by SIGINT (the shell before it exec'd sshd, or sshd after): 128 + 2, never 0.
    assert result.returncode == 130, result.stderr
    assert "refused the host key (409)" in result.stderr and "HostKeyConflict" in result.stderr
    assert "the task's host key was not accepted; stopping the task" in result.stderr
    [(path, headers, body)] = fake.puts  # a refusal is not retried
    assert path == f"/api/tasks/{TASK_ID}/host-key"
    # SigV4 for execute-api with the task role's temporary credentials (the token is a signed header).
    auth = headers["Authorization"]
    assert (
        auth.startswith("AWS4-HMAC-SHA256 Credential=ASIAX/")
        and "/eu-west-1/execute-api/aws4_request" in auth
    )
    assert "x-amz-security-token" in auth and headers["x-amz-security-token"] == "t0k"
    key = json.loads(body)["host_key"]
    assert key.startswith("ssh-ed25519 ") and "PRIVATE" not in body.decode()


def test_a_refusal_that_comes_after_sshd_started_still_stops_the_task(tasks):
    fake = _FakeEcsAndOrchestrator(409, {"error": "HostKeyConflict", "message": "a different key"}, held=True)
    task = tasks(fake)
    _wait(lambda: fake.puts and _listening(task.port), "sshd to listen while the publish is pending")

    fake.release.set()

    # sshd ended by SIGINT (128 + 2): a failure, where SIGTERM would have let it exit 0.
    assert task.process.wait(30) == 130, task.stderr()
    assert "refused the host key (409)" in task.stderr()
    assert "the task's host key was not accepted; stopping the task" in task.stderr()
    assert not _listening(task.port)


def test_nothing_logs_in_before_the_orchestrator_has_named_the_ca_then_its_certificates_do(tasks, tmp_path):
    client = _Client(tmp_path)
    answer = {"task_id": TASK_ID, "principal": TASK_ID, "user_ca_keys": [client.ca_line]}
    fake = _FakeEcsAndOrchestrator(200, answer, held=True)
    task = tasks(fake)
    _wait(lambda: fake.puts and _listening(task.port), "sshd to listen while the publish is pending")

    early = client.login(task.port, fake.published_key())

    # sshd presents the key being published (the pinning client got past it) but trusts no CA yet: the
    # certificate and the bare key are both refused (MaxAuthTries 2).
    assert early.returncode == 255, early.stderr
    assert "Too many authentication failures" in early.stderr or "Permission denied" in early.stderr
    assert "Host key verification failed" not in early.stderr
    assert "logged-in" not in early.stdout

    fake.release.set()
    _wait(lambda: "host key published" in task.stderr(), "the publish to finish")
    late = client.login(task.port, fake.published_key())

    assert late.returncode == 0 and late.stdout.strip() == "logged-in", late.stderr
    assert task.process.poll() is None  # sshd is the task's main process and goes on


def test_a_publish_that_never_succeeds_stops_the_task_after_host_key_publish_seconds(tmp_path):
    fake = _FakeEcsAndOrchestrator(503, {"error": "Throttled", "message": "not on record yet"})
    env = {
        **fake.env(),
        "SSH_PORT": str(_free_port()),
        "SSHD_LISTEN_ADDRESS": "127.0.0.1",
        "HOST_KEY_PUBLISH_SECONDS": "2",
    }
    result = _entrypoint(env)
    assert result.returncode == 130, result.stderr
    assert "could not publish the task's host key" in result.stderr and "within 2 s" in result.stderr
    assert len(fake.puts) >= 2  # 5xx is retried (a second apart, whole seconds counted)
