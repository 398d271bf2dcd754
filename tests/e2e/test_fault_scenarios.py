"""Fault injection: whatever happens to the runner manager, the network or the events, no task outlives
its job.

Each scenario runs against its own sandbox (real moto, the Chalice app behind SigV4, sshd tasks in
bubblewrap) with a fast reaper and a short heartbeat timeout, and ends with the same check: no task of ours
is left running and every job record is terminal and true. The module prints
`fault scenarios: N passed, orphaned tasks: M` at the end.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from runner_emulator import SUCCESS, SYSTEM_FAILURE, JobSpec, RunnerConfig, RunnerEmulator
from sandbox.run_job import driver_command
from tests.conftest import REPO_ROOT, SUMMARY_LINES, start_sandbox, stop_sandbox, wait_until
from tests.e2e.conftest import descendants, started_by, table_key

pytestmark = pytest.mark.e2e

HEARTBEAT_TIMEOUT = 6  # orchestrator: a RUNNING job without heartbeats for this long is reaped
HEARTBEAT_INTERVAL = 1  # driver
REAPER_RATE = 1
PASSED: list[str] = []


def _start_fault_sandbox(directory, app_env: str):
    """A sandbox whose reaper runs every REAPER_RATE s and whose orchestrator gives up on a job after
    HEARTBEAT_TIMEOUT s without a heartbeat, plus `app_env`; its `fault_toml` heartbeats every
    HEARTBEAT_INTERVAL s."""
    running = start_sandbox(
        directory,
        "--schedule-rate",
        str(REAPER_RATE),
        "--app-env",
        f"HEARTBEAT_TIMEOUT={HEARTBEAT_TIMEOUT}",
        "--app-env",
        app_env,
    )
    toml = running.toml_path.read_text().replace(
        "[Job]\n", f"[Job]\nHeartbeatInterval = {HEARTBEAT_INTERVAL}\n"
    )
    running.fault_toml = directory / "fargate-faults.toml"
    running.fault_toml.write_text(toml)
    return running


@pytest.fixture(scope="module")
def faults_sandbox(sandbox_root):
    directory = sandbox_root / "faults"
    running = _start_fault_sandbox(directory, "JOB_REFRESH_AFTER=1")
    try:
        yield running
    finally:
        orphans = _running_tasks_of_ours(running)
        line = f"fault scenarios: {len(PASSED)} passed, orphaned tasks: {len(orphans)}"
        SUMMARY_LINES.append(line)
        stop_sandbox(directory)
        assert not orphans, line


def _running_tasks_of_ours(sandbox) -> list[dict]:
    ecs = sandbox.ecs()
    arns = ecs.list_tasks(cluster=sandbox.cluster, desiredStatus="RUNNING")["taskArns"]
    if not arns:
        return []
    tasks = ecs.describe_tasks(cluster=sandbox.cluster, tasks=arns)["tasks"]
    return [t for t in tasks if (t.get("startedBy") or "").startswith("gl-") and t["lastStatus"] != "STOPPED"]


def _record(sandbox, key: str) -> dict:
    item = sandbox.dynamodb().get_item(
        TableName=sandbox.table, Key=table_key(sandbox, key), ConsistentRead=True
    )
    return {k: next(iter(v.values())) for k, v in item.get("Item", {}).items()}


def _task(sandbox, arn: str) -> dict:
    return sandbox.ecs().describe_tasks(cluster=sandbox.cluster, tasks=[arn])["tasks"][0]


def settled(sandbox, key: str, timeout: float = 60) -> dict:
    """The end of every scenario: the job's task is STOPPED and its record terminal and true to it."""
    record = wait_until(
        lambda: _record(sandbox, key).get("state") in ("STOPPED", "FAILED"), timeout, 0.2, f"job {key} to end"
    )
    record = _record(sandbox, key)
    if record.get("task_arn"):
        task = wait_until(
            lambda: (
                _task(sandbox, record["task_arn"])["lastStatus"] == "STOPPED"
                and _task(sandbox, record["task_arn"])
            ),
            timeout,
            0.2,
            f"task of {key} to stop",
        )
        record = wait_until(
            lambda: (r := _record(sandbox, key)).get("last_status") == "STOPPED" and r,
            timeout,
            0.2,
            f"record of {key} to see STOPPED",
        )
        assert record.get("stopped_reason") == task.get("stoppedReason")
        assert record.get("stop_code") == task.get("stopCode")
    assert "live" not in record
    assert not [t for t in _running_tasks_of_ours(sandbox) if t["startedBy"] == started_by(sandbox, key)]
    return record


def emulator(sandbox, **knobs) -> RunnerEmulator:
    knobs.setdefault("preparation_retry_delay", 0.2)
    return RunnerEmulator(RunnerConfig.for_driver(driver_command(str(sandbox.fault_toml)), **knobs))


