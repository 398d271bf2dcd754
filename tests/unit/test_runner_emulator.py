"""The runner emulator against a tiny real driver (runner_emulator.test_executor): stage order and skipping,
the failure flow, prepare retries, exit-code classification, kills, cancel and timeout."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from runner_emulator import (
    CANCELED,
    FAILED,
    JOB_TIMEOUT,
    SCRIPT_FAILURE,
    SUCCESS,
    SYSTEM_FAILURE,
    JobSpec,
    RunnerConfig,
    RunnerEmulator,
)

EXECUTOR = [sys.executable, "-m", "runner_emulator.test_executor"]


def emulator(tmp_path: Path, on_output=None, **knobs) -> tuple[RunnerEmulator, Path]:
    record = tmp_path / "calls.jsonl"
    process_env = {"TEST_EXECUTOR_RECORD": str(record), **knobs.pop("process_env", {})}
    knobs.setdefault("preparation_retry_delay", 0.05)
    config = RunnerConfig.for_driver(EXECUTOR, process_env=process_env, **knobs)
    return RunnerEmulator(config, on_output=on_output), record


def calls(record: Path) -> list[dict]:
    return [json.loads(line) for line in record.read_text().splitlines()]


def test_a_successful_job_runs_the_always_stages_in_order(tmp_path):
    runner, record = emulator(tmp_path)
    result = runner.run(JobSpec(script=["echo hello from the job"]))
    assert (result.status, result.failure_reason, result.exit_code) == (SUCCESS, None, None)
    assert result.stage_names() == ["prepare_script", "get_sources", "build_script", "cleanup_file_variables"]
    assert [(c["command"], c["stage"]) for c in calls(record)] == [
        ("config", None),
        ("prepare", None),
        ("run", "prepare_script"),
        ("run", "get_sources"),
        ("run", "build_script"),
        ("run", "cleanup_file_variables"),
        ("cleanup", None),
    ]
    assert "Using Custom executor with driver test-executor 1.0..." in result.log
    assert "Running on " in result.log and " via test-host..." in result.log
    assert "$ echo hello from the job\nhello from the job\n" in result.log
    assert result.log.rstrip().endswith("Job succeeded")
    assert "config: diagnostics go to stderr" in result.log  # config_exec stderr reaches the job log
    assert "test executor: cleaned up" in result.runner_log and "cleaned up" not in result.log


def test_optional_stages_appear_only_when_the_job_has_them(tmp_path):
    runner, _ = emulator(tmp_path)
    job = JobSpec(
        script=["true"],
        after_script=["true"],
        extra_steps={"Release": ["echo releasing"]},
        cache_paths=["node_modules/"],
        artifact_paths=["dist/"],
        has_dependencies=True,
    )
    result = runner.run(job)
    assert result.status == SUCCESS
    assert result.stage_names() == [
        "prepare_script",
        "get_sources",
        "restore_cache",
        "download_artifacts",
        "build_script",
        "step_release",
        "after_script",
        "archive_cache",
        "upload_artifacts_on_success",
        "cleanup_file_variables",
    ]


def test_a_script_failure_keeps_its_exit_code_and_after_script_sees_failed(tmp_path):
    runner, _ = emulator(tmp_path)
    job = JobSpec(
        script=["echo before", "exit 42", "echo never"],
        after_script=["echo after: $CI_JOB_STATUS", "false"],
        extra_steps={"release": ["echo skipped"]},
        artifact_paths=["out/"],
    )
    result = runner.run(job)
    assert (result.status, result.failure_reason, result.exit_code) == (FAILED, SCRIPT_FAILURE, 42)
    assert result.stage_names() == [
        "prepare_script",
        "get_sources",
        "build_script",
        "after_script",
        "upload_artifacts_on_failure",
        "cleanup_file_variables",
    ]
    assert "never" not in result.log
    assert "after: failed" in result.log
    assert result.log.rstrip().endswith("ERROR: Job failed: exit status 42")


def test_a_system_failure_in_get_sources_skips_user_steps_and_after_script(tmp_path):
    runner, _ = emulator(tmp_path, process_env={"TEST_EXECUTOR_FAIL_STAGE": "get_sources=system"})
    result = runner.run(JobSpec(script=["echo never"], after_script=["echo never"], cache_paths=["c/"]))
    assert (result.status, result.failure_reason) == (FAILED, SYSTEM_FAILURE)
    assert result.stage_names() == [
        "prepare_script",
        "get_sources",
        "archive_cache_on_failure",
        "cleanup_file_variables",
    ]
    assert "ERROR: Job failed (system failure): exit status 2" in result.log


def test_a_prepare_script_failure_ends_the_job_at_once(tmp_path):
    runner, record = emulator(tmp_path, process_env={"TEST_EXECUTOR_FAIL_STAGE": "prepare_script=build"})
    result = runner.run(JobSpec(script=["true"], after_script=["true"]))
    assert result.stage_names() == ["prepare_script"]
    assert (result.status, result.failure_reason, result.exit_code) == (FAILED, SCRIPT_FAILURE, 1)
    assert calls(record)[-1]["command"] == "cleanup"


def test_prepare_is_tried_three_times_with_cleanup_after_each_failure(tmp_path):
    runner, record = emulator(tmp_path, process_env={"TEST_EXECUTOR_PREPARE_EXIT": "system"})
    result = runner.run(JobSpec(script=["true"]))
    assert (result.status, result.failure_reason, result.prepare_attempts) == (FAILED, SYSTEM_FAILURE, 3)
    assert [c["command"] for c in calls(record)] == ["config", "prepare", "cleanup"] * 3
    assert result.log.count("WARNING: Preparation failed: exit status 2") == 2
    assert "Will be retried in 0.05s ..." in result.log
    assert "ERROR: Preparation failed: exit status 2" in result.log
    # Each attempt has its own temp dir, removed afterwards.
    dirs = {c["cwd"] for c in calls(record)}
    assert len(dirs) == 3 and not any(os.path.exists(d) for d in dirs)


def test_a_build_failure_in_prepare_is_not_retried(tmp_path):
    runner, record = emulator(tmp_path, process_env={"TEST_EXECUTOR_PREPARE_EXIT": "build"})
    result = runner.run(JobSpec(script=["true"]))
    assert (result.status, result.failure_reason, result.prepare_attempts) == (FAILED, SCRIPT_FAILURE, 1)
    assert [c["command"] for c in calls(record)] == ["config", "prepare", "cleanup"]


def test_config_output_that_is_not_json_is_a_retried_system_failure(tmp_path):
    runner, _ = emulator(tmp_path, process_env={"TEST_EXECUTOR_CONFIG": "garbage"})
    result = runner.run(JobSpec(script=["true"]))
    assert (result.failure_reason, result.prepare_attempts) == (SYSTEM_FAILURE, 3)
    assert "error while parsing JSON output" in result.log


def test_missing_builds_dir_is_a_configuration_error_without_retry(tmp_path):
    runner, _ = emulator(tmp_path, process_env={"TEST_EXECUTOR_CONFIG": "no-dirs"})
    result = runner.run(JobSpec(script=["true"]))
    assert result.prepare_attempts == 1
    assert "the builds_dir is not configured" in result.log


@pytest.mark.parametrize(
    ("fail", "reason", "message"),
    [
        ("build_script=3", SYSTEM_FAILURE, "unknown Custom executor executable exit code 3"),
        ("build_script=system", SYSTEM_FAILURE, "exit status 2"),
        ("build_script=build", SCRIPT_FAILURE, "exit status 1"),  # no exit-code file: 1
    ],
)
def test_exit_code_classification(tmp_path, fail, reason, message):
    runner, _ = emulator(tmp_path, process_env={"TEST_EXECUTOR_FAIL_STAGE": fail})
    result = runner.run(JobSpec(script=["true"]))
    assert (result.status, result.failure_reason, result.message) == (FAILED, reason, message)


def test_the_exit_codes_come_from_the_environment(tmp_path):
    runner, record = emulator(tmp_path, build_failure_exit_code=11, system_failure_exit_code=12)
    result = runner.run(JobSpec(script=["exit 7"]))
    assert (result.failure_reason, result.exit_code) == (SCRIPT_FAILURE, 7)
    env = calls(record)[0]["env"]
    assert (env["BUILD_FAILURE_EXIT_CODE"], env["SYSTEM_FAILURE_EXIT_CODE"]) == ("11", "12")


def test_every_exec_gets_the_runners_environment_and_its_own_process_group(tmp_path):
    runner, record = emulator(tmp_path)
    job = JobSpec(script=["true"], job_id=9001)
    runner.run(job)
    entries = calls(record)
    config, prepare = entries[0], entries[1]
    assert all(e["pgid_is_own"] for e in entries)
    assert all(e["cwd"] == config["cwd"] for e in entries)
    assert config["env"]["TMPDIR"] == config["cwd"]
    assert config["env"]["JOB_RESPONSE_FILE"] == os.path.join(config["cwd"], "response.json")
    assert config["env"]["BUILD_EXIT_CODE_FILE"] == os.path.join(config["cwd"], "build_exit_code")
    assert config["env"]["CUSTOM_ENV_CI_JOB_ID"] == "9001"
    assert config["env"]["CUSTOM_ENV_CI_JOB_TOKEN"] == job.token
    assert config["env"]["CUSTOM_ENV_CI_JOB_SERVICES"] == ""
    assert config["env"]["CUSTOM_ENV_CI_PROJECT_DIR"] == ""  # not known yet at config time
    assert prepare["env"]["CUSTOM_ENV_CI_PROJECT_DIR"].endswith("/builds/group/project")


def test_response_json_is_private_and_holds_the_job_token(tmp_path):
    seen = {}
    runner, record = emulator(tmp_path)

    def watch(text):
        if "Preparing environment" in text and not seen:
            path = Path(calls(record)[0]["env"]["JOB_RESPONSE_FILE"])
            seen["mode"] = path.stat().st_mode & 0o777
            seen["payload"] = json.loads(path.read_text())

    runner.on_output = watch
    job = JobSpec(script=["true"])
    runner.run(job)
    assert seen["mode"] == 0o600
    assert seen["payload"]["token"] == job.token
    assert seen["payload"]["runner_info"]["timeout"] == int(job.timeout)


def test_job_variables_override_the_predefined_ones_but_never_the_payload(tmp_path):
    """GitLab appends a job's own variables after the predefined ones: `CUSTOM_ENV_CI_JOB_ID` is whatever the
    job's .gitlab-ci.yml says, while the job payload (JOB_RESPONSE_FILE) keeps the job's own ids."""
    seen = {}
    runner, record = emulator(tmp_path)

    def watch(text):
        if "Preparing environment" in text and not seen:
            seen["payload"] = json.loads(Path(calls(record)[0]["env"]["JOB_RESPONSE_FILE"]).read_text())

    runner.on_output = watch
    job = JobSpec(
        script=["true"], job_id=6006, variables={"CI_JOB_ID": "5005", "CI_RUNNER_SHORT_TOKEN": "vIcTiM01"}
    )
    assert runner.run(job).status == SUCCESS
    for call in calls(record):
        assert call["env"]["CUSTOM_ENV_CI_JOB_ID"] == "5005"
        assert call["env"]["CUSTOM_ENV_CI_RUNNER_SHORT_TOKEN"] == "vIcTiM01"
    payload = seen["payload"]
    assert (payload["id"], payload["job_info"]["project_id"], payload["job_info"]["pipeline_id"]) == (
        6006,
        job.project_id,
        job.pipeline_id,
    )
    assert (
        payload["git_info"]["repo_url"]
        == f"https://gitlab-ci-token:{job.token}@gitlab.example.com/group/project.git"
    )
    # Both values are in the payload's variables, the job's own last (as GitLab sends them).
    ids = [v["value"] for v in payload["variables"] if v["key"] == "CI_JOB_ID"]
    assert ids == ["6006", "5005"]


def test_cancel_during_the_script_kills_it_and_still_runs_after_script(tmp_path):
    marker = tmp_path / "still-running"
    started = threading.Event()

    def watch(text):
        if "job is sleeping" in text:
            started.set()

    runner, record = emulator(tmp_path, on_output=watch)
    job = JobSpec(
        script=["echo job is sleeping", f"sleep 30; touch {marker}"],
        after_script=["echo after: $CI_JOB_STATUS"],
        artifact_paths=["x/"],
    )
    result_box = []
    thread = threading.Thread(target=lambda: result_box.append(runner.run(job)))
    thread.start()
    assert started.wait(30)
    runner.cancel()
    thread.join(60)
    result = result_box[0]
    assert result.status == CANCELED
    assert "after: canceled" in result.log
    assert result.stage_names()[-3:] == [
        "after_script",
        "upload_artifacts_on_failure",
        "cleanup_file_variables",
    ]
    assert result.log.rstrip().endswith("ERROR: Job failed: canceled")
    assert calls(record)[-1]["command"] == "cleanup"
    assert not marker.exists()


def test_cancel_before_the_user_steps_stops_everything_but_cleanup(tmp_path):
    runner, record = emulator(tmp_path, process_env={"TEST_EXECUTOR_PREPARE_EXIT": "system"})
    runner.config.preparation_retry_delay = 30
    result_box = []
    thread = threading.Thread(target=lambda: result_box.append(runner.run(JobSpec(script=["true"]))))
    thread.start()
    deadline = time.monotonic() + 30
    while "Will be retried" not in runner.log_text and time.monotonic() < deadline:
        time.sleep(0.02)
    runner.cancel()
    thread.join(30)
    assert result_box[0].status == CANCELED
    assert result_box[0].prepare_attempts == 1
    assert [c["command"] for c in calls(record)] == ["config", "prepare", "cleanup"]


def test_the_job_timeout_kills_the_stage_and_reports_job_execution_timeout(tmp_path):
    runner, record = emulator(tmp_path)
    result = runner.run(JobSpec(script=["sleep 30"], after_script=["echo never"], timeout=1))
    assert (result.status, result.failure_reason) == (FAILED, JOB_TIMEOUT)
    assert "after_script" not in result.stage_names()
    assert "ERROR: Job failed: execution took longer than 1 seconds" in result.log
    assert calls(record)[-1]["command"] == "cleanup"


def test_a_driver_that_ignores_sigterm_is_killed_after_the_graceful_timeout(tmp_path):
    runner, _ = emulator(
        tmp_path,
        process_env={"TEST_EXECUTOR_IGNORE_TERM": "1"},
        graceful_kill_timeout=0.5,
        force_kill_timeout=5,
    )
    # The job timeout leaves the executor (a Python process) time to install its SIG_IGN even on a loaded
    # machine: a SIGTERM before that would end it as SIGTERM, not test the SIGKILL.
    result = runner.run(JobSpec(script=["trap '' TERM; sleep 30"], timeout=3))
    assert result.failure_reason == JOB_TIMEOUT
    build = next(s for s in result.stages if s.stage == "build_script")
    assert build.failure.message == "signal: SIGKILL"
