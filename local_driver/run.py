"""`run SCRIPT STAGE`: pipe one stage script to the task's shell over SSH and map the outcome.

A script that exits N != 0 is a build failure with N (unless the task was being taken away, which is a system
failure with AWS's reason); SSH or network trouble is a system failure. On SIGTERM the remote stage's process
group is killed before the driver exits.

The stage normally runs through the session agent (`local_driver.agent`), which holds the job's SSH
connection and sends its heartbeats: this process then imports neither paramiko nor botocore (botocore only
on the failure path, to ask whether the task was taken away). Without an agent it connects directly, with its
own heartbeat thread, and starts an agent for the next stage.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, BinaryIO

from local_driver import agent_client
from local_driver.context import StageContext
from local_driver.errors import (
    ApiError,
    BuildFailed,
    Cancelled,
    ConfigError,
    SshError,
    SshUnavailable,
    StateError,
    TaskError,
)
from local_driver.heartbeat import HEARTBEAT_TIMEOUT, Heartbeat
from local_driver.logs import fields, log
from local_driver.metadata import JobState
from local_driver.report import stop_summary, task_gone

if TYPE_CHECKING:
    from local_driver.ssh import TaskConnection

CONNECT_ATTEMPTS = 3
CONNECT_TIMEOUT = 10.0
STATUS_TIMEOUT = 5.0


def run(
    ctx: StageContext,
    script_path: str,
    stage: str,
    served: agent_client.StageResult | None = None,
    try_agent: bool = True,
) -> None:
    """`served`: the agent already ran the stage on the quick path (cli): only its verdict is left to give.
    `try_agent=False`: the quick path found the agent absent or unable, so do not ask it again."""
    key = ctx.job_key()
    if served is not None:
        _verdict(ctx, key, stage, served)
        return
    state = ctx.metadata.load(key)
    if state is None or not state.address:
        raise StateError(
            f"job {key} has no running task on record in {ctx.settings.metadata_dir}: "
            "prepare did not finish, or cleanup already ran"
        )
    try:
        script = open(script_path, "rb")  # noqa: SIM115 (closed in the finally below)
    except OSError as exc:
        raise ConfigError(f"stage script {script_path}: {exc.strerror or exc}") from None
    try:
        if try_agent and agent_client.enabled(ctx.environ) and _through_agent(ctx, key, script, stage):
            return
        script.seek(0)
        _direct(ctx, state, key, script, stage)
    finally:
        script.close()


def _through_agent(ctx: StageContext, key: str, script: BinaryIO, stage: str) -> bool:
    """Run the stage on the session agent's connection; False when the agent ran nothing (not running,
    or it could not reach the task), so the caller connects directly. The agent's heartbeats stand in for
    ours while this process stays connected to it."""
    fds = _output_fds(ctx)
    spot = ctx.agent_spot()
    if fds is None or spot is None:
        return False
    remote = agent_client.RemoteStage(spot)
    try:
        remote.start(agent_client.stage_request(spot, key), script.fileno(), *fds)
    except agent_client.AgentGone as exc:
        log.debug("no session agent; connecting directly", extra=fields(error=str(exc)))
        agent_client.spawn(spot, ctx.environ, open_job=key)
        return False
    try:
        try:
            result = remote.wait(
                lambda pid: log.debug("stage started", extra=fields(job_key=key, stage=stage, remote_pid=pid))
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
        return False
    _verdict(ctx, key, stage, result)
    return True


def _verdict(ctx: StageContext, key: str, stage: str, result: agent_client.StageResult) -> None:
    if result.lost is not None:
        _raise_if_task_gone(ctx, key)
        raise SshError(f"lost the connection to the task during {stage}: {result.lost}")
    _judge(ctx, key, stage, result.status)


def _output_fds(ctx: StageContext) -> tuple[int, int] | None:
    """The runner's stdout/stderr as fds the agent can write to, flushed first so nothing reorders."""
    try:
        ctx.stdout.flush()
        ctx.stderr.flush()
        return ctx.stdout.fileno(), ctx.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # an in-memory stream (tests): no fd to hand over
        return None


def _judge(ctx: StageContext, key: str, stage: str, status: int) -> None:
    """The same verdict on both paths: 0 is success; otherwise the task being taken away wins over the
    script's status."""
    if status == 0:
        return
    _raise_if_task_gone(ctx, key)
    if status < 0:
        raise SshError(f"the task's shell ended without an exit status during {stage} (killed by a signal?)")
    raise BuildFailed(status)


def _direct(ctx: StageContext, state: JobState, key: str, script: BinaryIO, stage: str) -> None:
    """Today's path: our own connection (paramiko loaded here) and our own heartbeat thread."""
    heartbeat: Heartbeat | None = None
    connection: TaskConnection | None = None
    try:
        connection = _connect(ctx, state)

        pids: list[int] = []

        def started(pid: int) -> None:
            nonlocal heartbeat
            pids.append(pid)
            log.debug("stage started", extra=fields(job_key=key, stage=stage, remote_pid=pid))
            # Only now: the import and the request overlap the remote work instead of delaying it.
            if state.attempt:
                heartbeat = Heartbeat(
                    lambda: ctx.api(timeout=HEARTBEAT_TIMEOUT),
                    key,
                    state.attempt,
                    ctx.settings.heartbeat_interval,
                ).start()

        try:
            status = connection.run_script(
                script, ctx.settings.ssh_shell, ctx.stdout.buffer, ctx.stderr.buffer, on_started=started
            )
        except Cancelled:
            if pids:
                _kill_quietly(connection, pids[0])
            raise
        except SshError as exc:
            _raise_if_task_gone(ctx, key)
            raise SshError(f"lost the connection to the task during {stage}: {exc}") from None
        _judge(ctx, key, stage, status)
    finally:
        if connection is not None:
            connection.close()
        if heartbeat is not None:
            heartbeat.stop()


def _connect(ctx: StageContext, state: JobState) -> TaskConnection:
    from local_driver.ssh import TaskConnection

    pem = ctx.metadata.load_client_key(state.job_key)
    for attempt in range(1, CONNECT_ATTEMPTS + 1):
        connection = TaskConnection(
            state.address, state.ssh_port, state.ssh_user, pem, state.host_public_key, timeout=CONNECT_TIMEOUT
        )
        try:
            connection.connect()
            return connection
        except SshUnavailable as exc:
            # A task that is gone will not come back: say why at once instead of retrying.
            _raise_if_task_gone(ctx, state.job_key)
            if attempt == CONNECT_ATTEMPTS:
                raise
            log.warning("ssh connect failed; retrying", extra=fields(error=str(exc), attempt=attempt))
            time.sleep(attempt * 1.0)
    raise AssertionError("unreachable")


def _kill_quietly(connection: TaskConnection, pid: int) -> None:
    try:
        connection.kill_process_group(pid)
    except SshError as exc:
        log.warning("could not kill the remote stage", extra=fields(pid=pid, error=str(exc)))


def _raise_if_task_gone(ctx: StageContext, key: str) -> None:
    """After a failure, ask the orchestrator whether AWS is taking the task away; if so that, not the script,
    is the cause: print AWS's reason and make it a system failure."""
    try:
        view = ctx.api(timeout=STATUS_TIMEOUT).get_job(key)
    except ApiError as exc:
        log.warning("cannot ask the orchestrator about the task", extra=fields(job_key=key, error=str(exc)))
        return
    if not task_gone(view):
        return
    for line in stop_summary(view):
        ctx.stderr.write(f"{line}\n")
    ctx.stderr.flush()
    raise TaskError(f"the task was stopped under the job ({view.get('stop_code') or view.get('state')})")
