"""Services are waited for on their image's first exposed port, read from the sandbox's registry at
registration (issue 16: GitLab's wait-for-service), through the runner emulator and the real driver."""

from __future__ import annotations

import json
import re
import secrets
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from tests.conftest import Sandbox, start_sandbox, stop_sandbox
from tests.e2e.test_images import run_job

pytestmark = pytest.mark.e2e

WAIT_SECONDS = 12  # the base task definition's CI_SERVICE_WAIT_SECONDS here (GitLab's default is 30)


@pytest.fixture(scope="module")
def waiting_sandbox(sandbox_root) -> Iterator[Sandbox]:
    directory = sandbox_root / "service-wait"
    running = start_sandbox(directory, "--task-env", f"CI_SERVICE_WAIT_SECONDS={WAIT_SECONDS}")
    try:
        yield running
    finally:
        stop_sandbox(directory)


def push_image(sandbox: Sandbox, name: str, config: dict, base: str = "busybox") -> dict:
    """POST /images on the control URL: a derived image the sandbox's registry serves and its tasks run."""
    request = urllib.request.Request(  # noqa: S310 (the sandbox's loopback URL)
        sandbox.control_url + "/images",
        data=json.dumps({"name": name, "base": base, "config": config}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        return json.loads(response.read())


def free_port() -> int:
    return 20000 + secrets.randbelow(5000)  # the sandbox's tasks share the host's network


def wait_setting(sandbox: Sandbox, job_log: str) -> str:
    """The CI_SERVICE_WAIT the job's task definition gives the main container."""
    task_arn = re.search(r"Task requested: (arn:\S+)", job_log).group(1)  # type: ignore[union-attr]
    ecs = sandbox.ecs()
    task = ecs.describe_tasks(cluster=sandbox.cluster, tasks=[task_arn])["tasks"][0]
    definition = ecs.describe_task_definition(taskDefinition=task["taskDefinitionArn"])["taskDefinition"]
    main = definition["containerDefinitions"][0]
    return next((e["value"] for e in main.get("environment") or [] if e["name"] == "CI_SERVICE_WAIT"), "")


def test_a_service_that_opens_its_exposed_port_late_is_waited_for_before_the_first_stage(
    waiting_sandbox, tmp_path
):
    port = free_port()
    image = f"sandbox/slow-web:{secrets.token_hex(3)}"
    page = f"slow-service-{secrets.token_hex(3)}"
    pushed = push_image(
        waiting_sandbox,
        image,
        {
            # the lowest TCP port is the one to wait for: not the UDP one below it, not the TCP one above
            "ExposedPorts": {f"{port}/tcp": {}, f"{port + 1}/tcp": {}, "53/udp": {}},
            "Entrypoint": ["sh", "-c"],
            "Cmd": [
                f"sleep 3; mkdir -p /www && echo {page} > /www/index.html && "
                f"exec httpd -f -p 127.0.0.1:{port} -h /www"
            ],
        },
    )
    assert pushed["repository"] == f"docker.io/{image.split(':')[0]}"
    done = run_job(
        waiting_sandbox,
        tmp_path,
        {
            "image": "busybox",
            "services": [{"name": image, "alias": "web"}],  # no HEALTHCHECK_TCP_PORT
            "script": [f"wget -qO- http://web:{port}/"],  # at once: no retry loop of its own
        },
    )
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-2000:]
    assert "Waiting for services to be up and running" in out
    assert f"$ wget -qO- http://web:{port}/\n{page}\n" in out
    assert "probably didn't start properly" not in out and "not waiting for it" not in out
    assert wait_setting(waiting_sandbox, out) == f"web:{port}"


def test_a_service_that_never_answers_is_warned_about_and_the_job_still_runs(waiting_sandbox, tmp_path):
    port = free_port()
    image = f"sandbox/mute:{secrets.token_hex(3)}"
    push_image(waiting_sandbox, image, {"ExposedPorts": {f"{port}/tcp": {}}, "Cmd": ["sleep", "600"]})
    done = run_job(
        waiting_sandbox,
        tmp_path,
        {
            "image": "busybox",
            # busybox itself exposes no port: nothing to wait for, which the job log says
            "services": [{"name": image, "alias": "mute"}, "busybox:1.36"],
            "script": ["echo the-job-ran"],
        },
    )
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-2000:]
    assert f"Waiting for services to be up and running (timeout {WAIT_SECONDS} seconds)" in out
    assert f"*** WARNING: Service mute probably didn't start properly: nothing answers on port {port}" in out
    assert (
        "WARNING: Service busybox (docker.io/library/busybox:1.36): its image exposes no TCP port; "
        "not waiting for it"
    ) in out
    assert "\nthe-job-ran\n" in out


def test_a_derived_image_with_a_bad_config_is_refused_with_a_clear_message(waiting_sandbox):
    with pytest.raises(urllib.error.HTTPError) as refused:
        push_image(waiting_sandbox, "sandbox/bad:1", {"ExposedPorts": ["http"]})
    assert refused.value.code == 400
    assert "ExposedPorts must name ports" in json.loads(refused.value.read())["message"]
