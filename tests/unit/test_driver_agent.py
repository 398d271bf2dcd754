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
from hypothesis import given, settings
from hypothesis import strategies as st

from fargate_ci_driver import cli
from fargate_ci_driver.agent import client, protocol
from fargate_ci_driver.agent.client import RemoteStage, stage_request
from fargate_ci_driver.agent.fastpath import run_command_line
from fargate_ci_driver.agent.protocol import AgentGone, Lines, Spot, _metadata_directory, environment_digest
from fargate_ci_driver.agent.server import orchestrator_route
from fargate_ci_driver.flags import VALUE_FLAGS
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
    assert run_command_line(argv) == expected


def test_the_agent_is_told_the_recorded_job_key_and_nothing_of_the_jobs_variables(tmp_path):
    toml = write_toml(tmp_path)
    spot = Spot.read(str(toml), runner_env(tmp_path))
    request = stage_request(spot, "t3sT1234-5005")
    assert request == {"op": "run", "config": str(toml), "job_key": "t3sT1234-5005"}
    assert "glcbt-secret-token" not in str(request)


def test_the_environment_digest_names_the_signing_environment_only(tmp_path):
    toml = write_toml(tmp_path)
    raw = toml.read_bytes()
    env = {"AWS_ACCESS_KEY_ID": "AKID1", "AWS_PROFILE": "ci", "PATH": "/bin", "CUSTOM_ENV_CI_JOB_ID": "1"}
    digest = environment_digest(str(toml), raw, env)
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert environment_digest(str(toml), raw, dict(env)) == digest  # deterministic, across processes too
    # What does not sign: other variables, the job's variables.
    assert (
        environment_digest(str(toml), raw, {**env, "PATH": "/usr/bin", "CUSTOM_ENV_CI_JOB_ID": "2"}) == digest
    )
    # What does: every AWS_* variable, the config's path and every byte of it (URL, region, profile, ...).
    changed = [
        environment_digest(str(toml), raw, {**env, "AWS_ACCESS_KEY_ID": "AKID2"}),
        environment_digest(str(toml), raw, {**env, "AWS_SESSION_TOKEN": "t"}),
        environment_digest(str(toml), raw, {k: v for k, v in env.items() if k != "AWS_PROFILE"}),
        environment_digest(str(tmp_path / "other.toml"), raw, env),
        environment_digest(str(toml), raw.replace(b"127.0.0.1:9", b"127.0.0.1:8"), env),
        environment_digest(str(toml), raw + b"\n", env),
        environment_digest(str(toml), raw, {"AWS_ACCESS_KEY_ID": "AKID1", "AWS_PROFILEci": ""}),
    ]
    assert digest not in changed and len(set(changed)) == len(changed)
    spot = Spot.read(str(toml), env)
    assert spot.directory == str(tmp_path / "meta")
    assert spot.socket == str(tmp_path / "meta" / f"agent-3-{digest}.sock")
    assert (spot.lock, spot.pid_file) == (spot.socket[:-5] + ".lock", spot.socket[:-5] + ".pid")


_FLAG = st.sampled_from(
    [
        *("--config", "-config", "---config", "--conf", "--log-level", "-log-level", "--log-format"),
        *("--log-file", "--task-def", "-platform-version", "--debug", "-debug", "--version", "--frob"),
    ]
)
_VALUE = st.sampled_from(["/c.toml", "debug", "INFO", "json", "nonsense", "-x", "td:1", ""])
_COMMAND_LINE = st.builds(
    lambda flags, head, tail: [token for flag in flags for token in flag] + head + tail,
    st.lists(
        st.one_of(
            st.tuples(_FLAG, _VALUE),
            st.tuples(_FLAG),
            st.builds(lambda flag, value: (f"{flag}={value}",), _FLAG, _VALUE),
        ),
        max_size=3,
    ),
    st.one_of(  # mostly a `run` (what the fast path is for), sometimes something else
        st.just(["custom", "run", "/s", "build_script"]),
        st.just(["c", "r", "/s", "x"]),
        st.tuples(
            st.sampled_from(["custom", "c", "prepare"]),
            st.sampled_from(["run", "r", "co", "cl", "p"]),
            st.sampled_from(["/s", "-s", "--"]),
            st.sampled_from(["build_script", "-x"]),
        ).map(list),
    ),
    st.lists(st.sampled_from(["extra", "--frob", "-x"]), max_size=2),
)


