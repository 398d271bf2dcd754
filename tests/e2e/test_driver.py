"""fargate-driver end to end: the runner emulator drives the real console script against the sandbox (moto,
the Chalice app behind SigV4, bwrap-confined tasks with real sshd), exactly as GitLab Runner would."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fargate_ci_driver.keys import generate_ed25519
from runner_emulator import (
    CANCELED,
    SCRIPT_FAILURE,
    SUCCESS,
    JobResult,
    JobSpec,
    RunnerConfig,
    RunnerEmulator,
)
from runner_emulator.payload import job_payload, write_job_payload
from sandbox.run_job import driver_command
from tests.conftest import wait_until
from tests.e2e.conftest import table_key

pytestmark = pytest.mark.e2e


def runner(sandbox, on_output=None, **knobs) -> RunnerEmulator:
    knobs.setdefault("preparation_retry_delay", 0.2)
    config = RunnerConfig.for_driver(driver_command(str(sandbox.toml_path)), **knobs)
    return RunnerEmulator(config, on_output=on_output)


def job_key(job: JobSpec, config: RunnerConfig | None = None) -> str:
    return f"{(config or RunnerConfig(run_exec=['x'])).short_token}-{job.job_id}"


def assert_stopped_and_forgotten(sandbox, job: JobSpec) -> dict:
    """Cleanup asked the orchestrator to stop the task, and left no key or state on the runner manager."""
    view = sandbox.api().get_job(job_key(job))
    assert view["state"] in ("STOPPING", "STOPPED"), view
    metadata = Path(json.loads((sandbox.dir / "sandbox.json").read_text())["metadata_dir"])
    assert not list(metadata.glob(f"{job_key(job)}.*"))
    return view


def no_secrets(result: JobResult, job: JobSpec) -> None:
    for text in (result.log, result.runner_log):
        assert "PRIVATE KEY" not in text
        assert job.token not in text


def test_a_job_runs_in_its_task_and_cleanup_stops_it(sandbox):
    job = JobSpec(
        script=['echo "hello from $(hostname) as $(id -un)"', 'echo "GREETING=$GREETING"'],
        variables={"GREETING": 'it\'s "quoted" and $dollared'},
    )
    result = runner(sandbox).run(job)
    assert result.status == SUCCESS, result.log
    assert "hello from ip-127-" in result.log and " as root" in result.log
    assert 'GREETING=it\'s "quoted" and $dollared' in result.log
    assert re.search(r"Task requested: arn:aws:ecs:\S+:task/\S+", result.log)
    assert re.search(r"Task address: 127\.\S+:\d+", result.log)
    assert re.search(r"SSH ready after \d+\.\ds", result.log)
    assert result.log.rstrip().endswith("Job succeeded")
    view = assert_stopped_and_forgotten(sandbox, job)
    assert view["task_arn"] in result.log
    no_secrets(result, job)


def test_a_failing_script_is_a_build_failure_with_its_own_exit_code(sandbox):
    job = JobSpec(script=["echo about to fail", "exit 42"], after_script=['echo "after: $CI_JOB_STATUS"'])
    result = runner(sandbox).run(job)
    assert (result.status, result.failure_reason, result.exit_code) == ("failed", SCRIPT_FAILURE, 42)
    assert "after: failed" in result.log
    assert "ERROR: Job failed: exit status 42" in result.log
    assert_stopped_and_forgotten(sandbox, job)


def test_a_300_kb_stage_script_goes_through_stdin(sandbox):
    """Every stage re-exports every variable; the Go driver's exec-argument approach breaks at 128 KiB."""
    variables = {f"BULK_{i:04d}": f"{i:04d}-" + "x" * 90 for i in range(3000)}
    job = JobSpec(script=['echo "last=${BULK_2999:0:9} count=$(env | grep -c ^BULK_)"'], variables=variables)
    config_probe = runner(sandbox)
    result = config_probe.run(job)
    assert result.status == SUCCESS, result.log[-2000:]
    assert "last=2999-xxxx count=3000" in result.log


def test_a_command_that_reads_stdin_cannot_eat_the_script(sandbox):
    job = JobSpec(script=["cat", 'read -r line || echo "stdin is empty"', "echo after the readers"])
    result = runner(sandbox).run(job)
    assert result.status == SUCCESS, result.log
    assert "stdin is empty" in result.log
    assert "after the readers" in result.log


