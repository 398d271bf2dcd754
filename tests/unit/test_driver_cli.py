"""The command line and the edge that maps outcomes to the runner's exit codes."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fargate_ci_driver import cli
from fargate_ci_driver.errors import (
    ApiError,
    BuildFailed,
    Cancelled,
    ConfigError,
    HostKeyMismatch,
    JobInputError,
    SshError,
    StateError,
    TaskError,
)
from fargate_ci_driver.exit_status import ExitCodes
from fargate_ci_driver.keys import generate_ed25519
from fargate_ci_driver.metadata import JobState, MetadataDir
from runner_emulator.job import JobSpec
from runner_emulator.payload import job_payload, write_job_payload
from tests.unit.test_attempts import certify
from tests.unit.test_driver_api import orchestrator  # noqa: F401 (a fixture)

BUILD, SYSTEM = 11, 12  # not the runner's 1/2: proves the codes come from the environment


def write_toml(directory: Path, extra: str = "") -> Path:
    path = directory / "fargate.toml"
    path.write_text(
        f"""
LogLevel = "info"
[Fargate]
Region = "eu-west-1"
Subnet = "subnet-1"
[TaskMetadata]
Directory = "{directory / "meta"}"
[Orchestrator]
URL = "http://127.0.0.1:9/api"
Timeout = 1
[Runner]
ShortToken = "t3sT1234"
[Job]
BuildsDir = "/builds"
CacheDir = "/cache"
PrepareTimeout = 1
{extra}
"""
    )
    return path


def runner_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The runner's environment for job 5005 (project 42, pipeline 77), with its job payload in its own
    directory, as the Custom executor passes them."""
    job_dir = tmp_path / "custom-executor-5005"
    if not job_dir.exists():
        job_dir.mkdir(mode=0o700)
        job = JobSpec(script=["true"], job_id=5005, project_id=42, pipeline_id=77, token="glcbt-secret-token")
        write_job_payload(str(job_dir), job_payload(job, "https://gitlab.example.com", []))
    env = {
        "TMPDIR": str(job_dir),
        "JOB_RESPONSE_FILE": str(job_dir / "response.json"),
        "BUILD_FAILURE_EXIT_CODE": str(BUILD),
        "SYSTEM_FAILURE_EXIT_CODE": str(SYSTEM),
        "BUILD_EXIT_CODE_FILE": str(tmp_path / "build_exit_code"),
        "CUSTOM_ENV_CI_RUNNER_SHORT_TOKEN": "t3sT1234",
        "CUSTOM_ENV_CI_JOB_ID": "5005",
        "CUSTOM_ENV_CI_PROJECT_ID": "42",
        "CUSTOM_ENV_CI_PIPELINE_ID": "77",
        "CUSTOM_ENV_CI_JOB_TOKEN": "glcbt-secret-token",
    }
    env.update(extra)
    return env


def drive(argv: list[str], env: dict[str, str], *, colours: bool = False) -> tuple[int, str, str]:
    """(exit code, stdout, stderr); stderr without GitLab Runner's colours unless `colours`."""
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(argv, environ=env, stdout=out, stderr=err)
    text = err.getvalue()
    return code, out.getvalue(), text if colours else re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_an_error_in_a_job_log_is_bold_red_as_gitlab_runners_own(tmp_path):
    env = runner_env(tmp_path)
    _, _, err = drive(["custom"], env, colours=True)
    assert err.startswith("\x1b[31;1mERROR: command line:") and err.endswith("\x1b[0;m\n")
    del env["SYSTEM_FAILURE_EXIT_CODE"]  # not run by the runner (e.g. `status` by hand): plain text
    _, _, err = drive(["custom"], env, colours=True)
    assert err.startswith("ERROR: command line:")


# --- argv ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["custom", "config"], "config"),
        (["c", "co"], "config"),
        (["custom", "prepare"], "prepare"),
        (["c", "p"], "prepare"),
        (["custom", "run", "/tmp/s/script", "build_script"], "run"),
        (["c", "r", "/tmp/s/script", "step_release"], "run"),
        (["custom", "cleanup"], "cleanup"),
        (["c", "cl"], "cleanup"),
    ],
)
def test_the_go_drivers_commands_and_aliases(argv, command):
    assert cli.parse_args(["--config", "/etc/f.toml", *argv]).command == command


def test_go_style_single_dash_flags_work_too():
    args = cli.parse_args(["-config", "/etc/f.toml", "-debug", "-log-level=error", "custom", "cleanup"])
    assert (args.config, args.debug, args.log_level, args.command) == (
        "/etc/f.toml",
        True,
        "error",
        "cleanup",
    )


