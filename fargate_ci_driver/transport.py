"""How a stage reaches the task and the orchestrator: one `Transport`, chosen once per stage by the context
(`StageContext.transport`), whose callers never ask which one they have.

- `AgentTransport`: through the session agent (`agent`), which holds the job's SSH connection,
  heartbeats while a stage runs, checks a starting task's sshd between prepare's looks at the API, and signs
  API requests with botocore loaded once. Whatever the agent cannot do (absent, or it cannot reach the task)
  it does the direct way, and it starts an agent for the next stage.
- `DirectTransport`: this process's own paramiko connection and heartbeat thread, and its own signatures.

Both give a stage's outcome as a `StageResult` (status, or `lost`); `run` judges it the same way for both.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, BinaryIO, Protocol, TextIO

from fargate_ci_driver.agent import client
from fargate_ci_driver.agent.protocol import AgentGone, Spot, StageResult
from fargate_ci_driver.errors import ApiError, Cancelled, HostKeyMismatch, SshError, SshUnavailable
from fargate_ci_driver.heartbeat import HEARTBEAT_TIMEOUT, Heartbeat
from fargate_ci_driver.logs import fields, log

if TYPE_CHECKING:
    from fargate_ci_driver.api import ApiClient, RemoteSigner
    from fargate_ci_driver.metadata import JobState, MetadataDir
    from fargate_ci_driver.settings import Settings
    from fargate_ci_driver.ssh import TaskConnection

CONNECT_ATTEMPTS = 3
CONNECT_TIMEOUT = 10.0
READY_TIMEOUT = 5.0

# How the session agent names the failures of its SSH check.
SSH_ERRORS: dict[str, type[SshError]] = {
    "hostkey": HostKeyMismatch,
    "unavailable": SshUnavailable,
    "ssh": SshError,
}


class Transport(Protocol):
    """Run a stage, check SSH, report ready, sign a request; plus the agent's lifecycle hooks, which the
    direct transport has nothing to do for."""

    def run_stage(
        self, state: JobState, script: BinaryIO, stage: str, on_trouble: Callable[[], None]
    ) -> StageResult:
        """Run `script` in the task's shell, its output into the runner's streams. `on_trouble` is called
        before a connection failure is reported (it raises when the task is being taken away). Raises
        Cancelled after killing the remote stage; SshUnavailable when the task cannot be reached at all."""
        ...

    def check_ssh(self, state: JobState, timeout: float, wait: float, task_running: bool) -> bool:
        """Log in to the task and run `true`, for up to `wait` seconds; True once that worked. Before the task
        runs a transport may decline to try (False). SSH failures raise by kind (HostKeyMismatch, ...)."""
        ...

    def report_ready(self, state: JobState, seconds: float) -> None:
        """prepare's one-off "SSH ready after N s" report; never raises."""
        ...

    def signer(self) -> RemoteSigner | None:
        """Who signs this process's API requests instead of it; None: it signs itself."""
        ...

    def job_starting(self, key: str) -> None:
        """prepare recorded the job: get ready to serve it."""
        ...

    def job_ready(self, key: str) -> None:
        """prepare saw the task's sshd answer: the stages come next."""
        ...

    def job_done(self, key: str) -> None:
        """cleanup: the job's stages are over."""
        ...


