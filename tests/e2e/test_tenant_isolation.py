"""Issue 12: a job cannot reach another job through its own variables. GitLab appends a job's `.gitlab-ci.yml`
variables after the predefined ones, so a job can set `CI_JOB_ID` or `CI_RUNNER_SHORT_TOKEN` to a running
job's values; the driver takes the job's identity from GitLab Runner's job payload and its own config
instead. Two concurrent jobs on one runner manager, through the runner emulator, with the real driver, the
sandbox's orchestrator and real sshd."""

from __future__ import annotations

import contextlib
import hashlib
import threading
import uuid
from pathlib import Path

import pytest

from runner_emulator import SUCCESS, JobResult, JobSpec, RunnerConfig, RunnerEmulator
from sandbox.run_job import driver_command
from tests.conftest import wait_until
from tests.e2e.conftest import next_job_id

pytestmark = pytest.mark.e2e

LINES = 200


def _files(metadata: Path, key: str) -> dict[str, str]:
    """The job's state and key files, by content digest."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(metadata.glob(f"{key}.*"))}


def _victim_and_intruder(sandbox, victim_toml: Path, victim_runner: str, intruder_variables: dict) -> None:
    """The victim job runs until released; meanwhile the intruder job, whose variables claim the victim's
    identity, runs to the end. The victim must be untouched and finish with its whole output."""
    metadata = Path(sandbox.state["metadata_dir"])
    # The release file goes into the victim task's /builds (the sandbox's tasks/<id>/builds on the host): a
    # task sees only its image and its own directories.
    release_name = f"fargate-ci-release-{uuid.uuid4().hex}"
    release = Path("/builds") / release_name
    started = threading.Event()
    victim = JobSpec(
        script=[
            "echo victim-started",
            f"for i in $(seq 1 1200); do [ -e {release} ] && break; sleep 0.1; done",
            f"for i in $(seq 1 {LINES}); do echo victim-line-$i; done",
            "echo victim-done",
        ]
    )
    config = RunnerConfig.for_driver(
        driver_command(str(victim_toml)), short_token=victim_runner, preparation_retry_delay=0.2
    )
    emulator = RunnerEmulator(config, on_output=lambda text: "victim-started" in text and started.set())
    results: list[JobResult] = []
    thread = threading.Thread(target=lambda: results.append(emulator.run(victim)))
    thread.start()
    try:
        assert started.wait(180), emulator.log_text
        victim_key = f"{victim_runner}-{victim.job_id}"
        before = _files(metadata, victim_key)
        assert sorted(before) == [f"{victim_key}.json", f"{victim_key}.key"]
        view = sandbox.api().get_job(victim_key)
        assert view["state"] == "RUNNING" and view["attempt"] == 1
        release = Path(sandbox.dir) / "tasks" / view["task_arn"].rsplit("/", 1)[1] / "builds" / release_name
        assert release.parent.is_dir(), release.parent

        intruder = JobSpec(
            script=['echo "intruder runs as job $CI_JOB_ID in $(hostname)"'],
            variables={
                k: v.format(victim=victim, runner=victim_runner) for k, v in intruder_variables.items()
            },
        )
        intruder_config = RunnerConfig.for_driver(
            driver_command(str(sandbox.toml_path)), preparation_retry_delay=0.2
        )
        result = RunnerEmulator(intruder_config).run(intruder)

        # The intruder ran in a task of its own, under its own identity, and was told why.
        assert result.status == SUCCESS, result.log
        for name in intruder_variables:
            assert f"WARNING: job variable {name}=" in result.log, result.log
        assert f"Requesting a Fargate task for job t3sT1234-{intruder.job_id}" in result.log
        assert f"intruder runs as job {victim.job_id}" in result.log  # its variable, inside its own task
        own = sandbox.api().get_job(f"t3sT1234-{intruder.job_id}")
        assert own["task_arn"] != view["task_arn"]
        # ...and never touched the victim: same files, same attempt, the same task still running.
        assert _files(metadata, victim_key) == before
        after = sandbox.api().get_job(victim_key)
        assert (after["state"], after["attempt"], after["task_arn"]) == ("RUNNING", 1, view["task_arn"])
        task = sandbox.ecs().describe_tasks(cluster=sandbox.cluster, tasks=[view["task_arn"]])["tasks"][0]
        assert task["lastStatus"] == "RUNNING"
        assert victim_key not in result.log
    finally:
        with contextlib.suppress(OSError):  # the task may be gone (or never was): nothing to release
            release.touch()
        thread.join(180)
        with contextlib.suppress(OSError):
            release.unlink(missing_ok=True)
    outcome = results[0]
    assert outcome.status == SUCCESS, outcome.log
    lines = [line for line in outcome.log.splitlines() if line.startswith("victim-line-")]
    assert lines == [f"victim-line-{i}" for i in range(1, LINES + 1)]
    assert "victim-done" in outcome.log
    wait_until(
        lambda: sandbox.api().get_job(victim_key)["state"] in ("STOPPING", "STOPPED"),
        30,
        0.2,
        "the victim's own cleanup to stop its task",
    )


def test_a_job_that_sets_ci_job_id_to_a_running_jobs_id_gets_its_own_task(sandbox):
    _victim_and_intruder(sandbox, sandbox.toml_path, "t3sT1234", {"CI_JOB_ID": "{victim.job_id}"})


def test_a_job_that_sets_another_runners_short_token_gets_its_own_task(sandbox, tmp_path):
    """Two runner services on one manager (one metadata directory, the same AWS identity): a job of the
    second names the first's runner and job id in its variables."""
    victim_toml = tmp_path / "victim-fargate.toml"
    victim_toml.write_text(
        sandbox.toml_path.read_text().replace('ShortToken = "t3sT1234"', 'ShortToken = "vIcTiM01"')
    )
    assert "vIcTiM01" in victim_toml.read_text()
    _victim_and_intruder(
        sandbox,
        victim_toml,
        "vIcTiM01",
        {"CI_RUNNER_SHORT_TOKEN": "{runner}", "CI_JOB_ID": "{victim.job_id}"},
    )


def test_prepare_never_stops_a_live_attempt_its_own_state_does_not_hold(sandbox, job_factory, tmp_path):
    """The job's key is already live with other keys (an attempt this prepare did not start): prepare says
    so and fails, and neither it nor the runner's cleanup after it stops that attempt's task."""
    from tests.e2e.test_driver import driver, runner_env

    live = job_factory(job_id=next_job_id(), runner="t3sT1234")
    live.wait_for("RUNNING")
    env = runner_env(tmp_path, int(live.job_id))
    prepared = driver(sandbox, env, "prepare")
    assert prepared.returncode == 2, prepared.stdout + prepared.stderr
    assert f"Job {live.key} already has a live attempt 1 (RUNNING) that this prepare did not start" in (
        prepared.stdout
    )
    assert "not stopping it" in prepared.stdout
    cleaned = driver(sandbox, env, "cleanup")
    assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
    view = live.get()
    assert (view["state"], view["attempt"]) == ("RUNNING", 1)
    assert live.describe()["lastStatus"] == "RUNNING"
    assert not list(Path(sandbox.state["metadata_dir"]).glob(f"{live.key}.*"))
