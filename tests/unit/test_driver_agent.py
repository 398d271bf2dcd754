"""The session agent's client side and protocol, against a real agent process (no task: the sandbox e2e tests
in tests/e2e/test_driver_agent.py cover stages on real sshd)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from local_driver import agent_client
from local_driver.agent_client import (
    AgentGone,
    Lines,
    RemoteStage,
    _metadata_directory,
    _run_command_line,
    stage_request,
)
from sandbox.sigv4 import Identity, verify
from tests.conftest import wait_until
from tests.unit.test_driver_cli import runner_env, write_toml


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--config", "/f.toml", "custom", "run", "/s", "build_script"], ("/f.toml", "/s")),
        (["-config=/f.toml", "-log-level", "info", "c", "r", "/s", "step_x", "extra"], ("/f.toml", "/s")),
        (["custom", "run", "/s", "build_script"], ("config.toml", "/s")),
        (["--debug", "--config", "/f.toml", "custom", "run", "/s", "build_script"], None),
        (["--config", "/f.toml", "custom", "prepare"], None),
        (["--config", "/f.toml", "custom", "run", "/s"], None),
        (["--config"], None),
        (["--version"], None),
    ],
)
def test_only_a_plain_run_command_line_takes_the_quick_path(argv, expected):
    assert _run_command_line(argv) == expected


def test_the_agent_is_told_the_job_key_variables_and_nothing_else_of_the_job(tmp_path):
    env = runner_env(tmp_path, CUSTOM_ENV_CI_SERVER_URL="https://gitlab.example.com")
    request = stage_request("fargate.toml", env)
    assert request["config"] == os.path.abspath("fargate.toml")
    assert request["env"] == {
        "CUSTOM_ENV_CI_JOB_ID": "5005",
        "CUSTOM_ENV_CI_RUNNER_SHORT_TOKEN": "t3sT1234",
        "CUSTOM_ENV_CI_SERVER_URL": "https://gitlab.example.com",
    }
    assert "glcbt-secret-token" not in str(request)


def test_the_switch_turns_the_agent_off():
    assert agent_client.enabled({})
    assert not agent_client.enabled({agent_client.ENV_SWITCH: "off"})


def test_the_run_path_loads_nothing_but_the_cli_and_the_agent_client(tmp_path):
    """What a stage served by the agent imports beyond the interpreter's start: no SSH or AWS code, and not
    even `re`, `json`, `socket` or `enum` (each costs every stage milliseconds)."""
    probe = """
import sys
before = set(sys.modules)
from local_driver import cli, agent_client
agent_client._run_command_line(["custom", "run", "/s", "x"])
loaded = sorted(set(sys.modules) - before)
import json
print(json.dumps(loaded))
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    loaded = json.loads(result.stdout)
    assert set(loaded) <= {
        "__future__",
        "_socket",
        "local_driver",
        "local_driver.agent_client",
        "local_driver.cli",
    }
    assert "local_driver.agent_client" in loaded


@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
        max_leaves=10,
    )
)
def test_the_clients_json_encoder_writes_what_json_reads_back(value):
    assert json.loads(agent_client.encode_json(value)) == value


def test_a_stage_answer_is_one_line_whatever_its_message(tmp_path):
    left, right = socket.socketpair()
    try:
        Lines(left).say("lost", "connection reset\nby peer\r\n")
        Lines(left).say("exit", 7)
        heard = Lines(right)
        assert heard.hear() == ("lost", "connection reset by peer")
        assert heard.hear() == ("exit", "7")
    finally:
        left.close()
        right.close()