class DirectTransport:
    """Everything in this process: its own connection per stage (paramiko loaded only here) and its own
    heartbeat thread while a stage runs."""

    def __init__(
        self,
        settings: Settings,
        metadata: MetadataDir,
        api: Callable[..., ApiClient],
        stdout: TextIO,
        stderr: TextIO,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.metadata = metadata
        self.api = api
        self.stdout = stdout
        self.stderr = stderr
        self.sleep = sleep

    def run_stage(
        self, state: JobState, script: BinaryIO, stage: str, on_trouble: Callable[[], None]
    ) -> StageResult:
        heartbeat: Heartbeat | None = None
        connection: TaskConnection | None = None
        key = state.job_key
        try:
            connection = self._connect(state, on_trouble)
            pids: list[int] = []

            def started(pid: int) -> None:
                nonlocal heartbeat
                pids.append(pid)
                log.debug("stage started", extra=fields(job_key=key, stage=stage, remote_pid=pid))
                # Only now: the import and the request overlap the remote work instead of delaying it.
                if state.attempt:
                    heartbeat = Heartbeat(
                        lambda: self.api(timeout=HEARTBEAT_TIMEOUT),
                        key,
                        state.attempt,
                        self.settings.heartbeat_interval,
                    ).start()

            try:
                status = connection.run_script(
                    script,
                    self.settings.ssh_shell,
                    self.stdout.buffer,
                    self.stderr.buffer,
                    on_started=started,
                )
            except Cancelled:
                if pids:
                    _kill_quietly(connection, pids[0])
                raise
            except SshError as exc:
                return StageResult(lost=str(exc))
            return StageResult(status=status)
        finally:
            if connection is not None:
                connection.close()
            if heartbeat is not None:
                heartbeat.stop()

    def _connect(self, state: JobState, on_trouble: Callable[[], None]) -> TaskConnection:
        from fargate_ci_driver.ssh import TaskConnection

        pem = self.metadata.load_client_key(state.job_key)
        for attempt in range(1, CONNECT_ATTEMPTS + 1):
            connection = TaskConnection(
                state.address,
                state.ssh_port,
                state.ssh_user,
                pem,
                state.host_public_key,
                timeout=CONNECT_TIMEOUT,
            )
            try:
                connection.connect()
                return connection
            except SshUnavailable as exc:
                # A task that is gone will not come back: say why at once instead of retrying.
                on_trouble()
                if attempt == CONNECT_ATTEMPTS:
                    raise
                log.warning("ssh connect failed; retrying", extra=fields(error=str(exc), attempt=attempt))
                self.sleep(attempt * 1.0)
        raise AssertionError("unreachable")

    def check_ssh(self, state: JobState, timeout: float, wait: float, task_running: bool) -> bool:
        """One login of our own once the task runs (before, an unanswered connect could cost `timeout`)."""
        if not task_running:
            return False
        from fargate_ci_driver.ssh import TaskConnection

        connection = TaskConnection(
            state.address,
            state.ssh_port,
            state.ssh_user,
            self.metadata.load_client_key(state.job_key),
            state.host_public_key,
            timeout,
        )
        with connection:
            connection.check()
        return True

    def report_ready(self, state: JobState, seconds: float) -> None:
        if not state.attempt:
            return
        try:
            self.api(timeout=READY_TIMEOUT).heartbeat(
                state.job_key, ssh_ready_seconds=seconds, attempt=state.attempt
            )
        except ApiError as exc:  # a metric is never worth failing the job over
            log.warning("start-latency heartbeat failed", extra=fields(job_key=state.job_key, error=str(exc)))

    def signer(self) -> RemoteSigner | None:
        return None

    def job_starting(self, key: str) -> None:
        pass

    def job_ready(self, key: str) -> None:
        pass

    def job_done(self, key: str) -> None:
        pass


class AgentTransport:
    """Through the session agent of `spot`; `direct` does whatever the agent cannot. `served`: the stage fast
    path (`agent.fastpath`) already ran this process's stage through the agent; only its outcome is left."""

    def __init__(
        self,
        spot: Spot,
        environ: Mapping[str, str],
        direct: DirectTransport,
        served: StageResult | None = None,
    ) -> None:
        self.spot = spot
        self.environ = environ
        self.direct = direct
        self.served = served
        self.holds_job = False

    def run_stage(
        self, state: JobState, script: BinaryIO, stage: str, on_trouble: Callable[[], None]
    ) -> StageResult:
        if self.served is not None:
            return self.served
        result = self._through_agent(state.job_key, script, stage)
        if result is not None:
            return result
        script.seek(0)
        return self.direct.run_stage(state, script, stage, on_trouble)

    def _through_agent(self, key: str, script: BinaryIO, stage: str) -> StageResult | None:
        """The stage run on the agent's connection; None when the agent ran nothing (not running, or it could
        not reach the task). The agent's heartbeats stand in for ours while this process stays connected."""
        fds = _output_fds(self.direct.stdout, self.direct.stderr)
        if fds is None:
            return None
        remote = client.RemoteStage(self.spot)
        try:
            remote.start(client.stage_request(self.spot, key), script.fileno(), *fds)
        except AgentGone as exc:
            log.debug("no session agent; connecting directly", extra=fields(error=str(exc)))
            client.spawn(self.spot, self.environ, open_job=key)
            return None
        try:
            try:
                result = remote.wait(
                    lambda pid: log.debug(
                        "stage started", extra=fields(job_key=key, stage=stage, remote_pid=pid)
                    )
                )
            except Cancelled:
                if not remote.cancel():
                    log.warning("the session agent did not confirm the remote stage was killed")
                raise
        finally:
            remote.close()
        if result.unavailable is not None:
            log.info(
                "the session agent could not serve this stage; connecting directly",
                extra=fields(job_key=key, reason=result.unavailable),
            )
            return None
        return result

    def check_ssh(self, state: JobState, timeout: float, wait: float, task_running: bool) -> bool:
        """The agent's check, retried by the agent every 20 ms for up to `wait` seconds while sshd is not
        listening (even before the API has seen the task running: its address is known while PENDING); the
        agent keeps the connection for the stages. Without an agent that can check: the direct check."""
        key = state.job_key
        ask = {"op": "open", "job_key": key, "check": True, "timeout": timeout, "wait": wait}
        try:
            answer = client.request(self.spot, ask, timeout=timeout + wait + 5)
        except AgentGone as exc:
            log.debug("no session agent to check ssh", extra=fields(error=str(exc)))
            return self.direct.check_ssh(state, timeout, wait, task_running)
        kind, message = answer.get("kind"), str(answer.get("error") or "")
        if answer.get("ok"):
            self.holds_job = True
            return True
        if kind in SSH_ERRORS:
            raise SSH_ERRORS[kind](message)
        log.debug("the session agent could not check ssh", extra=fields(error=message))
        return self.direct.check_ssh(state, timeout, wait, task_running)

    def report_ready(self, state: JobState, seconds: float) -> None:
        """Sent by the agent in the background when it can."""
        ask = {"op": "ready", "config": self.spot.config, "job_key": state.job_key, "seconds": seconds}
        try:
            if client.request(self.spot, ask).get("ok"):
                return
        except AgentGone:
            pass
        self.direct.report_ready(state, seconds)

    def signer(self) -> RemoteSigner | None:
        spot = self.spot

        def sign(method: str, path: str, data: bytes) -> dict[str, str] | None:
            return client.sign(spot, method, path, data)

        return sign

    def job_starting(self, key: str) -> None:
        # Started now, it is ready by the time sshd is, whatever provisioning takes.
        client.ensure_running(self.spot, self.environ)

    def job_ready(self, key: str) -> None:
        if not self.holds_job:
            # The session agent opens the job's connection now, so the first stage pays no handshake.
            client.hand_over(self.spot, key, self.environ)

    def job_done(self, key: str) -> None:
        client.drop(self.spot, key, self.environ)


def _output_fds(stdout: TextIO, stderr: TextIO) -> tuple[int, int] | None:
    """The runner's stdout/stderr as fds the agent can write to, flushed first so nothing reorders."""
    try:
        stdout.flush()
        stderr.flush()
        return stdout.fileno(), stderr.fileno()
    except (AttributeError, OSError, ValueError):  # an in-memory stream (tests): no fd to hand over
        return None


def _kill_quietly(connection: TaskConnection, pid: int) -> None:
    try:
        connection.kill_process_group(pid)
    except SshError as exc:
        log.warning("could not kill the remote stage", extra=fields(pid=pid, error=str(exc)))
