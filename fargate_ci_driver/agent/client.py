"""The driver's side of the session agent's protocol (`protocol`): a stage run through the agent
(`RemoteStage`), one-off requests (`request`, `sign`), and starting, handing jobs to and stopping agents.
Standard library only, and only modules built into the interpreter on a stage's path (`fastpath`)."""

from __future__ import annotations

import sys

from fargate_ci_driver.agent.protocol import (
    CONNECT_TIMEOUT,
    ENV_EXIT_IDLE,
    ENV_JOB_IDLE,
    AgentGone,
    Lines,
    Spot,
    StageResult,
    connect,
    connect_socket,
    enabled,
    pid_of,
    spots,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

# How long a cancelled `run` waits for the agent to confirm the remote stage is killed (its grace is 2 s).
KILL_WAIT = 15.0
# How long `stop` waits for the agent's process to end.
EXIT_WAIT = 5.0


def stage_request(spot: Spot, job_key: str) -> dict:
    """What the agent needs to run a stage: the job (its key, from trusted data) and the config it serves."""
    return {"op": "run", "config": spot.config, "job_key": job_key}


class RemoteStage:
    """One stage run through the agent."""

    def __init__(self, spot: Spot) -> None:
        self.spot = spot
        self.lines: Lines | None = None
        self.started = False

    def start(self, request: dict, script_fd: int, stdout_fd: int, stderr_fd: int) -> None:
        """Raises AgentGone when there is no agent to ask."""
        self.lines = connect(self.spot, timeout=None)
        self.lines.send(request, [script_fd, stdout_fd, stderr_fd])

    def wait(self, on_started: Callable[[int], None] | None = None) -> StageResult:
        """The stage's outcome (`unavailable` when the agent ran nothing)."""
        assert self.lines is not None
        while True:
            try:
                word, value = self.lines.hear()
            except AgentGone as exc:
                return StageResult(lost=str(exc))
            if word == "unavailable":
                return StageResult(unavailable=value)
            if word == "lost":
                return StageResult(lost=value)
            if word not in ("started", "exit"):  # never "unavailable": its sender may have started the stage
                return StageResult(
                    lost=f"the session agent sent {word[:40]!r}, which this driver does not know"
                )
            try:
                number = int(value)
            except ValueError:
                return StageResult(lost=f"the session agent sent a bad {word!r} line")
            if word == "exit":
                return StageResult(status=number)
            self.started = True
            if on_started is not None:
                on_started(number)

    def cancel(self) -> bool:
        """Ask the agent to kill the remote stage; True once it says so."""
        if self.lines is None:
            return False
        try:
            self.lines.sock.settimeout(KILL_WAIT)
            self.lines.send({"op": "cancel"})
            while True:
                word, value = self.lines.hear()
                if word == "killed":
                    return value == "1"
                if word != "started":
                    return word == "exit"
        except AgentGone:
            return False

    def close(self) -> None:
        if self.lines is not None:
            self.lines.close()
            self.lines = None


def request(where: Spot | str, message: dict, timeout: float = CONNECT_TIMEOUT) -> dict:
    """One request and its answer ("open", "drop", "stats", "shutdown"). Raises AgentGone. `where` is a
    spot, or (tools and tests) a directory, meaning its newest agent."""
    lines = connect(where, timeout=timeout)
    try:
        lines.send(message)
        return lines.receive()
    finally:
        lines.close()


def sign(spot: Spot, method: str, path: str, data: bytes) -> dict[str, str] | None:
    """The headers of a signed API request, signed by the agent (botocore already loaded, credentials already
    resolved); None when no agent answers or it cannot sign, and the caller signs itself."""
    try:
        body = data.decode()
        answer = request(
            spot,
            {
                "op": "sign",
                "config": spot.config,
                "method": method,
                "path": path,
                "body": body,
            },
        )
    except (AgentGone, UnicodeDecodeError):
        return None
    headers = answer.get("headers")
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        return None
    return headers


def spawn(spot: Spot, environ: Mapping[str, str], open_job: str | None = None) -> None:
    """Start the agent for `spot` in its own session and do not wait for it. Two racing starts are harmless:
    the agent that does not get the lock file exits at once. It gets this process's environment (less the
    job's variables), so it names itself with the same digest."""
    argv = [sys.executable, "-m", "fargate_ci_driver.agent", "--dir", spot.directory, "--config", spot.config]
    for option, name in (("--job-idle", ENV_JOB_IDLE), ("--exit-idle", ENV_EXIT_IDLE)):
        if environ.get(name):
            argv += [option, environ[name]]
    if open_job:
        argv += ["--open", open_job]
    # Never the job's variables (they carry CI_JOB_TOKEN), nor its directory: the agent outlives the job.
    env = {k: v for k, v in environ.items() if not k.startswith("CUSTOM_ENV_") and k not in _JOB_ONLY}
    import contextlib
    import subprocess  # only here: starting an agent is rare

    with contextlib.suppress(OSError):
        subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=True,
            start_new_session=True,
            cwd="/",
            env=env,
        )


_JOB_ONLY = frozenset({"TMPDIR", "JOB_RESPONSE_FILE", "BUILD_EXIT_CODE_FILE"})


def ensure_running(spot: Spot | None, environ: Mapping[str, str]) -> None:
    """Start the spot's agent unless one answers."""
    if spot is None or not enabled(environ):
        return
    try:
        connect(spot).close()
    except AgentGone:
        spawn(spot, environ)


def hand_over(spot: Spot | None, job_key: str, environ: Mapping[str, str]) -> None:
    """After prepare: let the agent open the job's connection now, so the first stage finds it ready."""
    if spot is None or not enabled(environ):
        return
    try:
        request(spot, {"op": "open", "job_key": job_key})
    except AgentGone:
        spawn(spot, environ, open_job=job_key)


def drop(spot: Spot | None, job_key: str, environ: Mapping[str, str]) -> None:
    """At cleanup: close the job's connection. Best effort; the agent also drops it when the task stops."""
    if spot is None or not enabled(environ):
        return
    import contextlib  # not at the top: `run` must not pay for it

    with contextlib.suppress(AgentGone):
        request(spot, {"op": "drop", "job_key": job_key})


def stop(directory: str) -> None:
    """Ask every agent of `directory` to exit and wait (briefly) until their processes have; nothing running
    is fine."""
    import time

    from fargate_ci_driver.pids import alive  # not at the top: a stage never needs it

    for path in spots(directory):
        pid = pid_of(path[: -len(".sock")] + ".pid")
        try:
            request_socket(path, {"op": "shutdown"})
        except AgentGone:
            continue
        deadline = time.monotonic() + EXIT_WAIT
        while pid is not None and alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)


def request_socket(path: str, message: dict) -> dict:
    lines = connect_socket(path)
    try:
        lines.send(message)
        return lines.receive()
    finally:
        lines.close()


def agent_pid(where: Spot | str) -> int | None:
    """The pid the agent recorded (for a directory: its newest agent); None when none is running."""
    if isinstance(where, Spot):
        return pid_of(where.pid_file)
    found = spots(where)
    return pid_of(found[0][: -len(".sock")] + ".pid") if found else None