@settings(max_examples=1000)
@given(_COMMAND_LINE)
def test_whatever_the_fast_path_reads_the_cli_parser_reads_the_same_way(argv):
    """The fast path reads `run` command lines before the parser is loaded: it may decline any command line
    (the parser then reads it), but one it accepts must mean the same to the parser."""
    fast = run_command_line(argv)
    if fast is None:
        return
    args = cli.parse_args(argv)
    assert (args.command, args.config, args.script) == ("run", *fast)


def test_the_fast_path_knows_every_value_flag_of_the_cli_parser_and_their_choices():
    value_flags = {
        option.lstrip("-"): tuple(action.choices) if action.choices else None
        for action in cli.build_parser()._actions
        if action.option_strings and action.nargs != 0
        for option in action.option_strings
    }
    assert value_flags == VALUE_FLAGS


@pytest.mark.parametrize(
    "argv",
    [
        ["custom", "run", "/s", "build_script"],
        ["c", "r", "/s", "build_script", "extra"],
        ["-config", "/c.toml", "--log-level", "DEBUG", "--log-format=json", "custom", "run", "/s", "x"],
        ["--config=/c.toml", "--task-def", "td:1", "--platform-version", "1.4.0", "c", "run", "/s", "x"],
    ],
)
def test_the_runners_usual_run_command_lines_take_the_fast_path(argv):
    assert run_command_line(argv) is not None
    test_whatever_the_fast_path_reads_the_cli_parser_reads_the_same_way.hypothesis.inner_test(argv)


def test_the_switch_turns_the_agent_off():
    assert protocol.enabled({})
    assert not protocol.enabled({protocol.ENV_SWITCH: "off"})


