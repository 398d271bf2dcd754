"""Images in the sandbox: a task sees only its image, the sandbox runs unprivileged, per-job images."""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.e2e


def test_a_task_sees_its_image_and_none_of_the_hosts_files(job_factory, tmp_path):
    secret = Path("/var/tmp") / f"fargate-ci-test-{secrets.token_hex(4)}"
    secret.write_text("host secret\n")
    secret.chmod(0o600)  # the sandbox's own user (root here) could read it: only the view keeps it out
    checkout_file = REPO_ROOT / "pyproject.toml"
    try:
        job = job_factory()
        job.wait_for("RUNNING")
        status, out, _ = job.run(
            f"cat {secret} 2>&1; echo; ls /; "
            f"test -e {checkout_file} && echo CHECKOUT-VISIBLE; "
            "test -e /etc/ssh/ssh_host_ed25519_key && echo HOST-KEY-VISIBLE; "
            "grep -c '\\$' /etc/shadow; id -u; command -v sshd git bash"
        )
    finally:
        secret.unlink()
    assert status == 0, out
    assert "host secret" not in out and "No such file or directory" in out
    listing = set(out.split())
    assert {"usr", "etc", "builds", "tmp"} <= listing
    assert not {"work", "home", "srv", "opt", "var"} & listing
    assert "CHECKOUT-VISIBLE" not in out and "HOST-KEY-VISIBLE" not in out
    assert "\n0\n" in out  # no password hash of the host's in the task's /etc/shadow
    assert "/usr/sbin/sshd" in out and "/usr/bin/git" in out  # what the entrypoint and jobs need is there


@pytest.fixture
def nobody_home():
    """A directory of nobody's own (pytest's tmp_path is under a directory only root may enter)."""
    home = Path(tempfile.mkdtemp(prefix="fargate-ci-nobody-"))
    nobody = pwd.getpwnam("nobody")
    os.chown(home, nobody.pw_uid, nobody.pw_gid)
    yield home
    shutil.rmtree(home, ignore_errors=True)


def _nobody_reads_checkout() -> bool:
    """The sandbox runs from this checkout: an ordinary user must be able to read it (a clone inside a 0700
    directory, e.g. one made by mktemp -d, is not)."""
    if os.geteuid() != 0 or not shutil.which("runuser"):
        return False
    probe = ["runuser", "-u", "nobody", "--", "test", "-r", str(REPO_ROOT / "sandbox" / "__init__.py")]
    return subprocess.run(probe, capture_output=True).returncode == 0


