"""prepare from the job log's and the runner's point of view: what it asks the orchestrator, what it says,
what it records for cleanup, and that no task outlives a failed prepare. The orchestrator and the transport
are scripted (in process); the loop's timing is in test_driver_prepare.py, the real thing in tests/e2e."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest

from fargate_ci_driver import job_marker
from fargate_ci_driver.context import StageContext
from fargate_ci_driver.errors import (
    ApiError,
    ApiUnreachable,
    Cancelled,
    JobInputError,
    SshError,
    SshUnavailable,
    StateError,
    TaskError,
)
from fargate_ci_driver.prepare import POLL_SECONDS, SSH_CONNECT_TIMEOUT, STOP_ATTEMPTS, Prepare, prepare
from fargate_ci_driver.settings import parse
from runner_emulator.job import JobSpec
from runner_emulator.payload import job_payload, write_job_payload

KEY = "t3sT1234-5005"
ARN = "arn:aws:ecs:eu-west-1:123456789012:task/fargate-ci/0123456789abcdef0123456789abcdef"
# The orchestrator's view carries the job's certificate from the start and the host key the task published
# once it boots (design.md "The task's host key and the job's certificate").
CERTIFICATE = "ssh-ed25519-cert-v01@openssh.com AAAAIHNzaC1lZDI1NTE5LWNlcnQtdjAxQG9wZW5zc2guY29t"
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOr7Xbu3f3WZ0L3gkn9l0sRSdgcdZ1xhKHP4Zf6b0yAc"
PENDING = {
    "job_key": KEY,
    "attempt": 1,
    "task_arn": ARN,
    "state": "PENDING",
    "last_status": "PROVISIONING",
    "ssh_certificate": CERTIFICATE,
}
RUNNING = {
    **PENDING,
    "state": "RUNNING",
    "last_status": "RUNNING",
    "address": "10.0.0.7",
    "host_key": HOST_KEY,
}
STOPPED = {
    **RUNNING,
    "state": "FAILED",
    "last_status": "STOPPED",
    "stop_code": "TaskFailedToStart",
    "stopped_reason": "CannotPullContainerError: no such image",
}


class ScriptedApi:
    """The orchestrator, answering each route from its own queue (an exception is raised)."""

    def __init__(self, creates=(), gets=(), stops=()) -> None:
        self.queues = {"create": list(creates), "get": list(gets), "stop": list(stops)}
        self.calls: list[tuple] = []
        self.bodies: list[dict] = []
        self.timeouts: list[float | None] = []

    def _answer(self, route: str, *call):
        self.calls.append((route, *call))
        answer = self.queues[route].pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def create_job(self, body: dict) -> dict:
        self.bodies.append(body)
        return self._answer("create", body["job_id"])

    def get_job(self, key: str) -> dict:
        return self._answer("get", key)

    def stop_job(self, key: str, reason: str, attempt: int) -> dict:
        return self._answer("stop", key, reason, attempt)


class ScriptedTransport:
    def __init__(self, ssh=()) -> None:
        self.ssh = list(ssh)
        self.events: list[tuple] = []
        self.timeouts: list[float] = []

    def job_starting(self, key: str) -> None:
        self.events.append(("starting", key))

    def check_ssh(self, state, timeout: float, wait: float, task_running: bool) -> bool:
        self.timeouts.append(timeout)
        answer = self.ssh.pop(0) if self.ssh else False
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def report_ready(self, state, seconds: float) -> None:
        self.events.append(("ready", state.task_arn, state.attempt))

    def job_ready(self, key: str) -> None:
        self.events.append(("job_ready", key))

    def signer(self) -> None:
        return None


def stage(tmp_path: Path, api: ScriptedApi, transport: ScriptedTransport, *, timeout: float = 600, **env):
    settings = parse(
        {
            "Fargate": {"Region": "eu-west-1"},
            "TaskMetadata": {"Directory": str(tmp_path / "meta")},
            "Orchestrator": {"URL": "http://127.0.0.1:1"},
            "Runner": {"ShortToken": "t3sT1234"},
            "Job": {"PrepareTimeout": timeout},
        }
    )
    job_dir = tmp_path / "custom-executor-5005"
    job_dir.mkdir(mode=0o700, parents=True)
    spec = JobSpec(script=["true"], job_id=5005, project_id=42, pipeline_id=77, token="glcbt-secret-token")
    write_job_payload(str(job_dir), job_payload(spec, "https://gitlab.example.com", []))
    environ = {
        "TMPDIR": str(job_dir),
        "JOB_RESPONSE_FILE": str(job_dir / "response.json"),
        "CUSTOM_ENV_CI_JOB_ID": "5005",
        **env,
    }
    ctx = StageContext(settings=settings, environ=environ, stdout=io.StringIO(), stderr=io.StringIO())
    ctx._transport = transport

    def api_for(timeout: float | None = None) -> ScriptedApi:
        api.timeouts.append(timeout)
        return api

    ctx.api = api_for
    return ctx


def run(ctx: StageContext, slept: list[float] | None = None) -> Prepare:
    prep = Prepare(ctx, sleep=(slept if slept is not None else []).append)
    prep.run()
    return prep


def job_log(ctx: StageContext) -> str:
    return ctx.stdout.getvalue()


def stops(api: ScriptedApi) -> list[tuple]:
    return [call for call in api.calls if call[0] == "stop"]


# -- a task that comes up ----------------------------------------------------------------------------------


def test_a_task_that_comes_up_is_recorded_and_announced_step_by_step(tmp_path):
    api = ScriptedApi(creates=[PENDING], gets=[RUNNING])
    transport = ScriptedTransport(ssh=[True])
    ctx = stage(tmp_path, api, transport)

    run(ctx)

    log = job_log(ctx)
    assert f"Requesting a Fargate task for job {KEY}\n" in log
    assert f"Task requested: {ARN} (cold start)\n" in log
    assert "Task PENDING (PROVISIONING) after " in log
    assert "Task address: 10.0.0.7:22\n" in log
    assert "Task RUNNING after " in log
    assert "SSH ready after " in log
    assert transport.events == [("starting", KEY), ("ready", ARN, 1), ("job_ready", KEY)]
    state = ctx.metadata.load(KEY)
    assert (state.task_arn, state.attempt, state.address) == (ARN, 1, "10.0.0.7")
    assert job_marker.read(ctx.environ) == KEY
    assert stops(api) == []


def test_the_request_names_what_the_job_asked_for(tmp_path):
    api = ScriptedApi(creates=[RUNNING])
    ctx = stage(
        tmp_path,
        api,
        ScriptedTransport(ssh=[True]),
        CUSTOM_ENV_FARGATE_TASK_DEFINITION="ci-large:3",
        CUSTOM_ENV_FARGATE_CPU="1024",
        CUSTOM_ENV_FARGATE_MEMORY="4096",
        CUSTOM_ENV_FARGATE_PLATFORM_VERSION="1.4.0",
    )

    run(ctx)

    assert (
        f"Requesting a Fargate task for job {KEY} "
        "(task definition ci-large:3, cpu 1024, memory 4096, platform 1.4.0)\n"
    ) in job_log(ctx)


def test_a_later_attempt_and_a_capacity_note_are_shown(tmp_path):
    second = {**RUNNING, "attempt": 2, "capacity_note": "Fargate Spot had no capacity: running on FARGATE"}
    api = ScriptedApi(creates=[second])
    transport = ScriptedTransport(ssh=[True])
    ctx = stage(tmp_path, api, transport)

    run(ctx)

    log = job_log(ctx)
    assert (
        f"Task requested: {ARN} (attempt 2) (cold start)\nFargate Spot had no capacity: running on FARGATE\n"
        in log
    )
    assert ctx.metadata.load(KEY).attempt == 2
    assert transport.events[1] == ("ready", ARN, 2)


def test_services_the_job_cannot_wait_for_are_warned_about_in_the_job_log(tmp_path):
    note = "Service db (docker.io/acme/db:1): its image exposes no TCP port; not waiting for it"
    api = ScriptedApi(creates=[{**RUNNING, "service_notes": [note]}])
    ctx = stage(tmp_path, api, ScriptedTransport(ssh=[True]))

    run(ctx)

    assert f"WARNING: {note}" in job_log(ctx)


def test_a_job_variable_faking_another_job_id_is_warned_about_in_the_job_log(tmp_path):
    api = ScriptedApi(creates=[RUNNING])
    ctx = stage(tmp_path, api, ScriptedTransport(ssh=[True]), CUSTOM_ENV_CI_JOB_ID="9999")

    run(ctx)

    assert "WARNING: job variable CI_JOB_ID='9999' disagrees with the job payload's id (5005)" in job_log(ctx)


def test_a_poll_the_api_cannot_answer_for_now_costs_a_poll_not_the_job(tmp_path):
    busy = ApiError(503, "Throttled", "slow down")
    api = ScriptedApi(creates=[PENDING], gets=[busy, RUNNING])
    ctx = stage(tmp_path, api, ScriptedTransport(ssh=[True]))

    run(ctx)

    assert ctx.metadata.load(KEY).address == "10.0.0.7"
    assert [c[0] for c in api.calls] == ["create", "get", "get"]


def test_a_poll_the_api_refuses_fails_prepare_and_stops_the_task(tmp_path):
    api = ScriptedApi(
        creates=[PENDING], gets=[ApiError(403, "Forbidden", "no")], stops=[{"state": "STOPPING"}]
    )
    ctx = stage(tmp_path, api, ScriptedTransport())

    with pytest.raises(ApiError, match="403"):
        run(ctx)

    assert stops(api) == [("stop", KEY, "prepare failed: HTTP 403 Forbidden: no", 1)]
    assert f"Stopped task {ARN} (STOPPING)" in job_log(ctx)


# -- POST /jobs refused ------------------------------------------------------------------------------------


def test_a_job_variable_the_orchestrator_refuses_is_the_jobs_fault_and_leaves_nothing(tmp_path):
    refused = ApiError(400, "InvalidInput", "cpu 300 is not a Fargate size", field="cpu")
    api = ScriptedApi(creates=[refused])
    ctx = stage(tmp_path, api, ScriptedTransport())

    with pytest.raises(JobInputError) as caught:
        run(ctx)

    assert str(caught.value) == (
        "the orchestrator refused cpu (job variable FARGATE_CPU): cpu 300 is not a Fargate size"
    )
    assert stops(api) == []
    assert list((tmp_path / "meta").glob(f"{KEY}*")) == []


@pytest.mark.parametrize("status", [400, 403, 404])
def test_a_refused_request_started_no_task_so_nothing_is_kept_for_cleanup(tmp_path, status):
    api = ScriptedApi(creates=[ApiError(status, "Refused", "no")])
    ctx = stage(tmp_path, api, ScriptedTransport())

    with pytest.raises(ApiError):
        run(ctx)

    assert list((tmp_path / "meta").glob(f"{KEY}*")) == []
    assert stops(api) == []
    assert "No task attempt on record yet" not in job_log(ctx)


def test_a_task_aws_did_not_start_is_explained_and_leaves_nothing(tmp_path):
    api = ScriptedApi(creates=[ApiError(502, "TaskStartFailed", "RunTask refused: no capacity")])
    ctx = stage(tmp_path, api, ScriptedTransport())

    with pytest.raises(ApiError):
        run(ctx)

    assert "ERROR: AWS did not start the task: RunTask refused: no capacity" in job_log(ctx)
    assert list((tmp_path / "meta").glob(f"{KEY}*")) == []


def test_an_answer_that_never_came_keeps_the_state_and_leaves_the_task_to_cleanup(tmp_path):
    api = ScriptedApi(creates=[ApiError(500, "InternalError", "boom")])
    ctx = stage(tmp_path, api, ScriptedTransport())

    with pytest.raises(ApiError):
        run(ctx)

    assert (tmp_path / "meta" / f"{KEY}.json").exists()
    assert "No task attempt on record yet; cleanup looks for one started with this job's key" in job_log(ctx)
    assert stops(api) == []


def test_a_busy_orchestrator_is_retried_and_the_job_log_says_so(tmp_path):
    busy = ApiError(503, "Throttled", "slow down", retry_after=2)
    api = ScriptedApi(creates=[busy, RUNNING])
    slept: list[float] = []
    ctx = stage(tmp_path, api, ScriptedTransport(ssh=[True]))

    run(ctx, slept)

    assert "The orchestrator is busy (HTTP 503 Throttled: slow down); retrying in 2.0s" in job_log(ctx)
    assert slept[0] == 2


# -- an earlier attempt in the way (409) -------------------------------------------------------------------


def conflict() -> ApiError:
    return ApiError(409, "JobConflict", "job is live with other parameters")


def test_a_live_attempt_this_prepare_did_not_start_is_left_alone(tmp_path):
    api = ScriptedApi(creates=[conflict()], gets=[{**RUNNING, "attempt": 2}])
    ctx = stage(tmp_path, api, ScriptedTransport())

    with pytest.raises(ApiError, match="409"):
        run(ctx)

    assert (
        f"Job {KEY} already has a live attempt 2 (RUNNING) that this prepare did not start: not stopping it "
        "(the orchestrator's reaper ends it once its heartbeats stop)"
    ) in job_log(ctx)
    assert stops(api) == []
    assert list((tmp_path / "meta").glob(f"{KEY}*")) == []


def test_an_earlier_attempt_being_stopped_is_waited_for_then_a_new_one_starts(tmp_path):
    stopping = {**RUNNING, "state": "STOPPING"}
    api = ScriptedApi(
        creates=[conflict(), {**RUNNING, "attempt": 2}],
        gets=[stopping, stopping, {**RUNNING, "state": "STOPPED"}],
    )
    slept: list[float] = []
    ctx = stage(tmp_path, api, ScriptedTransport(ssh=[True]))

    run(ctx, slept)

    assert f"An earlier attempt of job {KEY} is STOPPING; waiting for it to end" in job_log(ctx)
    assert slept[:2] == [POLL_SECONDS, POLL_SECONDS]
    assert [c[0] for c in api.calls] == ["create", "get", "get", "get", "create"]
    assert ctx.metadata.load(KEY).attempt == 2


def test_an_earlier_attempt_that_fails_meanwhile_also_lets_a_new_one_start(tmp_path):
    api = ScriptedApi(creates=[conflict(), RUNNING], gets=[{**RUNNING, "state": "FAILED"}])
    ctx = stage(tmp_path, api, ScriptedTransport(ssh=[True]))

    run(ctx)

    assert [c[0] for c in api.calls] == ["create", "get", "create"]


def test_an_earlier_attempt_that_does_not_end_before_the_prepare_timeout_fails_prepare(tmp_path):
    stopping = {**RUNNING, "state": "STOPPING"}
    api = ScriptedApi(creates=[conflict()], gets=[stopping])
    ctx = stage(tmp_path, api, ScriptedTransport(), timeout=1)

    prep = Prepare(ctx, sleep=lambda _: None)
    prep.deadline = 0.0  # long past
    with pytest.raises(ApiError, match="409"):
        prep.run()

    assert [c[0] for c in api.calls] == ["create", "get"]


def test_an_earlier_attempt_the_api_cannot_tell_about_fails_prepare(tmp_path):
    api = ScriptedApi(creates=[conflict()], gets=[ApiError(503, "Throttled", "slow down")])
    ctx = stage(tmp_path, api, ScriptedTransport())

    with pytest.raises(ApiError, match="409"):
        run(ctx)


def test_attempts_that_keep_conflicting_end_after_three_tries(tmp_path):
    stopped = {**RUNNING, "state": "STOPPED"}
    api = ScriptedApi(creates=[conflict()] * 3, gets=[stopped] * 3)
    ctx = stage(tmp_path, api, ScriptedTransport())

    with pytest.raises(TaskError, match=f"job {KEY}: an earlier attempt is still live"):
        run(ctx)

    assert [c[0] for c in api.calls] == ["create", "get"] * 3


# -- a task that does not come up -------------------------------------------------------------------------


def test_a_task_that_fails_to_start_shows_awss_reasons_and_is_not_announced_as_stopped(tmp_path):
    api = ScriptedApi(creates=[PENDING], gets=[STOPPED], stops=[STOPPED])
    ctx = stage(tmp_path, api, ScriptedTransport())

    with pytest.raises(TaskError) as caught:
        run(ctx)

    assert str(caught.value) == "the task stopped before the job could start (TaskFailedToStart)"
    log = job_log(ctx)
    assert f"  task {ARN} is FAILED, stop code TaskFailedToStart\n" in log
    assert "  stopped reason: CannotPullContainerError: no such image\n" in log
    assert "Task FAILED (STOPPED) after " in log
    assert stops(api) == [("stop", KEY, f"prepare failed: {caught.value}", 1)]
    assert "Stopped task" not in log


def test_a_task_that_stops_while_sshd_starts_says_so(tmp_path):
    gone = {**RUNNING, "state": "STOPPING", "stop_code": "SpotInterruption"}
    api = ScriptedApi(creates=[RUNNING], gets=[gone], stops=[gone])
    ctx = stage(tmp_path, api, ScriptedTransport(ssh=[False] * 100))

    with pytest.raises(TaskError, match=r"^the task stopped while sshd was starting \(SpotInterruption\)$"):
        run(ctx)

    assert "AWS reclaimed the Fargate Spot capacity; retry the job" in job_log(ctx)


def test_a_task_that_never_runs_times_out_naming_prepare_timeout_and_is_stopped(tmp_path):
    api = ScriptedApi(
        creates=[PENDING], gets=[PENDING] * 1000, stops=[{"state": "STOPPING", "task_arn": ARN}]
    )
    ctx = stage(tmp_path, api, ScriptedTransport(), timeout=1)

    with pytest.raises(TaskError) as caught:
        run(ctx)

    assert str(caught.value) == "the task is not running after 1s ([Job] PrepareTimeout); last state PENDING"
    assert f"Stopped task {ARN} (STOPPING)" in job_log(ctx)


def test_an_sshd_that_never_answers_times_out_naming_the_address_and_prepare_timeout(tmp_path):
    api = ScriptedApi(creates=[RUNNING], gets=[RUNNING] * 1000, stops=[{"state": "STOPPING"}])
    ctx = stage(tmp_path, api, ScriptedTransport(ssh=[False] * 100000), timeout=1)

    with pytest.raises(SshError) as caught:
        run(ctx)

    assert str(caught.value).startswith("sshd on 10.0.0.7:22 did not answer within 1s ([Job] PrepareTimeout)")


# -- no task outlives a failed prepare ---------------------------------------------------------------------


def test_a_cancelled_prepare_stops_its_task_and_says_why(tmp_path):
    api = ScriptedApi(creates=[RUNNING], stops=[{"state": "STOPPING"}])
    ctx = stage(tmp_path, api, ScriptedTransport(ssh=[Cancelled("SIGTERM")]))

    with pytest.raises(Cancelled):
        run(ctx)

    assert "Cancelled: stopping the task\n" in job_log(ctx)
    assert stops(api) == [("stop", KEY, "cancelled by the runner during prepare: SIGTERM", 1)]
    assert f"Stopped task {ARN} (STOPPING)" in job_log(ctx)
    assert api.timeouts[-1] == 5.0  # the stop is bounded: the runner is waiting to kill us


def test_a_long_failure_reason_is_cut_to_what_the_api_takes(tmp_path):
    api = ScriptedApi(creates=[RUNNING], stops=[{"state": "STOPPING"}])
    ctx = stage(tmp_path, api, ScriptedTransport(ssh=[SshError("x" * 400)] * 10), timeout=1)

    with pytest.raises(SshError):
        run(ctx)

    reason = stops(api)[0][2]
    assert len(reason) == 250 and reason.startswith("prepare failed: ")


def test_a_stop_the_api_cannot_take_now_is_retried_then_left_to_cleanup_and_the_reaper(tmp_path):
    busy = ApiError(503, "Throttled", "slow down")
    api = ScriptedApi(creates=[RUNNING], stops=[busy] * STOP_ATTEMPTS)
    ctx = stage(tmp_path, api, ScriptedTransport(ssh=[Cancelled("SIGTERM")]))

    with pytest.raises(Cancelled):
        run(ctx)

    assert len(stops(api)) == STOP_ATTEMPTS
    assert (
        "Could not stop the task (HTTP 503 Throttled: slow down); cleanup will try again, then the reaper"
    ) in job_log(ctx)


@pytest.mark.parametrize(
    "answer", [ApiError(404, "JobNotFound", "gone"), ApiError(409, "AttemptMismatch", "newer attempt")]
)
def test_a_stop_for_an_attempt_that_is_over_is_quietly_dropped(tmp_path, answer):
    api = ScriptedApi(creates=[RUNNING], stops=[answer])
    ctx = stage(tmp_path, api, ScriptedTransport(ssh=[Cancelled("SIGTERM")]))

    with pytest.raises(Cancelled):
        run(ctx)

    log = job_log(ctx)
    assert "Could not stop the task" not in log and "Stopped task" not in log


def test_a_second_signal_during_the_stop_leaves_the_first_error_standing(tmp_path):
    api = ScriptedApi(creates=[RUNNING], stops=[Cancelled("SIGTERM again")])
    ctx = stage(tmp_path, api, ScriptedTransport(ssh=[Cancelled("SIGTERM")]))

    with pytest.raises(Cancelled, match=r"^SIGTERM$"):
        run(ctx)

    assert "Stopped task" not in job_log(ctx)


def test_a_job_directory_that_cannot_take_the_marker_fails_prepare_naming_it(tmp_path):
    api = ScriptedApi()
    ctx = stage(tmp_path, api, ScriptedTransport())
    marker = Path(job_marker.marker_path(ctx.environ))
    marker.mkdir()  # a directory where the marker file goes

    with pytest.raises(
        StateError, match=f"cannot record the job key for the job's later stages in {marker}: "
    ):
        run(ctx)

    assert api.calls == []  # nothing was asked for


def test_the_module_entry_point_runs_prepare(tmp_path):
    api = ScriptedApi(creates=[RUNNING])
    transport = ScriptedTransport(ssh=[True])
    ctx = stage(tmp_path, api, transport)

    prepare(ctx)

    assert transport.events[-1] == ("job_ready", KEY)


# -- the driver's own log (what the runner manager's operator reads) ----------------------------------------


def driver_lines(caplog, message: str) -> list:
    return [r for r in caplog.records if r.name == "fargate_driver" and r.getMessage() == message]


def test_a_poll_the_api_could_not_answer_is_a_warning_naming_the_job_and_error(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="fargate_driver")
    api = ScriptedApi(creates=[PENDING], gets=[ApiError(503, "Throttled", "slow down"), RUNNING])
    ctx = stage(tmp_path, api, ScriptedTransport(ssh=[True]))

    run(ctx)

    (line,) = driver_lines(caplog, "job poll failed; will poll again")
    assert line.levelno == logging.WARNING
    assert line.fields == {"job_key": KEY, "error": "HTTP 503 Throttled: slow down"}
    (ready,) = driver_lines(caplog, "prepared")
    assert ready.fields == {"job_key": KEY, "task_arn": ARN}


def test_an_earlier_attempt_the_api_cannot_tell_about_is_a_warning(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="fargate_driver")
    api = ScriptedApi(creates=[conflict()], gets=[ApiError(503, "Throttled", "slow down")])
    ctx = stage(tmp_path, api, ScriptedTransport())

    with pytest.raises(ApiError):
        run(ctx)

    (line,) = driver_lines(caplog, "cannot settle the previous attempt")
    assert line.levelno == logging.WARNING
    assert line.fields == {"job_key": KEY, "error": "HTTP 503 Throttled: slow down"}


def test_sshd_not_ready_yet_is_logged_at_debug_with_why(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="fargate_driver")
    api = ScriptedApi(creates=[RUNNING])
    ctx = stage(tmp_path, api, ScriptedTransport(ssh=[SshUnavailable("refused"), True]))

    run(ctx)

    (line,) = driver_lines(caplog, "sshd not ready yet")
    assert (line.levelno, line.fields) == (logging.DEBUG, {"error": "refused"})


def test_a_stopped_task_without_a_stop_code_is_named_by_its_state(tmp_path):
    gone = {**RUNNING, "state": "STOPPED", "last_status": "STOPPED"}
    api = ScriptedApi(creates=[PENDING], gets=[gone], stops=[gone])
    ctx = stage(tmp_path, api, ScriptedTransport())

    with pytest.raises(TaskError, match=r"^the task stopped before the job could start \(STOPPED\)$"):
        run(ctx)


def test_the_keys_name_the_job_and_the_host_key_is_pinned_for_later_stages(tmp_path):
    api = ScriptedApi(creates=[RUNNING])
    ctx = stage(tmp_path, api, ScriptedTransport(ssh=[True]))

    run(ctx)

    (body,) = api.bodies
    assert body["ssh_public_key"].startswith("ssh-ed25519 ")
    assert body["ssh_public_key"].endswith(f" fargate-ci-{KEY}")
    assert "ssh_host_key" not in body  # the task makes its own
    assert ctx.metadata.load(KEY).host_public_key == HOST_KEY  # the one it published, pinned


def test_the_command_line_flags_win_over_job_variables(tmp_path):
    api = ScriptedApi(creates=[RUNNING])
    ctx = stage(tmp_path, api, ScriptedTransport(ssh=[True]), CUSTOM_ENV_FARGATE_PLATFORM_VERSION="1.3.0")
    ctx.task_def_flag = "ci-flagged:2"
    ctx.platform_version_flag = "1.4.0"

    run(ctx)

    (body,) = api.bodies
    assert (body["task_definition"], body["platform_version"]) == ("ci-flagged:2", "1.4.0")


def test_an_orchestrator_that_does_not_answer_is_retried_and_the_job_log_says_so(tmp_path):
    silent = ApiUnreachable("connection refused")
    api = ScriptedApi(creates=[silent, RUNNING])
    ctx = stage(tmp_path, api, ScriptedTransport(ssh=[True]))

    run(ctx)

    assert "The orchestrator did not answer (" in job_log(ctx)


def test_the_ssh_check_gets_the_connect_timeout_and_at_least_a_second_near_the_deadline(tmp_path):
    api = ScriptedApi(creates=[RUNNING])
    transport = ScriptedTransport(ssh=[False, True])
    ctx = stage(tmp_path, api, transport)

    run(ctx)
    assert transport.timeouts[0] == SSH_CONNECT_TIMEOUT

    transport = ScriptedTransport(ssh=[True])
    prep = Prepare(stage(tmp_path / "2", ScriptedApi(creates=[RUNNING]), transport), sleep=lambda _: None)
    prep.deadline = prep.started + 0.5
    prep.run()
    assert transport.timeouts == [1.0]


def test_a_cancelled_later_attempt_stops_that_attempt(tmp_path):
    api = ScriptedApi(creates=[{**RUNNING, "attempt": 3}], stops=[{"state": "STOPPING"}])
    ctx = stage(tmp_path, api, ScriptedTransport(ssh=[Cancelled("SIGTERM")]))

    with pytest.raises(Cancelled):
        run(ctx)

    assert stops(api) == [("stop", KEY, "cancelled by the runner during prepare: SIGTERM", 3)]


def test_stop_retries_pause_between_tries(tmp_path):
    busy = ApiError(503, "Throttled", "slow down")
    api = ScriptedApi(creates=[RUNNING], stops=[busy, busy, {"state": "STOPPING"}])
    slept: list[float] = []
    ctx = stage(tmp_path, api, ScriptedTransport(ssh=[Cancelled("SIGTERM")]))

    with pytest.raises(Cancelled):
        run(ctx, slept)

    assert len(slept) == 2 and all(0.4 <= s <= 2.0 for s in slept)
