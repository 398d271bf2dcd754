"""Issue 17: `fargate-driver --config F status` through the sandbox: the caller's jobs while one runs and
after it stopped, never another caller's, and one clear line when the API is unreachable or refuses the
credentials. The real driver process, the sandbox's signed API and moto."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest

from sandbox.run_job import driver_command

pytestmark = pytest.mark.e2e


def _status(toml: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*driver_command(str(toml)), "status", *flags],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"},  # no AWS_* of the test run's own
    )


def _toml_as(sandbox, tmp_path: Path, name: str, old: str, new: str) -> Path:
    text = sandbox.toml_path.read_text()
    assert old in text
    path = tmp_path / f"{name}.toml"
    path.write_text(text.replace(old, new))
    return path


def test_status_shows_the_callers_running_job_then_only_with_all_when_stopped(sandbox, job_factory, tmp_path):
    job = job_factory()
    running = job.wait_for("RUNNING")
    short_task = running["task_arn"].rsplit("/", 1)[-1][:12]
    other = _toml_as(sandbox, tmp_path, "other", 'Profile = "sandbox"', 'Profile = "sandbox-other"')

    table = _status(sandbox.toml_path)
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split()[:4] == ["JOB", "KEY", "PROJECT", "STATE"]
    mine = [line for line in rows if line.startswith(job.key + " ")]
    assert len(mine) == 1, table.stdout
    assert "RUNNING" in mine[0].split() and short_task in mine[0].split()
    assert running["address"] in mine[0].split()

    listed = json.loads(_status(sandbox.toml_path, "--json").stdout)
    entry = next(j for j in listed if j["job_key"] == job.key)
    assert entry["state"] == "RUNNING" and entry["task_arn"] == running["task_arn"]
    assert entry["job_id"] == job.job_id and entry["created_at"] == running["created_at"]
    assert all(j["state"] in ("PROVISIONING", "PENDING", "RUNNING", "STOPPING") for j in listed)

    # Another runner manager (its own IAM identity) never sees this job, live or not.
    stranger = _status(other, "--all", "--json")
    assert stranger.returncode == 0, stranger.stderr
    assert job.key not in stranger.stdout and running["task_arn"] not in stranger.stdout

    job.stop("status test done")
    job.wait_for("STOPPED")
    assert job.key not in _status(sandbox.toml_path).stdout
    finished = json.loads(_status(sandbox.toml_path, "--all", "--json").stdout)
    assert next(j for j in finished if j["job_key"] == job.key)["state"] == "STOPPED"
    table = _status(sandbox.toml_path, "--all", "--since", "1h").stdout
    assert any(line.startswith(job.key + " ") and "STOPPED" in line.split() for line in table.splitlines())


def test_status_says_in_one_line_when_the_api_is_unreachable_or_refuses(sandbox, tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = sandbox.state["api_url"]
    dead = _toml_as(sandbox, tmp_path, "dead", f'URL = "{url}"', f'URL = "http://127.0.0.1:{port}/api"')
    unreachable = _status(dead)
    assert unreachable.returncode == 2  # SYSTEM_FAILURE_EXIT_CODE's default outside a runner
    assert unreachable.stdout == ""
    assert unreachable.stderr.count("\n") == 1 and "Traceback" not in unreachable.stderr
    assert unreachable.stderr.startswith(
        "ERROR: Unreachable: cannot reach the orchestrator at http://127.0.0.1"
    )

    credentials = Path(sandbox.credentials_file).read_text()
    forged = tmp_path / "credentials"
    forged.write_text(credentials.replace("aws_secret_access_key = ", "aws_secret_access_key = x", 1))
    refused_toml = _toml_as(
        sandbox,
        tmp_path,
        "refused",
        f'SharedCredentialsFile = "{sandbox.credentials_file}"',
        f'SharedCredentialsFile = "{forged}"',
    )
    refused = _status(refused_toml)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.startswith("ERROR: HTTP 403 Forbidden: the orchestrator at ")
    assert "refused the credentials of profile 'sandbox'" in refused.stderr