def test_the_go_drivers_global_flags():
    args = cli.parse_args(
        [
            "--debug",
            "--log-level",
            "WARN",
            "--log-format=json",
            "--log-file",
            "/var/log/f.log",
            "--config",
            "/etc/f.toml",
            "--task-def",
            "ci:2",
            "--platform-version",
            "1.4.0",
            "custom",
            "run",
            "script",
            "get_sources",
        ]
    )
    assert (args.debug, args.log_level, args.log_format, args.log_file) == (
        True,
        "warn",
        "json",
        "/var/log/f.log",
    )
    assert (args.config, args.task_def, args.platform_version) == ("/etc/f.toml", "ci:2", "1.4.0")
    assert (args.script, args.stage) == ("script", "get_sources")


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["custom"],
        ["custom", "destroy"],
        ["custom", "run", "only-a-script"],
        ["--log-level", "loud", "c", "co"],
    ],
)
def test_bad_usage_is_a_system_failure_with_one_line(tmp_path, argv):
    code, out, err = drive(argv, runner_env(tmp_path))
    assert code == SYSTEM
    assert out == ""
    assert err.startswith("ERROR: command line:")
    assert err.count("\n") == 1 and "Traceback" not in err


# --- config -------------------------------------------------------------------------------------------


def test_config_prints_one_json_value_and_nothing_else(tmp_path):
    toml = write_toml(tmp_path)
    code, out, err = drive(["--config", str(toml), "custom", "config"], runner_env(tmp_path))
    assert code == 0
    config = json.loads(out)  # the whole of stdout is one JSON value
    assert config["driver"]["name"] == "fargate-ci" and config["driver"]["version"]
    assert config["builds_dir"] == "/builds" and config["cache_dir"] == "/cache"
    assert config["builds_dir_is_shared"] is False
    assert config["hostname"]
    assert err == ""


def test_config_leaves_out_dirs_that_are_not_configured(tmp_path):
    toml = write_toml(tmp_path)
    toml.write_text(toml.read_text().replace('BuildsDir = "/builds"\nCacheDir = "/cache"\n', ""))
    code, out, _ = drive(["--config", str(toml), "c", "co"], runner_env(tmp_path))
    assert code == 0
    assert "builds_dir" not in json.loads(out) and "cache_dir" not in json.loads(out)


def test_a_config_error_is_a_system_failure_naming_the_key(tmp_path):
    toml = write_toml(tmp_path, extra="[SSH]\nPort = 0\n")
    code, out, err = drive(["--config", str(toml), "custom", "config"], runner_env(tmp_path))
    assert (code, out) == (SYSTEM, "")
    assert err == f"ERROR: {toml}: [SSH] Port: 0 is not between 1 and 65535\n"