@contextlib.contextmanager
def running_agent(directory: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """A real agent process on `directory`, stopped on the way out. By default it gets the environment this
    test process started with, which is what the agent compares its callers' AWS_* variables with
    (/proc/PID/environ), whatever earlier tests did to os.environ since."""
    if env is None:
        items = Path("/proc/self/environ").read_bytes().split(b"\0")
        env = dict(item.decode(errors="surrogateescape").split("=", 1) for item in items if b"=" in item)
    directory.mkdir(mode=0o700)
    process = subprocess.Popen(
        [sys.executable, "-m", "local_driver.agent", "--dir", str(directory), "--exit-idle", "30"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while not (directory / agent_client.SOCKET_NAME).exists():
            assert process.poll() is None, "the agent exited at start"
            assert time.monotonic() < deadline, "the agent did not start"
            time.sleep(0.02)
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(30)


@pytest.fixture
def agent(tmp_path):
    """A real agent on tmp_path/meta (the unit tests' fargate.toml points there)."""
    with running_agent(tmp_path / "meta") as process:
        yield tmp_path / "meta", process


def test_a_stage_of_a_job_with_no_state_is_not_run_and_run_is_told_to_go_direct(tmp_path, agent):
    directory, _ = agent
    toml = write_toml(tmp_path)
    script = tmp_path / "script"
    script.write_text("echo never\n")
    remote = RemoteStage(str(directory))
    with open(script, "rb") as f:
        remote.start(stage_request(str(toml), runner_env(tmp_path)), f.fileno(), 1, 2)
    try:
        result = remote.wait()
    finally:
        remote.close()
    assert result.unavailable == "job t3sT1234-5005 has no running task on record"
    assert (result.status, result.lost) == (None, None)


def test_a_config_for_another_directory_is_not_served(tmp_path, agent):
    directory, _ = agent
    other = tmp_path / "other"
    other.mkdir()
    toml = write_toml(other)
    remote = RemoteStage(str(directory))
    remote.start(stage_request(str(toml), runner_env(tmp_path)), 0, 1, 2)
    try:
        result = remote.wait()
    finally:
        remote.close()
    assert "[TaskMetadata] Directory is not" in result.unavailable


def test_a_second_agent_for_the_same_directory_exits_at_once(agent):
    directory, first = agent
    second = subprocess.run(
        [sys.executable, "-m", "local_driver.agent", "--dir", str(directory)], timeout=30, check=False
    )
    assert second.returncode == 0
    assert first.poll() is None
    assert agent_client.request(str(directory), {"op": "stats"})["pid"] == first.pid


def test_the_socket_is_0600_and_shutdown_removes_it(agent):
    directory, process = agent
    sock = directory / agent_client.SOCKET_NAME
    assert sock.stat().st_mode & 0o777 == 0o600
    assert agent_client.request(str(directory), {"op": "shutdown"}) == {"ok": True}
    assert process.wait(30) == 0
    assert not sock.exists()
    assert not (directory / agent_client.PID_NAME).exists()
    with pytest.raises(AgentGone):
        agent_client.request(str(directory), {"op": "stats"})


def test_a_bad_request_gets_an_error_and_the_agent_keeps_serving(agent):
    directory, _ = agent
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(str(Path(directory) / agent_client.SOCKET_NAME))
    raw.sendall(b"not json\n")
    assert raw.recv(100) == b""  # dropped
    raw.close()
    assert agent_client.request(str(directory), {"op": "nonsense"}) == {"error": "bad request 'nonsense'"}
    assert agent_client.request(str(directory), {"op": "stats"})["jobs"] == {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[TaskMetadata]\nDirectory = "/var/lib/fargate"\n', "/var/lib/fargate"),
        ("[taskmetadata]\n  directory='/m' # comment\n", "/m"),
        ('[Fargate]\nDirectory = "/not/this"\n[TaskMetadata]\nDirectory = "/this"\n', "/this"),
        ('[TaskMetadata]\nDirectory = "relative"\n', None),
        ('[TaskMetadata]\nDirectory = "/with\\\\escape"\n', None),
        ('[TaskMetadata]\nDirectory = """/multi"""\n', None),
        ("[SSH]\nPort = 22\n", None),
    ],
)
def test_the_quick_path_finds_the_metadata_directory_or_leaves_it_to_the_driver(tmp_path, text, expected):
    config = tmp_path / "fargate.toml"
    config.write_text(text)
    assert _metadata_directory(str(config)) == expected


def _sign_as(
    env: dict[str, str], directory: Path, toml: Path, method: str, path: str, body: bytes
) -> dict | None:
    """agent_client.sign from a process started with `env` (the agent reads its callers' environments)."""
    probe = (
        "import json, sys\n"
        "from local_driver import agent_client\n"
        "print(json.dumps(agent_client.sign(*sys.argv[1:5], sys.argv[5].encode())))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(directory), str(toml), method, path, body.decode()],
        env={**env, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout)


def test_the_agent_signs_api_requests_that_verify_for_its_own_directory_only(tmp_path):
    # The runner manager's environment, and nothing else of this machine's (no ~/.aws, no AWS_PROFILE).
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "AWS_ACCESS_KEY_ID": "AKIDRUNNER",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t-key",
        "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
    }
    directory, toml = tmp_path / "meta", write_toml(tmp_path)
    body = b'{"reason":"cleanup"}'
    path = "/api/jobs/t3sT1234-5005"
    with running_agent(directory, env) as agent_process:
        # The first request may outlast the client's wait while the fresh agent loads botocore.
        headers = wait_until(
            lambda: _sign_as(env, directory, toml, "DELETE", path, body), 60, 0.1, "a signature"
        )
        assert "s3cr3t-key" not in str(headers)
        identity = Identity("runner", "arn:aws:iam::1:user/runner", "AIDA", "AKIDRUNNER", "s3cr3t-key")
        url = "http://127.0.0.1:9" + path
        assert verify({"AKIDRUNNER": identity}, "eu-west-1", "DELETE", url, headers, body) == identity
        # Another directory's config, or a request that is not the API's: the caller signs itself.
        other = tmp_path / "other"
        other.mkdir()
        assert _sign_as(env, directory, write_toml(other), "GET", "/api/health", b"") is None
        assert _sign_as(env, directory, toml, "PUT", "/api/jobs", b"") is None
        assert agent_client.request(str(directory), {"op": "stats"})["signed"] >= 1
        # The runner's keys were rotated: the caller signs itself, and the agent, whose heartbeats would fail
        # with the old keys, gives the directory up for a new agent and exits.
        rotated = {**env, "AWS_ACCESS_KEY_ID": "AKIDROTATED", "AWS_SECRET_ACCESS_KEY": "rotated"}
        assert _sign_as(rotated, directory, toml, "GET", "/api/health", b"") is None
        assert agent_process.wait(30) == 0
        assert not (directory / agent_client.SOCKET_NAME).exists()
        assert "AWS environment changed" in (directory / agent_client.LOG_NAME).read_text()
        assert "rotated" not in (directory / agent_client.LOG_NAME).read_text()


def test_an_answer_run_does_not_know_is_a_lost_stage_never_a_reason_to_run_it_again():
    """E.g. an agent of another protocol version: it may have started the stage already."""
    left, right = socket.socketpair()
    try:
        left.sendall(b'{"started":42}\n')
        remote = RemoteStage("/nonexistent")
        remote.lines = Lines(right)
        result = remote.wait()
        assert result.unavailable is None and result.status is None
        assert "does not know" in result.lost
    finally:
        left.close()
        right.close()