def key_of(job: JobSpec) -> str:
    return f"{RunnerConfig(run_exec=['x']).short_token}-{job.job_id}"


def passed(name: str) -> None:
    PASSED.append(name)


# --- the scenarios -------------------------------------------------------------------------------------


def test_runner_manager_sigkilled_mid_job_is_reaped_by_heartbeat_loss(faults_sandbox, tmp_path):
    job = JobSpec(script=["echo STAGE-STARTED", "sleep 300"])
    marker = tmp_path / "log"
    # The runner manager, in its own process: GitLab Runner plus every driver process it started.
    program = textwrap.dedent(
        f"""
        import sys
        from runner_emulator import JobSpec, RunnerConfig, RunnerEmulator
        from sandbox.run_job import driver_command
        log = open({str(marker)!r}, "w", buffering=1)
        config = RunnerConfig.for_driver(driver_command({str(faults_sandbox.fault_toml)!r}))
        RunnerEmulator(config, on_output=log.write).run(
            JobSpec(script={job.script!r}, job_id={job.job_id}))
        """
    )
    manager = subprocess.Popen([sys.executable, "-c", program], cwd=REPO_ROOT, start_new_session=True)
    try:
        wait_until(
            lambda: marker.exists() and "STAGE-STARTED" in marker.read_text(),
            60,
            0.2,
            "the build stage to start",
        )
    finally:
        for pid in [manager.pid, *descendants(manager.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        manager.wait()
    key = key_of(job)
    assert _record(faults_sandbox, key)["state"] == "RUNNING"  # nobody ran cleanup

    record = settled(faults_sandbox, key)

    assert record["reaped"] == "HeartbeatLost"
    assert record["stopped_reason"] == "runner manager stopped sending heartbeats for this job"
    passed("sigkill")


def test_a_live_job_with_a_long_stage_keeps_its_task(faults_sandbox):
    job = JobSpec(script=[f"sleep {HEARTBEAT_TIMEOUT * 2}", "echo STILL-HERE"])

    result = emulator(faults_sandbox).run(job)

    assert result.status == SUCCESS, result.log
    assert "STILL-HERE" in result.log
    record = settled(faults_sandbox, key_of(job))
    assert "reaped" not in record
    passed("long-stage")


def test_a_failing_cleanup_call_leaves_the_task_to_the_reaper(faults_sandbox):
    job = JobSpec(script=["echo ok"])
    runner = emulator(faults_sandbox)
    runner.config.cleanup_exec = ["/bin/false"]  # cleanup_exec fails: the runner only logs it

    result = runner.run(job)

    assert result.status == SUCCESS, result.log
    record = settled(faults_sandbox, key_of(job))
    assert record["reaped"] == "HeartbeatLost"
    passed("cleanup-fails")


def test_prepare_cancelled_right_after_run_task_stops_the_task(faults_sandbox):
    job = JobSpec(script=["echo never"])
    faults_sandbox.fault(job.job_id, "slow-provisioning", seconds=20)
    runner = emulator(faults_sandbox)
    seen: list[str] = []
    runner.on_output = seen.append

    def cancel_after_run_task():
        wait_until(lambda: "Task requested" in "".join(seen), 30, 0.05, "RunTask")
        runner.cancel()

    import threading

    canceller = threading.Thread(target=cancel_after_run_task)
    canceller.start()
    result = runner.run(job)
    canceller.join()

    assert result.status != SUCCESS
    assert "build_script" not in result.stage_names()
    record = settled(faults_sandbox, key_of(job), timeout=40)
    assert record["state"] == "FAILED"  # the container never ran
    passed("cancel-in-prepare")


def test_lost_run_task_response_and_a_retry_start_one_task(faults_sandbox):
    api = faults_sandbox.api()
    from fargate_ci_driver.keys import generate_ed25519

    client = generate_ed25519("client")
    body = {
        "runner": "t3sT1234",
        "job_id": "987654321",
        "project_id": "1",
        "pipeline_id": "2",
        "ssh_public_key": client.public_line,
    }
    first = api.create_job(body)
    # The Lambda died after RunTask, before it recorded the task: the record has no ARN and a lapsed lease.
    faults_sandbox.dynamodb().update_item(
        TableName=faults_sandbox.table,
        Key=table_key(faults_sandbox, first["job_key"]),
        UpdateExpression="REMOVE task_arn SET launch_lease_until = :zero",
        ExpressionAttributeValues={":zero": {"N": "0"}},
    )

    retried = api.create_job(body)  # the driver's retry of the lost response

    assert retried["task_arn"] == first["task_arn"]  # RunTask's clientToken gave back the same task
    started = faults_sandbox.ecs().list_tasks(
        cluster=faults_sandbox.cluster, startedBy=started_by(faults_sandbox, "t3sT1234-987654321")
    )
    assert started["taskArns"] == [first["task_arn"]]
    api.stop_job(first["job_key"], "scenario over", attempt=first["attempt"])
    settled(faults_sandbox, first["job_key"])
    passed("lost-response")


def test_spot_interruption_mid_job_is_a_system_failure_with_the_spot_reason(faults_sandbox):
    job = JobSpec(script=["echo working", "sleep 60"])
    faults_sandbox.fault(job.job_id, "spot", after=2, notice=2)

    result = emulator(faults_sandbox).run(job)

    assert result.failure_reason == SYSTEM_FAILURE, result.log
    assert "Spot" in result.log, result.log
    record = settled(faults_sandbox, key_of(job))
    assert record["stop_code"] == "SpotInterruption"
    assert record["stopped_reason"] == "Your Spot Task was interrupted."
    assert record["state"] == "STOPPED"
    passed("spot")


@pytest.mark.parametrize("events", [{"duplicate": True, "reorder": True}, {"drop": "PENDING,RUNNING"}])
def test_duplicated_reordered_or_lost_events_end_in_the_right_state(faults_sandbox, events):
    job = JobSpec(script=["echo fine"])
    faults_sandbox.fault(job.job_id, "events", **events)

    result = emulator(faults_sandbox).run(job)

    assert result.status == SUCCESS, result.log
    record = settled(faults_sandbox, key_of(job))
    assert record["state"] == "STOPPED"
    assert record["stop_code"] == "UserInitiated"
    passed("events-" + "-".join(events))


def test_a_task_with_our_tags_and_no_record_is_stopped(faults_sandbox):
    state = faults_sandbox.state
    arn = faults_sandbox.ecs().run_task(
        cluster=faults_sandbox.cluster,
        taskDefinition="ci-coordinator",
        launchType="FARGATE",
        startedBy=started_by(faults_sandbox, "t3sT1234-424242"),  # what we would start, with no record
        tags=[{"key": "managed-by", "value": "fargate-ci"}],
        networkConfiguration={
            "awsvpcConfiguration": {
                "subnets": state["subnets"][:1],
                "securityGroups": [state["security_group"]],
            }
        },
        overrides={"containerOverrides": [{"name": "ci-coordinator", "environment": []}]},
    )["tasks"][0]["taskArn"]

    task = wait_until(
        lambda: (t := _task(faults_sandbox, arn))["lastStatus"] == "STOPPED" and t,
        60,
        0.2,
        "the stray task to stop",
    )

    assert task["stoppedReason"] == "no CI job claims this task"
    passed("stray-task")


# --- AWS as it really is (issue 13): lost STOPPED events, no Spot capacity, the version-less notice -----


def _api_job(sandbox, job_id: str) -> dict:
    """A job started through the API alone: nobody heartbeats it or cleans it up."""
    from fargate_ci_driver.keys import generate_ed25519

    client = generate_ed25519("client")
    job = sandbox.api().create_job(
        {
            "runner": "t3sT1234",
            "job_id": job_id,
            "project_id": "1",
            "pipeline_id": "2",
            "ssh_public_key": client.public_line,
        }
    )
    wait_until(lambda: _record(sandbox, job["job_key"]).get("state") == "RUNNING", 30, 0.1, "RUNNING")
    return job


def test_a_job_stopped_at_its_deadline_ends_although_its_stopped_event_is_lost(faults_sandbox):
    job_id = "31000001"
    faults_sandbox.fault(job_id, "events", drop="STOPPED")
    job = _api_job(faults_sandbox, job_id)
    # The job passes its deadline (well before its heartbeats would be missed).
    faults_sandbox.dynamodb().update_item(
        TableName=faults_sandbox.table,
        Key=table_key(faults_sandbox, job["job_key"]),
        UpdateExpression="SET deadline = :past",
        ExpressionAttributeValues={":past": {"N": "1"}},
    )

    record = settled(faults_sandbox, job["job_key"], timeout=90)  # ended from DescribeTasks, not the event

    assert record["state"] == "STOPPED"
    assert record["reaped"] == "Deadline"
    assert record["stopped_reason"] == "CI job passed its deadline (job timeout plus grace)"
    passed("lost-stopped-after-deadline")


def test_a_job_stopped_for_lost_heartbeats_ends_although_its_stopped_event_is_lost(faults_sandbox):
    job_id = "31000002"
    faults_sandbox.fault(job_id, "events", drop="STOPPED")
    job = _api_job(faults_sandbox, job_id)

    record = settled(faults_sandbox, job["job_key"], timeout=90)

    assert record["state"] == "STOPPED"
    assert record["reaped"] == "HeartbeatLost"
    assert record["stopped_reason"] == "runner manager stopped sending heartbeats for this job"
    passed("lost-stopped-after-heartbeat")


def test_the_versionless_spot_notice_is_applied_once_and_the_job_ends_as_a_spot_interruption(faults_sandbox):
    job = JobSpec(script=["echo working", "sleep 60"])
    faults_sandbox.fault(job.job_id, "spot", after=2, notice=2, versionless=True)

    result = emulator(faults_sandbox).run(job)

    assert result.failure_reason == SYSTEM_FAILURE, result.log
    assert "Spot" in result.log, result.log
    record = settled(faults_sandbox, key_of(job))
    assert record["state"] == "STOPPED"
    assert record["stop_code"] == "SpotInterruption"
    assert record["last_status"] == "STOPPED"  # the late repeat of the notice moved nothing back
    passed("versionless-notice")


@pytest.fixture(scope="module")
def spot_sandbox(sandbox_root, faults_sandbox):
    """A second sandbox whose orchestrator prefers Fargate Spot (FARGATE_SPOT:3,FARGATE:1)."""
    directory = sandbox_root / "faults-spot"
    running = _start_fault_sandbox(directory, "FARGATE_CAPACITY_PROVIDERS=FARGATE_SPOT:3,FARGATE:1")
    try:
        yield running
    finally:
        orphans = _running_tasks_of_ours(running)
        stop_sandbox(directory)
        assert not orphans, f"orphaned tasks in the Spot sandbox: {len(orphans)}"


def test_spot_without_capacity_runs_the_job_on_fargate_in_the_same_prepare(spot_sandbox):
    job = JobSpec(script=["echo ON-DEMAND-OK"])
    spot_sandbox.fault(job.job_id, "spot-no-capacity")

    result = emulator(spot_sandbox).run(job)

    assert result.status == SUCCESS, result.log
    assert "ON-DEMAND-OK" in result.log
    assert "Fargate Spot had no capacity" in result.log, result.log
    record = settled(spot_sandbox, key_of(job))
    assert record["capacity_provider"] == "FARGATE"
    assert "Capacity is unavailable" in record["capacity_note"]
    assert record["attempt"] == "1"
    passed("spot-no-capacity")


# --- an API outage during a long job -------------------------------------------------------------------

API_OUTAGE = 3  # seconds: longer than HEARTBEAT_INTERVAL and the driver's request timeout below, shorter
# than HEARTBEAT_TIMEOUT (in production: 5 minutes against 15; design.md "Orphans")


def test_an_api_outage_during_a_long_job_does_not_kill_it(faults_sandbox):
    """The API (with its reaper and event handling) hangs while a job's long stage runs: heartbeats fail
    meanwhile, and once the API is back the job carries on, ends successfully and keeps its whole output."""
    import threading
    import time

    from chalicelib import clock

    toml = faults_sandbox.fault_toml.read_text().replace("Timeout = 10\n", "Timeout = 1\n")
    assert "Timeout = 1\n" in toml
    outage_toml = faults_sandbox.fault_toml.with_name("fargate-outage.toml")
    outage_toml.write_text(toml)  # heartbeats give up after 1 s, so those sent during the outage fail
    job = JobSpec(script=["echo BEFORE-OUTAGE", f"sleep {3 * HEARTBEAT_TIMEOUT}", "echo AFTER-OUTAGE"])
    seen: list[str] = []
    runner = RunnerEmulator(
        RunnerConfig.for_driver(driver_command(str(outage_toml)), preparation_retry_delay=0.2),
        on_output=seen.append,
    )
    api_host = faults_sandbox.state["pids"]["api_host"]
    outage: dict[str, float] = {}

    def api_outage() -> None:
        wait_until(lambda: "BEFORE-OUTAGE" in "".join(seen), 60, 0.1, "the long stage to start")
        time.sleep(HEARTBEAT_INTERVAL * 2)  # heartbeats flowing first
        api = [api_host, *descendants(api_host)]
        outage["start"] = time.time()
        try:
            for pid in api:
                os.kill(pid, signal.SIGSTOP)
            time.sleep(API_OUTAGE)
        finally:
            for pid in api:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            outage["end"] = time.time()

    interrupter = threading.Thread(target=api_outage)
    interrupter.start()
    try:
        result = runner.run(job)
    finally:
        interrupter.join()

    assert outage["end"] - outage["start"] >= API_OUTAGE > HEARTBEAT_INTERVAL
    assert result.status == SUCCESS, result.log
    assert "BEFORE-OUTAGE" in result.log and "AFTER-OUTAGE" in result.log
    record = settled(faults_sandbox, key_of(job))
    assert "reaped" not in record  # neither the heartbeat reaper nor any other stopped it
    assert record["stop_code"] == "UserInitiated"  # the driver's own cleanup did
    # The driver kept beating after the failed heartbeats: the last one arrived after the outage.
    assert clock.parse(record["heartbeat_at"]) > outage["end"]
    passed("api-outage")
