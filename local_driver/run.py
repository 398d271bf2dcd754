"""`run SCRIPT STAGE`: pipe one stage script to the task's shell over SSH and map the outcome.

A script that exits N != 0 is a build failure with N (unless the task was being taken away, which is a system
failure with AWS's reason); SSH or network trouble is a system failure. On SIGTERM the remote stage's process
group is killed before the driver exits. Kept light: no boto3, and botocore only in the background heartbeat
and on the failure path.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

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
from local_driver.logs import fields, log
from local_driver.metadata import JobState
from local_driver.report import stop_summary, task_gone

if TYPE_CHECKING:
    from local_driver.ssh import TaskConnection

CONNECT_ATTEMPTS = 3
CONNECT_TIMEOUT = 10.0
HEARTBEAT_TIMEOUT = 5.0
STATUS_TIMEOUT = 5.0


def run(ctx: StageContext, script_path: str, stage: str) -> None:
    key = ctx.job_key()
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
            heartbeat = Heartbeat(ctx, key).start()

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
        if status == 0:
            return
        _raise_if_task_gone(ctx, key)
        if status < 0:
            raise SshError(
                f"the task's shell ended without an exit status during {stage} (killed by a signal?)"
            )
        raise BuildFailed(status)
    finally:
        script.close()
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


class Heartbeat:
    """Tells the orchestrator this job is still being driven: at the start of the stage, then every
    [Job] HeartbeatInterval while it runs (its reaper stops RUNNING jobs whose heartbeats stop). A daemon
    thread, never waited for: it costs the stage nothing and can never fail it."""

    def __init__(self, ctx: StageContext, key: str) -> None:
        self.ctx = ctx
        self.key = key
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _beat(self) -> None:
        while True:
            try:
                self.ctx.api(timeout=HEARTBEAT_TIMEOUT).heartbeat(self.key)
            except Exception as exc:  # noqa: BLE001 - best effort: a heartbeat must never disturb the stage
                log.debug("heartbeat failed", extra=fields(job_key=self.key, error=str(exc)))
            if self._stop.wait(self.ctx.settings.heartbeat_interval):
                return
