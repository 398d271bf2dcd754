"""Tenant isolation end to end (issue 12): a second identity that sends the owner's runner and job id gets
its own job and sees nothing of the owner's, and an assumed role keeps its jobs whatever its sessions are
called. Through the sandbox's signed API, with the owner's job run by the runner emulator and the real
driver."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from chalicelib.callers import owner_of
from fargate_ci_driver.api import ApiClient
from fargate_ci_driver.errors import ApiError
from runner_emulator import SUCCESS, JobSpec, RunnerConfig, RunnerEmulator
from sandbox.control import assume_role
from sandbox.layout import ROLE, assumed_role_arn
from sandbox.run_job import driver_command
from tests.conftest import Sandbox, wait_until
from tests.e2e.conftest import RUNNER, KeyPair, next_job_id

pytestmark = pytest.mark.e2e


def records(sandbox: Sandbox, job_id: str) -> list[dict[str, Any]]:
    """Every record of GitLab job `job_id` in the jobs table, whoever owns it (plain attribute values)."""
    items = sandbox.dynamodb().scan(TableName=sandbox.table, ConsistentRead=True)["Items"]
    plain = [{name: next(iter(value.values())) for name, value in item.items()} for item in items]
    return [item for item in plain if item.get("job_id") == job_id]


def refused(call) -> int:
    with pytest.raises(ApiError) as error:
        call()
    return error.value.status


def new_job_body(runner: str, job_id: str) -> dict[str, str]:
    client = KeyPair()
    return {
        "runner": runner,
        "job_id": job_id,
        "project_id": "7",
        "pipeline_id": "11",
        "ssh_public_key": client.public_line,
    }


def task(sandbox: Sandbox, arn: str) -> dict[str, Any]:
    return sandbox.ecs().describe_tasks(cluster=sandbox.cluster, tasks=[arn])["tasks"][0]


def test_a_stranger_sending_the_owners_runner_and_job_id_gets_its_own_job_and_sees_none_of_the_owners(
    sandbox: Sandbox,
):
    owner_arn = sandbox.state["profiles"]["sandbox"]
    stranger = sandbox.api("sandbox-other")  # another runner manager: its own IAM identity
    job = JobSpec(script=["sleep 2", "echo owner-output-$((6 * 7))", "echo owner-still-here"])
    config = RunnerConfig.for_driver(driver_command(str(sandbox.toml_path)), preparation_retry_delay=0.1)
    seen: dict[str, Any] = {}
    failures: list[BaseException] = []

    def stranger_moves_in() -> None:
        """As soon as the owner's job is on record (its prepare running), the stranger sends its runner and
        job id: it may look, stop and heartbeat what it likes, but only ever reaches its own record."""
        try:
            mine = wait_until(
                lambda: [r for r in records(sandbox, str(job.job_id)) if r["owner"] == owner_arn],
                60,
                0.05,
                "the owner's job record",
            )[0]
            key = seen["key"] = mine["job_key"]
            seen["before"] = [
                refused(lambda: stranger.get_job(key)),
                refused(lambda: stranger.stop_job(key, "mine now", attempt=1)),
                refused(lambda: stranger.heartbeat(key, attempt=1)),
            ]
            theirs = stranger.create_job(new_job_body(mine["runner"], mine["job_id"]))
            seen["theirs"] = theirs
            seen["their_get"] = stranger.get_job(key)
            stranger.heartbeat(key, attempt=theirs["attempt"])
            seen["their_stop"] = stranger.stop_job(
                key, "the stranger's own cleanup", attempt=theirs["attempt"]
            )
        except BaseException as exc:  # noqa: BLE001 (reported by the test thread)
            failures.append(exc)

    watcher = threading.Thread(target=stranger_moves_in, daemon=True)
    watcher.start()
    result = RunnerEmulator(config).run(job)
    watcher.join(60)

    assert not failures, failures
    assert result.status == SUCCESS, result.log
    assert "owner-output-42" in result.log and "owner-still-here" in result.log
    key = seen["key"]
    assert seen["before"] == [404, 404, 404]  # nothing of the owner's job is revealed
    theirs = seen["theirs"]
    owners = sandbox.api("sandbox").get_job(key)
    assert theirs["job_key"] == key and theirs["task_arn"] != owners["task_arn"]
    assert seen["their_get"]["task_arn"] == theirs["task_arn"]  # the stranger only ever sees its own
    assert seen["their_stop"]["task_arn"] == theirs["task_arn"]
    stopped = wait_until(
        lambda: (t := task(sandbox, theirs["task_arn"]))["lastStatus"] == "STOPPED" and t, 30, 0.1, "stop"
    )
    assert stopped["stoppedReason"] == "the stranger's own cleanup"
    assert task(sandbox, owners["task_arn"]).get("stoppedReason") != "the stranger's own cleanup"
    both = records(sandbox, str(job.job_id))
    assert sorted(r["owner"] for r in both) == sorted([owner_arn, sandbox.state["profiles"]["sandbox-other"]])
    assert len({r["pk"] for r in both}) == 2


def test_a_stranger_gets_404_for_a_live_job_it_never_sent_and_the_job_runs_on(sandbox: Sandbox, job_factory):
    job = job_factory()
    job.wait_for("RUNNING")
    job.published()  # the task has published its host key: nothing changes the record from here on
    before = records(sandbox, job.job_id)
    stranger = sandbox.api("sandbox-other")

    statuses = [
        refused(lambda: stranger.get_job(job.key)),
        refused(lambda: stranger.stop_job(job.key, "mine now", attempt=job.view["attempt"])),
        refused(lambda: stranger.heartbeat(job.key, attempt=job.view["attempt"])),
    ]

    assert statuses == [404, 404, 404]
    assert records(sandbox, job.job_id) == before
    assert job.describe()["lastStatus"] == "RUNNING"
    assert job.run("echo still mine")[1] == "still mine\n"


def role_session_api(sandbox: Sandbox, tmp_path: Path, session: str) -> ApiClient:
    """The driver's API client signing with fresh temporary credentials of the sandbox's role: a new
    AssumeRole, so a new session name, as botocore's assume-role provider or an agent restart gives."""
    credentials = assume_role(str(sandbox.dir), session)
    path = tmp_path / f"credentials-{session}"
    path.write_text(
        "[role]\n"
        f"aws_access_key_id = {credentials['aws_access_key_id']}\n"
        f"aws_secret_access_key = {credentials['aws_secret_access_key']}\n"
        f"aws_session_token = {credentials['aws_session_token']}\n"
    )
    path.chmod(0o600)
    assert credentials["arn"] == assumed_role_arn(ROLE, session)
    return ApiClient(sandbox.api_url, sandbox.region, profile="role", credentials_file=str(path))