def _processes(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker in cmdline and state != "Z":
                found.append(int(entry))
    return found


def test_cancel_kills_the_remote_stage_runs_after_script_and_stops_the_task(sandbox):
    marker = f"31337.{os.getpid() % 1000:03d}"  # a sleep only this test starts
    started = threading.Event()

    def watch(text: str) -> None:
        if "the job is sleeping" in text:
            started.set()

    emulator = runner(sandbox, on_output=watch)
    job = JobSpec(
        script=["echo the job is sleeping", f"sleep {marker} & wait"],
        after_script=['echo "after_script ran: $CI_JOB_STATUS"'],
    )
    results: list[JobResult] = []
    thread = threading.Thread(target=lambda: results.append(emulator.run(job)))
    thread.start()
    try:
        assert started.wait(120), emulator.log_text
        wait_until(lambda: _processes(f"sleep {marker}"), timeout=30, what="the remote sleep to start")
        emulator.cancel()
    finally:
        thread.join(180)
    result = results[0]
    assert result.status == CANCELED, result.log
    assert "after_script ran: canceled" in result.log
    wait_until(lambda: not _processes(f"sleep {marker}"), timeout=30, what="the remote stage to be killed")
    assert_stopped_and_forgotten(sandbox, job)


def test_a_task_that_fails_to_start_shows_awss_reason_and_the_runner_retries(sandbox):
    job = JobSpec(script=["echo second attempt works"])
    sandbox.fault(job.job_id, "fail-to-start")
    result = runner(sandbox).run(job)
    assert result.status == SUCCESS, result.log
    assert result.prepare_attempts == 2
    assert "CannotPullContainerError" in result.log
    assert "stop code TaskFailedToStart" in result.log
    assert "WARNING: Preparation failed: exit status 2" in result.log
    assert "second attempt works" in result.log
    assert sandbox.api().get_job(job_key(job))["attempt"] == 2


def test_a_task_taken_away_mid_job_is_a_system_failure_with_the_stop_code(sandbox):
    job = JobSpec(script=["echo working", "sleep 30"])
    sandbox.fault(job.job_id, "spot", after=1.0, notice=0.5)
    result = runner(sandbox).run(job)
    assert (result.status, result.failure_reason) == ("failed", "runner_system_failure"), result.log
    assert re.search(r"stop code (SpotInterruption|TerminationNotice)", result.log)


def test_a_container_that_dies_mid_stage_is_a_system_failure_with_its_reason(sandbox):
    job = JobSpec(script=["echo working", "sleep 30"])
    sandbox.fault(job.job_id, "exit", after=2.5, code=137)
    result = runner(sandbox).run(job)
    assert (result.status, result.failure_reason) == ("failed", "runner_system_failure"), result.log
    assert "the task was stopped under the job" in result.log
    assert "exit code 137" in result.log


def test_two_jobs_at_once_do_not_cross_talk(sandbox):
    jobs = [
        JobSpec(
            script=[f'echo "job {n} says $WHO from $(hostname)"', "sleep 1"], variables={"WHO": f"owner-{n}"}
        )
        for n in (1, 2)
    ]
    results: dict[int, JobResult] = {}
    threads = [
        threading.Thread(target=lambda n=n, job=job: results.__setitem__(n, runner(sandbox).run(job)))
        for n, job in zip((1, 2), jobs, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    hosts = set()
    for n, other in ((1, 2), (2, 1)):
        log = results[n].log
        assert results[n].status == SUCCESS, log
        assert f"job {n} says owner-{n}" in log
        assert f"owner-{other}" not in log and f"job {other} says" not in log
        hosts.add(re.search(rf"job {n} says owner-{n} from (\S+)", log).group(1))
    assert len(hosts) == 2  # one task each
    arns = {assert_stopped_and_forgotten(sandbox, job)["task_arn"] for job in jobs}
    assert len(arns) == 2


# --- the driver's stages called directly, as the runner does, to reach between them -------------------


def runner_env(tmp_path: Path, job_id: int) -> dict[str, str]:
    """What the Custom executor passes every exec of job `job_id`: its directory (TMPDIR) with the job
    payload, the exit codes, and the job's variables."""
    job_dir = tmp_path / f"custom-executor-{job_id}"
    job_dir.mkdir(mode=0o700)
    spec = JobSpec(["true"], job_id=job_id, project_id=42, pipeline_id=7, timeout=600)
    return {
        **os.environ,
        "TMPDIR": str(job_dir),
        "JOB_RESPONSE_FILE": write_job_payload(
            str(job_dir), job_payload(spec, "https://gitlab.example.com", [])
        ),
        "BUILD_FAILURE_EXIT_CODE": "1",
        "SYSTEM_FAILURE_EXIT_CODE": "2",
        "BUILD_EXIT_CODE_FILE": str(tmp_path / "build_exit_code"),
        "CUSTOM_ENV_CI_RUNNER_SHORT_TOKEN": "t3sT1234",
        "CUSTOM_ENV_CI_SERVER_URL": "https://gitlab.example.com",
        "CUSTOM_ENV_CI_JOB_ID": str(job_id),
        "CUSTOM_ENV_CI_PROJECT_ID": "42",
        "CUSTOM_ENV_CI_PIPELINE_ID": "7",
        "CUSTOM_ENV_CI_JOB_TIMEOUT": "600",
    }


def driver(sandbox, env, *args: str, python_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    argv = [
        sys.executable,
        *python_flags,
        "-m",
        "fargate_ci_driver",
        "--config",
        str(sandbox.toml_path),
        "custom",
        *args,
    ]
    return subprocess.run(
        argv, env=env, cwd=env["TMPDIR"], capture_output=True, text=True, timeout=120, check=False
    )


def test_cleanup_with_no_state_exits_0_with_a_note(sandbox, tmp_path):
    env = runner_env(tmp_path, 990001)
    done = driver(sandbox, env, "cleanup")
    assert done.returncode == 0, done.stderr
    assert "Nothing to clean up: prepare recorded no job here" in done.stdout


def test_a_host_key_other_than_the_pinned_one_is_refused(sandbox, tmp_path):
    env = runner_env(tmp_path, 990002 + os.getpid() % 1000)
    key = f"t3sT1234-{env['CUSTOM_ENV_CI_JOB_ID']}"
    script = tmp_path / "script"
    script.write_text("echo inside-the-task\n")
    prepared = driver(sandbox, env, "prepare")
    try:
        assert prepared.returncode == 0, prepared.stdout + prepared.stderr
        # A run stage with the right key works, and stays light: no boto3 on the way.
        ran = driver(sandbox, env, "run", str(script), "build_script", python_flags=("-X", "importtime"))
        assert ran.returncode == 0, ran.stderr[-3000:]
        assert "inside-the-task" in ran.stdout
        boto3 = [line for line in ran.stderr.splitlines() if re.search(r"\|\s+boto3(\.|\s*$)", line)]
        assert boto3 == []
        # Now pin some other key, as if the address now led to another machine.
        state_file = (
            Path(json.loads((sandbox.dir / "sandbox.json").read_text())["metadata_dir"]) / f"{key}.json"
        )
        state = json.loads(state_file.read_text())
        state["host_public_key"] = generate_ed25519("impostor").public_line
        state_file.write_text(json.dumps(state))
        refused = driver(sandbox, env, "run", str(script), "build_script")
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "not the one pinned for this job: refusing to connect" in refused.stderr, refused.stderr
        assert "inside-the-task" not in refused.stdout
    finally:
        cleaned = driver(sandbox, env, "cleanup")
    assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
    assert sandbox.api().get_job(key)["state"] in ("STOPPING", "STOPPED")


def test_a_long_stage_keeps_heartbeating_so_the_reaper_leaves_it_alone(sandbox, tmp_path):
    toml = tmp_path / "fargate.toml"
    toml.write_text(sandbox.toml_path.read_text().replace("[Job]\n", "[Job]\nHeartbeatInterval = 1\n"))
    started = threading.Event()
    config = RunnerConfig.for_driver(driver_command(str(toml)), preparation_retry_delay=0.2)
    emulator = RunnerEmulator(config, on_output=lambda text: "long stage" in text and started.set())
    job = JobSpec(script=["echo long stage", "sleep 600"])
    key = table_key(sandbox, job_key(job, config))
    seen: set[str] = set()

    def beats() -> int:
        item = sandbox.dynamodb().get_item(TableName=sandbox.table, Key=key).get("Item", {})
        if "heartbeat_at" in item:
            seen.add(item["heartbeat_at"]["S"])
        return len(seen)

    results: list[JobResult] = []
    thread = threading.Thread(target=lambda: results.append(emulator.run(job)))
    thread.start()
    try:
        assert started.wait(120), emulator.log_text
        wait_until(lambda: beats() >= 3, timeout=60, interval=0.3, what="three heartbeats during one stage")
    finally:
        emulator.cancel()
        thread.join(120)
    assert results[0].status == CANCELED


def test_cancel_during_prepare_stops_the_task_before_the_driver_exits(sandbox):
    provisioning = threading.Event()

    def watch(text: str) -> None:
        if "Task PROVISIONING" in text or "Task PENDING" in text:
            provisioning.set()

    emulator = runner(sandbox, on_output=watch)
    job = JobSpec(script=["echo never"])
    sandbox.fault(job.job_id, "slow-provisioning", seconds=60)
    results: list[JobResult] = []
    thread = threading.Thread(target=lambda: results.append(emulator.run(job)))
    thread.start()
    try:
        assert provisioning.wait(120), emulator.log_text
        emulator.cancel()
    finally:
        thread.join(120)
    result = results[0]
    assert result.status == CANCELED
    assert "Cancelled: stopping the task" in result.log
    assert result.stage_names() == []
    assert sandbox.api().get_job(job_key(job))["state"] in ("STOPPING", "STOPPED", "FAILED")


def test_a_task_whose_sshd_never_answers_is_stopped_and_the_retry_gets_a_new_attempt(sandbox, tmp_path):
    toml = tmp_path / "fargate.toml"
    toml.write_text(sandbox.toml_path.read_text().replace("PrepareTimeout = 600", "PrepareTimeout = 4"))
    config = RunnerConfig.for_driver(driver_command(str(toml)), preparation_retry_delay=0.2)
    job = JobSpec(script=["echo the retry works"])
    sandbox.fault(job.job_id, "sshd-delay", seconds=120)
    result = RunnerEmulator(config).run(job)
    assert result.status == SUCCESS, result.log
    assert result.prepare_attempts == 2
    # The fault delays the whole entrypoint: the task never publishes its host key, so sshd is never tried.
    assert "did not publish its host key within 4s ([Job] PrepareTimeout)" in result.log
    assert "the retry works" in result.log
    assert sandbox.api().get_job(job_key(job, config))["attempt"] == 2