def test_the_run_path_loads_nothing_but_the_cli_and_the_fast_path(tmp_path):
    """What a stage served by the agent imports beyond the interpreter's start: no SSH or AWS code, and not
    even `re`, `json`, `socket` or `enum` (each costs every stage milliseconds)."""
    probe = """
import sys
before = set(sys.modules)
from fargate_ci_driver import cli
from fargate_ci_driver.agent import fastpath
fastpath.run_command_line(["custom", "run", "/s", "x"])
loaded = sorted(set(sys.modules) - before)
import json
print(json.dumps(loaded))
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    loaded = json.loads(result.stdout)
    assert set(loaded) <= {
        "__future__",
        "_socket",
        "fargate_ci_driver",
        "fargate_ci_driver.agent",
        "fargate_ci_driver.agent.client",
        "fargate_ci_driver.agent.fastpath",
        "fargate_ci_driver.agent.protocol",
        "fargate_ci_driver.flags",
        "fargate_ci_driver.pids",
        "fargate_ci_driver.cli",
        "fargate_ci_driver.job_marker",
    }
    assert "fargate_ci_driver.agent.fastpath" in loaded


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
    assert json.loads(protocol.encode_json(value)) == value


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
def running_agent(toml: Path, env: dict[str, str] | None = None) -> Iterator[tuple[Spot, subprocess.Popen]]:
    """A real agent process for `toml` (whose directory is <its dir>/meta), stopped on the way out; it gets
    `env` (by default this process's environment) and so names its socket with that environment's digest."""
    env = dict(os.environ) if env is None else env
    spot = Spot.read(str(toml), env)
    directory = Path(spot.directory)
    directory.mkdir(mode=0o700, exist_ok=True)
    argv = [sys.executable, "-m", "fargate_ci_driver.agent", "--dir", str(directory), "--config", str(toml)]
    process = subprocess.Popen(
        [*argv, "--exit-idle", "30"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    process.env = env  # what it was started with, for a test that starts a second one like it
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(spot.socket):
            assert process.poll() is None, f"the agent exited at start: {process.stderr.read()}"
            assert time.monotonic() < deadline, "the agent did not start"
            time.sleep(0.02)
        yield spot, process
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(30)
        process.stderr.close()


@pytest.fixture
def agent(tmp_path):
    """A real agent for the unit tests' fargate.toml (its directory is tmp_path/meta)."""
    with running_agent(write_toml(tmp_path)) as (spot, process):
        yield spot, process


def test_a_stage_of_a_job_with_no_state_is_not_run_and_run_is_told_to_go_direct(tmp_path, agent):
    spot, _ = agent
    script = tmp_path / "script"
    script.write_text("echo never\n")
    remote = RemoteStage(spot)
    with open(script, "rb") as f:
        remote.start(stage_request(spot, "t3sT1234-5005"), f.fileno(), 1, 2)
    try:
        result = remote.wait()
    finally:
        remote.close()
    assert result.unavailable == "job t3sT1234-5005 has no running task on record"
    assert (result.status, result.lost) == (None, None)


@pytest.mark.parametrize(
    ("config", "key", "answer"),
    [
        ("/elsewhere/fargate.toml", "t3sT1234-5005", "this session agent serves"),
        (None, "../t3sT1234-5005", "is not a job key"),
        (None, "", "the request names no job key"),
    ],
)
def test_a_stage_for_another_config_or_no_job_key_is_not_served(agent, config, key, answer):
    spot, _ = agent
    remote = RemoteStage(spot)
    remote.start({"op": "run", "config": config or spot.config, "job_key": key}, 0, 1, 2)
    try:
        result = remote.wait()
    finally:
        remote.close()
    assert answer in result.unavailable


def test_an_agent_refuses_a_config_for_another_directory(tmp_path):
    toml = write_toml(tmp_path)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fargate_ci_driver.agent",
            "--dir",
            str(tmp_path / "other"),
            "--config",
            str(toml),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "its [TaskMetadata] Directory is not" in done.stderr
    assert not (tmp_path / "other").exists()


def test_a_second_agent_for_the_same_environment_exits_at_once(tmp_path, agent):
    spot, first = agent
    second = subprocess.run(
        [sys.executable, "-m", "fargate_ci_driver.agent", "--dir", spot.directory, "--config", spot.config],
        timeout=30,
        check=False,
        # Exactly the environment the first agent got, not this process's as it is now: in the whole suite an
        # earlier tier's leftovers may change an AWS_* variable meanwhile, and then the second agent names
        # another socket and, rightly, serves it.
        env=first.env,
    )
    assert second.returncode == 0
    assert first.poll() is None
    assert client.request(spot, {"op": "stats"})["pid"] == first.pid


def test_the_socket_is_0600_named_by_its_digest_and_shutdown_removes_it(agent):
    spot, process = agent
    sock = Path(spot.socket)
    assert sock.name.startswith("agent-3-") and len(sock.name) == len("agent-3-.sock") + 16
    assert sock.stat().st_mode & 0o777 == 0o600
    assert client.agent_pid(spot) == client.agent_pid(spot.directory) == process.pid
    assert client.request(spot, {"op": "shutdown"}) == {"ok": True}
    assert process.wait(30) == 0
    assert not sock.exists()
    assert not os.path.exists(spot.pid_file)
    with pytest.raises(AgentGone):
        client.request(spot, {"op": "stats"})


def test_a_bad_request_gets_an_error_and_the_agent_keeps_serving(agent):
    spot, _ = agent
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(spot.socket)
    raw.sendall(b"not json\n")
    assert raw.recv(100) == b""  # dropped
    raw.close()
    assert client.request(spot, {"op": "nonsense"}) == {"error": "bad request 'nonsense'"}
    assert client.request(spot, {"op": "stats"})["jobs"] == {}


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
    assert _metadata_directory(text.encode()) == expected


def _sign_as(env: dict[str, str], toml: Path, method: str, path: str, body: bytes) -> dict | None:
    """client.sign from a driver process started with `env`: it finds the agent of its environment."""
    probe = (
        "import json, os, sys\n"
        "from fargate_ci_driver.agent import client, protocol\n"
        "spot = protocol.Spot.read(sys.argv[1], os.environ)\n"
        "print(json.dumps(client.sign(spot, *sys.argv[2:4], sys.argv[4].encode())))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(toml), method, path, body.decode()],
        env={**env, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout)


def test_the_agent_signs_only_its_orchestrators_routes_for_its_own_environment(tmp_path):
    # The runner manager's environment, and nothing else of this machine's (no ~/.aws, no AWS_PROFILE).
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "AWS_ACCESS_KEY_ID": "AKIDRUNNER",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t-key",
        "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
    }
    toml = write_toml(tmp_path)
    body = b'{"attempt":1,"reason":"cleanup"}'
    path = "/api/jobs/t3sT1234-5005"
    with running_agent(toml, env) as (spot, agent_process):
        # The first request may outlast the client's wait while the fresh agent loads botocore.
        headers = wait_until(lambda: _sign_as(env, toml, "DELETE", path, body), 60, 0.1, "a signature")
        assert "s3cr3t-key" not in str(headers)
        identity = Identity("runner", "arn:aws:iam::1:user/runner", "AIDA", "AKIDRUNNER", "s3cr3t-key")
        url = "http://127.0.0.1:9" + path
        assert verify({"AKIDRUNNER": identity}, "eu-west-1", "DELETE", url, headers, body) == identity
        # Requests that are not the orchestrator's routes: the agent refuses, the caller would sign itself.
        for method, other in (
            ("PUT", "/api/jobs"),
            ("GET", "/elsewhere/jobs/t3sT1234-5005"),
            ("GET", "/api/jobs/t3sT1234-5005/../../admin"),
            ("POST", "/api/jobs/t3sT1234-5005/other"),
            ("GET", "/api/"),
        ):
            assert _sign_as(env, toml, method, other, b"") is None, (method, other)
        signed = client.request(spot, {"op": "stats"})["signed"]
        assert signed >= 1
        # The runner's keys were rotated: its driver processes compute another socket name, find no agent
        # there and sign themselves (no peeking at anyone's /proc/PID/environ); this agent serves on.
        rotated = {**env, "AWS_ACCESS_KEY_ID": "AKIDROTATED", "AWS_SECRET_ACCESS_KEY": "rotated"}
        assert Spot.read(str(toml), rotated).socket != spot.socket
        assert _sign_as(rotated, toml, "GET", "/api/health", b"") is None
        assert client.request(spot, {"op": "stats"})["signed"] == signed
        assert agent_process.poll() is None
        assert _sign_as(env, toml, "GET", "/api/health", b"") is not None
        assert "rotated" not in (Path(spot.directory) / protocol.LOG_NAME).read_text()


@pytest.mark.parametrize(
    ("method", "path", "ok"),
    [
        ("GET", "/api/health", True),
        ("POST", "/api/jobs", True),
        ("GET", "/api/jobs/t3sT1234-5", True),
        ("DELETE", "/api/jobs/t3sT1234-5", True),
        ("POST", "/api/jobs/t3sT1234-5/heartbeat", True),
        ("GET", "/api/jobs", False),
        ("POST", "/api/jobs/t3sT1234-5", False),
        ("GET", "/api/jobs/t3sT1234-5/heartbeat", False),
        ("POST", "/api/jobs/t3sT1234-5/heartbeat/x", False),
        ("GET", "/api/jobs/..", False),
        ("GET", "/apix/health", False),
        ("GET", "/health", False),
    ],
)
def test_the_orchestrators_routes(method, path, ok):
    assert orchestrator_route("/api", method, path) is ok


def test_an_answer_run_does_not_know_is_a_lost_stage_never_a_reason_to_run_it_again():
    """E.g. an agent of another protocol version: it may have started the stage already."""
    left, right = socket.socketpair()
    try:
        left.sendall(b'{"started":42}\n')
        remote = RemoteStage(Spot("/nonexistent", "/nonexistent/f.toml", "0" * 16))
        remote.lines = Lines(right)
        result = remote.wait()
        assert result.unavailable is None and result.status is None
        assert "does not know" in result.lost
    finally:
        left.close()
        right.close()