def test_an_assumed_role_keeps_its_jobs_while_its_session_name_changes_with_every_call(
    sandbox: Sandbox, tmp_path: Path
):
    sessions = iter(f"botocore-session-{n}" for n in range(1, 100))

    def api() -> ApiClient:
        return role_session_api(sandbox, tmp_path, next(sessions))

    job_id = next_job_id()
    created = api().create_job(new_job_body(RUNNER, job_id))
    key = created["job_key"]

    assert api().get_job(key)["task_arn"] == created["task_arn"]
    wait_until(lambda: api().get_job(key)["state"] == "RUNNING", 30, 0.2, "the role's job RUNNING")
    assert api().heartbeat(key, attempt=created["attempt"])["state"] == "RUNNING"
    # Other keys for the same live job: the role's own record, so a conflict (a stranger would get its own).
    assert refused(lambda: api().create_job(new_job_body(RUNNER, job_id))) == 409
    for other in (sandbox.api("sandbox"), sandbox.api("sandbox-other")):  # IAM users are not the role
        assert refused(lambda other=other: other.get_job(key)) == 404
    (record,) = records(sandbox, job_id)
    assert record["owner"] == assumed_role_arn(ROLE) == owner_of({"userArn": assumed_role_arn(ROLE, "x")})
    stopped = api().stop_job(key, "cleanup from yet another session", attempt=created["attempt"])

    assert stopped["state"] == "STOPPING"
    final = wait_until(
        lambda: (t := task(sandbox, created["task_arn"]))["lastStatus"] == "STOPPED" and t, 30, 0.1, "stop"
    )
    assert final["stoppedReason"] == "cleanup from yet another session"


def test_the_sandbox_role_profile_is_a_session_of_the_role(sandbox: Sandbox):
    arn = sandbox.state["profiles"]["sandbox-role"]
    assert arn.startswith(assumed_role_arn(ROLE) + "/")
    credentials = Path(sandbox.credentials_file).read_text()
    assert "[sandbox-role]" in credentials and "aws_session_token" in credentials

    job = sandbox.api("sandbox-role").create_job(new_job_body(RUNNER, next_job_id()))

    api = sandbox.api("sandbox-role")
    assert api.get_job(job["job_key"])["task_arn"] == job["task_arn"]
    api.stop_job(job["job_key"], "test done", attempt=job["attempt"])