def _system_python_matches() -> bool:
    """The test runs the sandbox as `nobody` with the system python and this venv's packages: only when
    that python is the venv's version (the venv's own interpreter may live under root's home)."""
    python = Path("/usr/bin/python3")
    if not python.exists():
        return False
    version = subprocess.run(
        [python, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True
    ).stdout.strip()
    return version == str(tuple(sys.version_info[:2]))


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("runuser"), reason="needs root to become nobody")
@pytest.mark.skipif(not _system_python_matches(), reason="no system python of the venv's version")
@pytest.mark.skipif(
    not _nobody_reads_checkout(), reason="this checkout sits in a directory an ordinary user cannot enter"
)
def test_the_sandbox_runs_as_an_ordinary_user_and_its_tasks_still_see_only_their_image(nobody_home):
    nobody = pwd.getpwnam("nobody")
    home = nobody_home
    secret = home / "secret"
    secret.write_text("nobody's secret\n")
    os.chown(secret, nobody.pw_uid, nobody.pw_gid)
    secret.chmod(0o600)  # readable by the sandbox's user, so only the task's view keeps it out
    job_file = home / "job.yml"
    job_file.write_text(
        'probe:\n  script:\n    - echo "uid=$(id -u) user=$(id -un)"\n'
        f"    - cat {secret} || echo SECRET-HIDDEN\n"
        "    - test -e /work || echo NO-WORK\n"
    )
    site = next(Path(REPO_ROOT / ".venv" / "lib").glob("python3.*/site-packages"))
    env = {
        "HOME": str(home),
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "PYTHONPATH": f"{REPO_ROOT}:{site}",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    directory = home / "sandbox"

    def as_nobody(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["runuser", "-u", "nobody", "--", "env", "-i", *(f"{k}={v}" for k, v in env.items()),
             "/usr/bin/python3", "-m", "sandbox", *args],
            cwd=home, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    started = as_nobody("start", "--dir", str(directory), "--ssh-port", "2391")
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        done = as_nobody("run-job", str(job_file), "--dir", str(directory))
        owners = {p.stat().st_uid for p in (directory / "logs" / "tasks").iterdir()}
    finally:
        stopped = as_nobody("stop", "--dir", str(directory))
    assert stopped.returncode == 0, stopped.stderr
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # Root in the task's user namespace, which maps nobody: the task can do no more than nobody can.
    assert "\nuid=0 user=root\n" in done.stdout, done.stdout[-3000:]
    assert "SECRET-HIDDEN" in done.stdout and "nobody's secret" not in done.stdout
    assert "NO-WORK" in done.stdout
    assert owners == {nobody.pw_uid}


# --- per-job images and services, through the runner emulator and the real driver --------------------


def run_job(sandbox, tmp_path: Path, job: dict, name: str = "job") -> subprocess.CompletedProcess:
    pipeline = tmp_path / f"{name}.json"
    pipeline.write_text(json.dumps({name: job}))
    return subprocess.run(
        [sys.executable, "-m", "sandbox", "run-job", str(pipeline), "--dir", str(sandbox.dir),
         "--prepare-retry-delay", "0.1"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def running_tasks(sandbox) -> list[str]:
    return sandbox.ecs().list_tasks(cluster=sandbox.cluster, desiredStatus="RUNNING")["taskArns"]


def test_a_job_with_image_busybox_runs_its_script_inside_busybox(sandbox, tmp_path):
    done = run_job(
        sandbox,
        tmp_path,
        {
            # `entrypoint: [""]`, as GitLab advises for images whose entrypoint is not a shell
            "image": {"name": "busybox:1.36", "entrypoint": [""]},
            "script": [
                "busybox | sed -n 1p",  # not head -1: under pipefail, busybox may die of SIGPIPE
                "for tool in bash git python3 sshd; do command -v $tool || echo no-$tool; done",
                "ls /",
                "exit 42",
            ],
        },
    )
    out = done.stdout
    assert "BusyBox v1." in out and "multi-call binary" in out
    for tool in ("bash", "git", "python3", "sshd"):
        assert f"no-{tool}" in out
    assert "ERROR: Job failed: exit status 42" in out, out[-3000:] + done.stderr[-2000:]
    assert done.returncode == 1


def test_a_service_is_reached_by_alias_by_its_default_alias_and_on_localhost(sandbox, tmp_path):
    port = 18000 + secrets.randbelow(2000)  # the sandbox's tasks share the host's network
    page = f"hello-from-the-service-{secrets.token_hex(3)}"
    # The page shows what GitLab gives a service: the job's public variables (expanded), never its token.
    serve = (
        f'mkdir -p /www && echo "{page} greeting=$GREETING token=$CI_JOB_TOKEN" > /www/index.html && '
        f"exec httpd -f -p 127.0.0.1:{port} -h /www"
    )
    done = run_job(
        sandbox,
        tmp_path,
        {
            "image": "busybox",
            "variables": {"GREETING": "hi-from-${CI_PROJECT_NAME}"},
            "services": [
                {
                    "name": "busybox:latest",
                    "alias": "web",
                    "entrypoint": ["sh", "-c"],
                    "command": [serve],
                    "variables": {"HEALTHCHECK_TCP_PORT": str(port)},
                }
            ],
            "script": [f"wget -qO- http://{host}:{port}/" for host in ("web", "busybox", "localhost")],
        },
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "Waiting for services to be up and running" in done.stdout
    for host in ("web", "busybox", "localhost"):
        assert f"$ wget -qO- http://{host}:{port}/\n{page} greeting=hi-from-" in done.stdout
    served = done.stdout.split(f"$ wget -qO- http://web:{port}/\n", 1)[1].split("\n", 1)[0]
    # expanded against the job's public CI_PROJECT_NAME; the token (masked, not public) never reaches it
    assert re.fullmatch(rf"{page} greeting=hi-from-[\w.-]+ token=", served), served


def test_an_image_outside_the_allowlist_fails_in_prepare_and_starts_nothing(sandbox, tmp_path):
    before = set(running_tasks(sandbox))
    done = run_job(sandbox, tmp_path, {"image": "alpine:3.20", "script": ["true"]})
    assert done.returncode == 1
    out = done.stdout
    assert "image 'alpine:3.20' is not allowed here" in out, out[-3000:]
    assert "FARGATE_ALLOWED_IMAGES" in out and "busybox" in out  # the message names the patterns
    assert "Task requested" not in out and "Traceback" not in out + done.stderr
    assert set(running_tasks(sandbox)) <= before


def test_an_image_that_does_not_exist_fails_in_prepare_with_awss_reason_and_leaves_no_task(sandbox, tmp_path):
    before = set(running_tasks(sandbox))
    done = run_job(sandbox, tmp_path, {"image": "nosuchimage:1", "script": ["true"]})
    assert done.returncode == 1
    out = done.stdout
    assert "CannotPullContainerError" in out and "nosuchimage:1" in out, out[-3000:]
    assert "TaskFailedToStart" in out and "Traceback" not in out + done.stderr
    assert set(running_tasks(sandbox)) <= before


def test_two_concurrent_jobs_with_one_new_image_register_one_task_definition(sandbox, job_factory):
    image = f"busybox:t{secrets.token_hex(4)}"  # a tag no earlier test used: a new task definition
    with ThreadPoolExecutor(2) as pool:
        jobs = list(pool.map(lambda _: job_factory(image={"name": image}), range(2)))
    for job in jobs:
        job.wait_for("RUNNING")
    arns = {job.describe()["taskDefinitionArn"] for job in jobs}
    assert len(arns) == 1
    family = arns.pop().split("/")[-1].split(":")[0]
    assert family.startswith("ci-coordinator-job-")
    revisions = sandbox.ecs().list_task_definitions(familyPrefix=family)["taskDefinitionArns"]
    assert len(revisions) == 1, revisions
    definition = sandbox.ecs().describe_task_definition(taskDefinition=revisions[0])["taskDefinition"]
    assert definition["pidMode"] == "task"
    containers = {c["name"]: c for c in definition["containerDefinitions"]}
    assert containers["job"]["image"] == f"docker.io/library/{image}"
    status, out, _ = jobs[0].run("busybox | sed -n 1p")
    assert status == 0 and out.startswith("BusyBox")


def test_a_job_images_entrypoint_sets_up_the_environment_and_directory_its_sessions_run_in(
    sandbox, job_factory
):
    # As GitLab's Docker executor runs it: the image's entrypoint, given the job container's command, which
    # it ends with `exec "$@"`; what it exported and where it went are the job's.
    setup = 'export FROM_ENTRYPOINT=set-up; mkdir -p /srv/ep && cd /srv/ep && exec "$@"'
    job = job_factory(image={"name": "busybox", "entrypoint": ["/bin/sh", "-c", setup, "entrypoint"]})
    job.wait_for("RUNNING")
    status, out, err = job.run(
        'pwd; echo "from=$FROM_ENTRYPOINT"; id -u; echo written > /builds/by-the-job && echo builds-ok'
    )
    assert status == 0, out + err
    assert out.splitlines() == ["/srv/ep", "from=set-up", "0", "builds-ok"]
    # /builds is the task's volume (taskdefs.JOB_DIRS), not a directory of the image's root
    task_id = job.view["task_arn"].rsplit("/", 1)[1]
    volume = sandbox.dir / "tasks" / task_id / "volumes" / "fargate-ci-builds"
    assert (volume / "by-the-job").read_text() == "written\n"


def test_the_job_container_starts_in_its_images_working_directory(sandbox, job_factory):
    # Services beside no image: the job container is the task image (WORKDIR /root), its entrypoint replaced.
    job = job_factory(services=[{"name": "busybox", "entrypoint": ["sleep"], "command": ["600"]}])
    job.wait_for("RUNNING")
    status, out, err = job.run("pwd; test -e /usr/bin/git && echo task-image")
    assert status == 0, out + err
    assert out.splitlines() == ["/root", "task-image"]
