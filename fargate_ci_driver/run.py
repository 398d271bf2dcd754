"""`run SCRIPT STAGE`: pipe one stage script to the task's shell over SSH and map the outcome.

A script that exits N != 0 is a build failure with N (unless the task was being taken away, which is a system
failure with AWS's reason); SSH or network trouble is a system failure. On SIGTERM the remote stage's process
group is killed before the driver exits.

How the stage reaches the task is the context's transport (`transport`): normally the session
agent, which holds the job's SSH connection and sends its heartbeats, so that this process imports neither
paramiko nor botocore (botocore only on the failure path, to ask whether the task was taken away).
"""

from __future__ import annotations

from fargate_ci_driver.agent.protocol import StageResult
from fargate_ci_driver.context import StageContext
from fargate_ci_driver.errors import ApiError, BuildFailed, ConfigError, SshError, StateError, TaskError
from fargate_ci_driver.logs import fields, log
from fargate_ci_driver.report import stop_summary, task_gone

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
    try:
        result = ctx.transport.run_stage(state, script, stage, lambda: _raise_if_task_gone(ctx, key))
    finally:
        script.close()
    _verdict(ctx, key, stage, result)


def _verdict(ctx: StageContext, key: str, stage: str, result: StageResult) -> None:
    """The same verdict whichever transport ran the stage: 0 is success; otherwise the task being taken away
    wins over the script's status."""
    if result.lost is not None:
        _raise_if_task_gone(ctx, key)
        raise SshError(f"lost the connection to the task during {stage}: {result.lost}")
    status = result.status
    if status == 0:
        return
    _raise_if_task_gone(ctx, key)
    if status is None or status < 0:
        raise SshError(f"the task's shell ended without an exit status during {stage} (killed by a signal?)")
    raise BuildFailed(status)


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