def test_config_and_run_do_not_import_boto3_or_paramiko(tmp_path):
    """The runner calls config for every job and run for every stage: they must stay light."""
    toml = write_toml(tmp_path)
    probe = f"""
import io, sys
from fargate_ci_driver import cli
import fargate_ci_driver.run, fargate_ci_driver.ssh, fargate_ci_driver.context, fargate_ci_driver.api
code = cli.main(["--config", {str(toml)!r}, "custom", "config"], environ={{}}, stdout=io.StringIO())
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("boto3", "botocore", "paramiko", "cryptography"))
print(code, heavy)
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "0 []", result.stdout + result.stderr


# --- the stages' failure edges, without any network ---------------------------------------------------


def test_cleanup_with_nothing_to_clean_exits_0_with_a_note(tmp_path):
    toml = write_toml(tmp_path)
    code, out, err = drive(["--config", str(toml), "custom", "cleanup"], runner_env(tmp_path))
    assert code == 0
    assert "Nothing to clean up: prepare recorded no job here" in out
    assert "ERROR" not in err
    # With the job recorded but its state gone, the same.
    env = runner_env(tmp_path)
    (Path(env["TMPDIR"]) / "fargate-driver-job").write_text("t3sT1234-5005\n")
    code, out, err = drive(["--config", str(toml), "custom", "cleanup"], env)
    assert code == 0
    assert "Nothing to clean up for job t3sT1234-5005" in out


def test_run_without_prepared_state_is_a_system_failure(tmp_path):
    toml = write_toml(tmp_path)
    script = tmp_path / "script"
    script.write_text("echo hi\n")
    env = runner_env(tmp_path)
    code, _, err = drive(["--config", str(toml), "c", "r", str(script), "build_script"], env)
    assert code == SYSTEM
    assert "prepare recorded no job in" in err and "fargate-driver-job" in err
    (Path(env["TMPDIR"]) / "fargate-driver-job").write_text("t3sT1234-5005\n")
    code, _, err = drive(["--config", str(toml), "c", "r", str(script), "build_script"], env)
    assert code == SYSTEM
    assert "job t3sT1234-5005 has no running task on record" in err


def test_a_bad_per_job_variable_is_a_build_failure_before_anything_is_created(tmp_path):
    toml = write_toml(tmp_path)
    env = runner_env(tmp_path, CUSTOM_ENV_FARGATE_CPU="3")
    code, _, err = drive(["--config", str(toml), "custom", "prepare"], env)
    assert code == BUILD  # the job's fault: the runner must not retry it as a system failure
    assert "job variable FARGATE_CPU='3' is not a Fargate CPU size" in err
    assert not (tmp_path / "meta").exists()
    assert "[Fargate] Subnet is set on the orchestrator now (FARGATE_SUBNETS); ignored here" in err


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("FARGATE_MEMORY", "lots", "FARGATE_MEMORY='lots'"),
        ("FARGATE_TASK_DEFINITION", "no spaces allowed", "FARGATE_TASK_DEFINITION"),
        ("FARGATE_PLATFORM_VERSION", "v2", "FARGATE_PLATFORM_VERSION='v2'"),
    ],
)
def test_each_per_job_variable_is_validated(tmp_path, variable, value, named):
    toml = write_toml(tmp_path)
    code, _, err = drive(
        ["--config", str(toml), "c", "p"], runner_env(tmp_path, **{f"CUSTOM_ENV_{variable}": value})
    )
    assert code == BUILD
    assert named in err


def test_a_missing_or_malformed_job_payload_is_a_system_failure(tmp_path):
    toml = write_toml(tmp_path)
    env = runner_env(tmp_path)
    del env["JOB_RESPONSE_FILE"]
    code, _, err = drive(["--config", str(toml), "c", "p"], env)
    assert code == SYSTEM
    assert "ERROR: JOB_RESPONSE_FILE is not set" in err
    env = runner_env(tmp_path)
    Path(env["JOB_RESPONSE_FILE"]).write_text('{"id": "5005", "job_info": {}}')
    code, _, err = drive(["--config", str(toml), "c", "p"], env)
    assert code == SYSTEM
    assert "JOB_RESPONSE_FILE: id is not a GitLab id (a positive JSON integer), got str" in err
    assert "Traceback" not in err
    assert not (tmp_path / "meta").exists()


def test_job_variables_that_fake_another_identity_are_named_and_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-real-secret")
    toml = write_toml(tmp_path)
    env = runner_env(
        tmp_path,
        CUSTOM_ENV_CI_JOB_ID="4004",
        CUSTOM_ENV_CI_RUNNER_SHORT_TOKEN="victim01",
        FARGATE_DRIVER_AGENT="off",
    )
    _, out, _ = drive(["--config", str(toml), "c", "p"], env)
    assert "WARNING: job variable CI_JOB_ID='4004' disagrees with the job payload's id (5005)" in out
    assert "WARNING: job variable CI_RUNNER_SHORT_TOKEN='victim01' disagrees with [Runner] ShortToken" in out
    assert "Requesting a Fargate task for job t3sT1234-5005" in out
    assert sorted(p.name for p in (tmp_path / "meta").iterdir()) == [
        "t3sT1234-5005.json",
        "t3sT1234-5005.key",
    ]


def test_prepare_never_overwrites_another_jobs_state(tmp_path):
    toml = write_toml(tmp_path)
    meta = tmp_path / "meta"
    meta.mkdir(mode=0o700)
    theirs = {
        "job_key": "t3sT1234-5005",
        "ssh_port": 22,
        "ssh_user": "root",
        "host_public_key": "x",
        "attempt": 3,
    }
    (meta / "t3sT1234-5005.json").write_text(json.dumps(theirs))
    env = runner_env(tmp_path, FARGATE_DRIVER_AGENT="off")
    code, _, err = drive(["--config", str(toml), "c", "p"], env)
    assert code == SYSTEM
    assert "t3sT1234-5005.json already exists: another prepare holds this job key" in err
    assert json.loads((meta / "t3sT1234-5005.json").read_text()) == theirs
    assert not (meta / "t3sT1234-5005.key").exists()
    assert not (Path(env["TMPDIR"]) / "fargate-driver-job").exists()
    # The runner's cleanup after the failed prepare: this job recorded nothing, so it touches nothing.
    code, out, _ = drive(["--config", str(toml), "c", "cl"], env)
    assert code == 0 and "Nothing to clean up" in out
    assert json.loads((meta / "t3sT1234-5005.json").read_text()) == theirs


def test_prepare_against_an_unreachable_api_fails_cleanly_and_keeps_state_for_cleanup(tmp_path, monkeypatch):
    # botocore reads credentials from the process environment, not from the runner's CUSTOM_ENV_.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-real-secret")
    toml = write_toml(tmp_path)
    code, out, err = drive(["--config", str(toml), "c", "p"], runner_env(tmp_path))
    assert code == SYSTEM
    assert "cannot reach the orchestrator" in err and "Traceback" not in err
    # The request may have reached the API: the state stays until cleanup.
    meta = tmp_path / "meta"
    assert (meta / "t3sT1234-5005.json").exists()
    assert oct((meta / "t3sT1234-5005.key").stat().st_mode & 0o777) == "0o600"
    assert oct(meta.stat().st_mode & 0o777) == "0o700"
    for text in (out, err):
        assert "PRIVATE KEY" not in text and "glcbt-secret-token" not in text
    code, out, _ = drive(["--config", str(toml), "c", "cl"], runner_env(tmp_path))
    # No answer to the POST, so no attempt on record: nothing this cleanup may name to stop...
    assert code == 0
    assert "no task attempt on record" in out and "reaper" in out
    # ...and no key is left behind (the session agent's own files aside: it exits without jobs).
    assert [p.name for p in meta.iterdir() if not p.name.startswith("agent")] == []


# --- exit-code mapping --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (BuildFailed(42), BUILD),
        (JobInputError("bad FARGATE_CPU"), BUILD),
        (ConfigError("bad key"), SYSTEM),
        (StateError("no state"), SYSTEM),
        (ApiError(503, "Throttled", "slow down"), SYSTEM),
        (TaskError("CannotPullContainerError"), SYSTEM),
        (SshError("connection lost"), SYSTEM),
        (HostKeyMismatch("wrong key"), SYSTEM),
        (Cancelled("SIGTERM"), SYSTEM),
        (RuntimeError("a bug"), SYSTEM),
    ],
)
def test_every_error_maps_to_one_of_the_runners_codes(error, expected):
    codes = ExitCodes.from_environ(
        {"BUILD_FAILURE_EXIT_CODE": str(BUILD), "SYSTEM_FAILURE_EXIT_CODE": str(SYSTEM)}
    )
    assert codes.for_error(error) == expected


def test_a_build_failure_records_the_scripts_own_status(tmp_path):
    path = tmp_path / "build_exit_code"
    codes = ExitCodes.from_environ({"BUILD_EXIT_CODE_FILE": str(path)})
    codes.record_build_exit_code(BuildFailed(42))
    assert path.read_text() == "42\n"


def test_missing_or_bad_codes_fall_back_to_the_runners_and_say_so():
    codes = ExitCodes.from_environ({"SYSTEM_FAILURE_EXIT_CODE": "banana"})
    assert (codes.build_failure, codes.system_failure) == (1, 2)
    assert "BUILD_FAILURE_EXIT_CODE is not set" in codes.problem
    assert "SYSTEM_FAILURE_EXIT_CODE is 'banana'" in codes.problem


def test_an_unexpected_error_is_a_system_failure_with_a_trace_only_under_debug(tmp_path, monkeypatch):
    toml = write_toml(tmp_path)

    def broken(_settings):
        raise RuntimeError("boom")

    monkeypatch.setattr("fargate_ci_driver.runner_config.render", broken)
    code, _, err = drive(["--config", str(toml), "c", "co"], runner_env(tmp_path))
    assert code == SYSTEM
    assert err.startswith("ERROR: internal error in fargate-driver: RuntimeError: boom (run with --debug")
    assert err.count("\n") == 1
    code, _, err = drive(["--debug", "--config", str(toml), "c", "co"], runner_env(tmp_path))
    assert code == SYSTEM and "Traceback" in err and "boom" in err


def test_python_dash_m_and_the_console_script_are_the_same_program(tmp_path):
    toml = write_toml(tmp_path)
    env = {"PATH": "/usr/bin:/bin"}
    by_module = subprocess.run(
        [sys.executable, "-m", "fargate_ci_driver", "--config", str(toml), "c", "co"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    script = Path(sys.executable).parent / "fargate-driver"
    by_script = subprocess.run(
        [str(script), "--config", str(toml), "c", "co"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert by_module.returncode == by_script.returncode == 0, by_module.stderr + by_script.stderr
    assert json.loads(by_module.stdout)["driver"] == json.loads(by_script.stdout)["driver"]


def prepared_job(
    tmp_path: Path, url: str, state: JobState, private_pem: str = "KEY"
) -> tuple[Path, dict[str, str], Path]:
    """What a prepare against the orchestrator at `url` left for the later stages: its state and key files
    and the runner's job marker. Returns the fargate.toml, the runner's environment and the metadata dir."""
    toml = write_toml(tmp_path)
    toml.write_text(toml.read_text().replace("http://127.0.0.1:9/api", url))
    env = runner_env(tmp_path, FARGATE_DRIVER_AGENT="off")
    meta = tmp_path / "meta"
    meta.mkdir(mode=0o700)
    MetadataDir(str(meta)).claim(state, private_pem)
    (Path(env["TMPDIR"]) / "fargate-driver-job").write_text(f"{state.job_key}\n")
    return toml, env, meta


@pytest.mark.parametrize(
    ("status", "code", "said"),
    [
        (409, "AttemptMismatch", "Attempt 2 of job t3sT1234-5005 is already over and a newer one exists"),
        (404, "JobNotFound", "Job t3sT1234-5005 is unknown to the orchestrator: nothing to stop"),
        (200, None, "Stopped task arn:aws:ecs:task/1 of job t3sT1234-5005: STOPPING"),
    ],
)
def test_cleanup_names_its_attempt_and_leaves_a_newer_one_alone(tmp_path, orchestrator, status, code, said):  # noqa: F811
    url, handler = orchestrator
    toml, env, meta = prepared_job(
        tmp_path, url, JobState("t3sT1234-5005", 22, "root", "ssh-ed25519 X", attempt=2)
    )
    answer = (
        {"error": code, "message": "no"} if code else {"state": "STOPPING", "task_arn": "arn:aws:ecs:task/1"}
    )
    handler.script.append((status, answer, {}))
    code_, out, err = drive(["--config", str(toml), "c", "cl"], env)
    assert code_ == 0, err
    assert said in out
    assert [(c["method"], c["path"], json.loads(c["body"])["attempt"]) for c in handler.seen] == [
        ("DELETE", "/api/jobs/t3sT1234-5005", 2)
    ]
    assert list(meta.iterdir()) == []  # the job's own files go whatever the answer


@pytest.mark.parametrize(("certified", "stopped"), [("ours", True), ("theirs", False), ("none", False)])
def test_cleanup_after_a_prepare_without_answer_stops_the_attempt_started_with_its_key(
    tmp_path,
    orchestrator,  # noqa: F811
    certified,
    stopped,
):
    """prepare's POST reached the orchestrator but its answer never came: the job's view names an attempt,
    and its certificate shows whether this prepare's key started it."""
    url, handler = orchestrator
    ours, theirs = generate_ed25519("ours"), generate_ed25519("theirs")
    toml, env, meta = prepared_job(tmp_path, url, JobState("t3sT1234-5005", 22, "root", ""), ours.private_pem)
    view = {"job_key": "t3sT1234-5005", "attempt": 4, "state": "RUNNING", "task_arn": "arn:aws:ecs:task/4"}
    if certified != "none":
        view["ssh_certificate"] = certify(tmp_path, (ours if certified == "ours" else theirs).public_line)
    handler.script += [(200, view, {}), (200, {**view, "state": "STOPPING"}, {})]

    code, out, err = drive(["--config", str(toml), "c", "cl"], env)

    assert code == 0, err
    calls = [(c["method"], c["path"]) for c in handler.seen]
    if stopped:
        assert calls == [("GET", "/api/jobs/t3sT1234-5005"), ("DELETE", "/api/jobs/t3sT1234-5005")]
        assert json.loads(handler.seen[1]["body"])["attempt"] == 4
        assert "it started attempt 4 of job t3sT1234-5005 with this job's key: stopping it" in out
        assert "Stopped task arn:aws:ecs:task/4 of job t3sT1234-5005: STOPPING" in out
    else:
        assert calls == [("GET", "/api/jobs/t3sT1234-5005")]
        assert "none started with this job's key: nothing to stop" in out
    assert "PRIVATE KEY" not in out + err
    assert list(meta.iterdir()) == []
