"""prepare's one readiness loop (`Prepare._wait_ready`) with a scripted transport and API: what it asks the
transport, when it looks at the API, and how it fails. The policy's delays are checked on their own in
test_driver_backoff.py; the loop against a real sshd and API in tests/e2e/test_driver*.py."""

from __future__ import annotations

import io

import pytest

from fargate_ci_driver.context import StageContext
from fargate_ci_driver.errors import HostKeyMismatch, SshError, SshUnavailable, TaskError
from fargate_ci_driver.job import Job
from fargate_ci_driver.metadata import JobState
from fargate_ci_driver.prepare import FIRST_AUTH_RETRY_SECONDS, SSH_AUTH_RETRIES, Prepare
from fargate_ci_driver.settings import parse

PENDING = {"state": "PENDING", "last_status": "PROVISIONING"}
KEY = "ssh-ed25519 X"  # the host key the task published (the view shows it once it has)
WITH_ADDRESS = {"state": "PENDING", "last_status": "PENDING", "address": "10.0.0.7", "host_key": KEY}
RUNNING = {"state": "RUNNING", "last_status": "RUNNING", "address": "10.0.0.7", "host_key": KEY}
STOPPED = {
    "state": "STOPPED",
    "last_status": "STOPPED",
    "stop_code": "SpotInterruption",
    "address": "10.0.0.7",
}


class ScriptedTransport:
    """Answers check_ssh from a script: True, False, or an exception to raise."""

    def __init__(self, answers: list) -> None:
        self.answers = answers
        self.asked: list[tuple[float, bool]] = []

    def check_ssh(self, state: JobState, timeout: float, wait: float, task_running: bool) -> bool:
        self.asked.append((wait, task_running))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def signer(self) -> None:
        return None  # requests would sign themselves (none are sent: the API is scripted too)


class ScriptedApi:
    def __init__(self, views: list[dict]) -> None:
        self.views = views
        self.gets = 0

    def get_job(self, key: str) -> dict:
        self.gets += 1
        return self.views.pop(0)


def prepare_with(tmp_path, transport: ScriptedTransport, views: list[dict]) -> tuple[Prepare, list[float]]:
    settings = parse(
        {
            "Fargate": {"Region": "eu-west-1"},
            "TaskMetadata": {"Directory": str(tmp_path / "meta")},
            "Orchestrator": {"URL": "http://127.0.0.1:1"},
            "Runner": {"ShortToken": "t3sT1234"},
        }
    )
    ctx = StageContext(settings=settings, environ={}, stdout=io.StringIO(), stderr=io.StringIO())
    ctx._transport = transport
    slept: list[float] = []
    prep = Prepare(ctx, sleep=slept.append)
    prep.api = ScriptedApi(views)
    prep.job = Job(runner="t3sT1234", job_id="1", project_id="2", pipeline_id="3")
    prep.state = JobState(job_key=prep.job.key, ssh_port=22, ssh_user="root", host_public_key=KEY)
    prep.certificate = "ssh-ed25519-cert-v01@openssh.com AAAA"  # the client key's, from POST /jobs
    ctx.metadata.ensure()
    return prep, slept


def test_the_loop_polls_until_the_task_runs_and_spends_its_pauses_in_the_ssh_check(tmp_path):
    transport = ScriptedTransport([SshUnavailable("refused"), SshError("auth"), True])
    prep, slept = prepare_with(tmp_path, transport, [WITH_ADDRESS, RUNNING])

    prep._wait_ready(PENDING)

    # No address: no check, a 50 ms pause. Address known (PENDING): the status moved, so the pauses start
    # again from 25 ms and the check gets the first. RUNNING: the back-off restarts at 200 ms; the API is not
    # asked again within 5 s.
    assert transport.asked == [(0.025, False), (0.2, True), (0.4, True)]
    assert prep.api.gets == 2 and len(slept) == 3 and slept[0] == 0.05
    log = prep.ctx.stdout.getvalue()
    assert (
        "Task PENDING (PROVISIONING)" in log and "Task address: 10.0.0.7:22" in log and "Task RUNNING" in log
    )
    assert prep.ctx.metadata.load(prep.job.key).address == "10.0.0.7"


def test_a_host_key_mismatch_fails_at_once(tmp_path):
    transport = ScriptedTransport([HostKeyMismatch("not the pinned key")])
    prep, _ = prepare_with(tmp_path, transport, [])
    with pytest.raises(HostKeyMismatch):
        prep._wait_ready(RUNNING)


