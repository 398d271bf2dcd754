"""`python -m sandbox run-job` and `python -m sandbox demo`, as a newcomer types them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, sandbox_processes

pytestmark = pytest.mark.e2e


def sandbox_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sandbox", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_run_job_prints_the_log_and_returns_0_on_success(sandbox, tmp_path):
    pipeline = tmp_path / ".gitlab-ci.yml"
    pipeline.write_text(
        'variables:\n  WHO: world\n\nhello:\n  script:\n    - echo "hello $WHO from $(hostname)"\n'
        "  after_script:\n    - exit 3\n"
    )
    done = sandbox_cli("run-job", str(pipeline), "--dir", str(sandbox.dir))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "hello world from ip-127-" in done.stdout
    assert "WARNING: after_script failed, but job will continue unaffected: exit status 3" in done.stdout
    assert done.stdout.rstrip().endswith("Job succeeded")


def test_run_job_returns_1_with_gitlabs_failure_line(sandbox, tmp_path):
    pipeline = tmp_path / "job.json"
    pipeline.write_text('{"fails": {"script": ["exit 7"], "timeout": "5m"}}')
    done = sandbox_cli("run-job", str(pipeline), "--dir", str(sandbox.dir))
    assert done.returncode == 1
    assert done.stdout.rstrip().endswith("ERROR: Job failed: exit status 7")


def test_run_job_explains_a_bad_file_or_a_missing_sandbox(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("job:\n  timeout: soon\n  script: [x]\n")
    done = sandbox_cli("run-job", str(bad), "--dir", str(tmp_path))
    assert done.returncode == 1
    assert done.stderr.strip() == f"run-job: {bad}: timeout 'soon' is not a duration such as 10m or 1h 30m"
    good = tmp_path / "good.yml"
    good.write_text("job:\n  script: [x]\n")
    done = sandbox_cli("run-job", str(good), "--dir", str(tmp_path / "nothing-here"))
    assert done.returncode == 1
    assert "no sandbox running" in done.stderr and "Traceback" not in done.stderr


def test_the_demo_starts_a_sandbox_runs_the_job_and_stops_it(tmp_path):
    directory = tmp_path / "demo"
    done = sandbox_cli("demo", "--dir", str(directory))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "Hello from a Fargate task" in out
    assert "task address (as sshd sees it) 127." in out
    assert "after_script sees CI_JOB_STATUS=success" in out
    assert "Job succeeded" in out
    # The second demo job: `image: busybox` with a busybox httpd service, by alias and on localhost.
    assert "BusyBox v1." in out and "no bash here" in out
    assert out.count("hello from the web service") == 2
    assert out.rstrip().endswith("sandbox stopped")
    assert sandbox_processes(directory) == []