def test_no_login_is_tried_before_the_task_has_published_its_host_key(tmp_path):
    unpublished = {**RUNNING, "host_key": None}
    transport = ScriptedTransport([True])
    prep, slept = prepare_with(tmp_path, transport, [unpublished, unpublished, RUNNING])
    prep.state.host_public_key = ""

    prep._wait_ready(unpublished)

    # The API is polled at its own quick pace (no 5 s wait while running): the key is what is missing. Once
    # it is there, the SSH back-off starts from its first pause.
    assert prep.api.gets == 3 and slept == [0.05, 0.0625, 0.078125]
    assert transport.asked == [(0.2, True)]
    assert prep.ctx.metadata.load(prep.job.key).host_public_key == KEY
    assert f"Task host key: {KEY}" in prep.ctx.stdout.getvalue()


def test_each_move_of_the_task_before_its_key_is_published_restarts_the_quick_polls(tmp_path):
    provisioning = {"state": "PROVISIONING", "last_status": "PROVISIONING", "address": "10.0.0.7"}
    pending = {**provisioning, "state": "PENDING", "last_status": "PENDING"}
    running = {**pending, "state": "RUNNING", "last_status": "RUNNING"}
    views = [provisioning, provisioning, pending, pending, pending, running, running, RUNNING]
    transport = ScriptedTransport([True])
    prep, slept = prepare_with(tmp_path, transport, views)
    prep.state.host_public_key = ""

    prep._wait_ready(provisioning)

    # From 50 ms while PROVISIONING; from 25 ms again when PENDING is seen, and again when RUNNING is (the
    # key comes within a moment of the container's start); then the SSH back-off once the key is there.
    assert slept == [0.05, 0.0625, 0.078125, 0.025, 0.03125, 0.039062, 0.025, 0.03125]
    assert prep.api.gets == 8 and transport.asked == [(0.2, True)]


def test_a_published_host_key_that_changes_is_refused(tmp_path):
    transport = ScriptedTransport([SshUnavailable("refused")] * 3)
    prep, _ = prepare_with(tmp_path, transport, [{**RUNNING, "host_key": "ssh-ed25519 OTHER"}])
    prep.certificate = ""  # a look at the API after each pause
    with pytest.raises(HostKeyMismatch, match="changed"):
        prep._wait_ready(RUNNING)


def test_auth_failures_count_only_once_the_task_runs(tmp_path):
    before = [SshError("auth")] * (SSH_AUTH_RETRIES + 2)
    transport = ScriptedTransport([*before, *[SshError("auth")] * SSH_AUTH_RETRIES])
    prep, _ = prepare_with(tmp_path, transport, [WITH_ADDRESS] * (len(before) - 1) + [RUNNING] * 10)
    with pytest.raises(SshError, match="auth"):
        prep._wait_ready(WITH_ADDRESS)
    assert [running for _, running in transport.asked].count(True) == SSH_AUTH_RETRIES


def test_the_first_auth_failure_is_retried_after_a_short_pause(tmp_path):
    """The task writes its CA keys just after the orchestrator has bound its host key: a login right after
    the key shows in the job view may be refused once."""
    transport = ScriptedTransport([SshError("auth"), SshError("auth"), True])
    prep, slept = prepare_with(tmp_path, transport, [])

    prep._wait_ready(RUNNING)

    assert len(slept) == 2 and slept[0] <= FIRST_AUTH_RETRY_SECONDS < slept[1] <= 0.4
    assert transport.asked == [(0.2, True), (0.4, True), (0.8, True)]


def test_a_task_that_stops_while_starting_is_a_task_error_with_aws_reasons(tmp_path):
    transport = ScriptedTransport([SshUnavailable("refused")])
    prep, _ = prepare_with(tmp_path, transport, [STOPPED])
    with pytest.raises(TaskError, match="stopped before the job could start"):
        prep._wait_ready(WITH_ADDRESS)
    assert "SpotInterruption" in prep.ctx.stdout.getvalue()


def test_the_deadline_names_prepare_timeout(tmp_path):
    transport = ScriptedTransport([])
    prep, _ = prepare_with(tmp_path, transport, [])
    prep.deadline = 0.0  # long past
    with pytest.raises(TaskError, match=r"PrepareTimeout.*last state PENDING"):
        prep._wait_ready(PENDING)
