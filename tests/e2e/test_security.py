"""Security end to end: ownership across runners, allowlists, keys-only sshd, and no leaked secret."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from chalicelib.jobs import record_key
from fargate_ci_driver.errors import ApiError
from runner_emulator import SUCCESS, JobSpec, RunnerConfig, RunnerEmulator
from sandbox.run_job import driver_command
from tests.conftest import Sandbox

pytestmark = pytest.mark.e2e


def test_another_runner_can_neither_read_nor_stop_nor_heartbeat_a_job(sandbox: Sandbox, job_factory):
    job = job_factory()
    job.wait_for("RUNNING")
    other = sandbox.api("sandbox-other")  # a second runner manager, its own IAM identity

    for call in (
        other.get_job,
        lambda key: other.stop_job(key, "mine now", attempt=1),
        lambda key: other.heartbeat(key, attempt=1),
    ):
        with pytest.raises(ApiError) as refused:
            call(job.key)
        assert refused.value.status == 404

    assert job.describe()["lastStatus"] == "RUNNING"
    assert job.get()["state"] == "RUNNING"


def test_a_job_cannot_pick_a_task_definition_outside_the_allowlist(sandbox: Sandbox):
    job = JobSpec(script=["echo never"], variables={"FARGATE_TASK_DEFINITION": "ci-other"})
    config = RunnerConfig.for_driver(driver_command(str(sandbox.toml_path)), preparation_retry_delay=0.1)

    result = RunnerEmulator(config).run(job)

    assert result.status != SUCCESS
    assert "ci-other" in result.log and "allowlist" in result.log, result.log
    key = record_key(sandbox.state["profiles"]["sandbox"], f"{config.short_token}-{job.job_id}")
    started = sandbox.ecs().list_tasks(cluster=sandbox.cluster, startedBy=f"gl-{key}")
    assert started["taskArns"] == []


def test_the_tasks_sshd_takes_keys_only(sandbox: Sandbox, job_factory):
    job = job_factory()
    address = job.wait_for("RUNNING")["address"]
    job.ssh().close()  # sshd is up

    attempt = subprocess.run(
        [
            "ssh",
            "-p",
            str(sandbox.state["ssh_port"]),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "PreferredAuthentications=password,keyboard-interactive",
            f"root@{address}",
            "true",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert attempt.returncode == 255
    assert "Permission denied (publickey)" in attempt.stderr


def test_secrets_reach_no_log_no_record_no_task_environment_and_no_driver_file(sandbox: Sandbox):
    secret = "s3cr3t-VALUE-4711-do-not-leak"
    file_secret = "FILE-SECRET-0815-do-not-leak"
    digest = hashlib.sha256(file_secret.encode()).hexdigest()
    job = JobSpec(
        # The job uses both (the log shows each command, so it names neither value).
        script=[
            'test -n "$DEPLOY_PASSWORD"',
            f'test "$(sha256sum < "$DEPLOY_CERT" | cut -c1-64)" = {digest}',
        ],
        variables={"DEPLOY_PASSWORD": secret},
        file_variables={"DEPLOY_CERT": file_secret},
    )
    config = RunnerConfig.for_driver(driver_command(str(sandbox.toml_path)), preparation_retry_delay=0.1)

    result = RunnerEmulator(config).run(job)

    assert result.status == SUCCESS, result.log  # the job itself could use every secret
    secrets = [secret, file_secret, job.token]
    key = f"{config.short_token}-{job.job_id}"
    places: dict[str, str] = {"job log": result.log, "runner log": result.runner_log}
    for path in Path(sandbox.state["logs_dir"]).rglob("*"):
        if path.is_file():
            places[str(path)] = path.read_text(errors="replace")
    for path in Path(sandbox.state["metadata_dir"]).rglob("*"):
        if path.is_file():
            places[str(path)] = path.read_text(errors="replace")
    table = sandbox.dynamodb().scan(TableName=sandbox.table)["Items"]
    places["jobs table"] = json.dumps(table)
    record = next(i for i in table if i["job_key"]["S"] == key)
    task = sandbox.ecs().describe_tasks(cluster=sandbox.cluster, tasks=[record["task_arn"]["S"]])["tasks"][0]
    places["task overrides"] = json.dumps(task["overrides"])
    places["task definition"] = json.dumps(
        sandbox.ecs().describe_task_definition(taskDefinition=task["taskDefinitionArn"])["taskDefinition"]
    )

    for place, text in places.items():
        for value in secrets:
            assert value not in text, f"a secret reached {place}"
        if place != "task overrides":  # the task's own host key travels there, and only there
            assert "PRIVATE KEY" not in text, f"a private key reached {place}"
    assert not list(Path(sandbox.state["metadata_dir"]).glob(f"{key}*"))  # cleanup removed the keys


# --- the task's sshd is a job runner, not a general SSH server ----------------------------------------

HARDENED = {
    "disableforwarding": "yes",
    "allowtcpforwarding": "no",
    "allowagentforwarding": "no",
    "allowstreamlocalforwarding": "no",
    "x11forwarding": "no",
    "permittunnel": "no",
    "permittty": "no",
    "maxauthtries": "2",
    "logingracetime": "20",
    # The image's defaults: a manager that stops answering loses its connection (80 s on OpenSSH 9.2).
    "clientaliveinterval": "10",
    "clientalivecountmax": "3",
    "passwordauthentication": "no",
    "kbdinteractiveauthentication": "no",
    "authenticationmethods": "publickey",
}


def test_sshd_t_inside_a_task_shows_the_hardened_settings(sandbox: Sandbox, job_factory):
    job = job_factory()
    job.wait_for("RUNNING")
    # The config file the task's own sshd was started with (its listener's command line names it).
    status, listener, _ = job.run(
        "cat /proc/[0-9]*/cmdline | tr '\\0' '\\n' | grep -a -m1 '^sshd: .*listener'"
    )
    assert status == 0, listener
    config = listener.split(" -f ", 1)[1].split()[0]

    status, out, err = job.run(f"/usr/sbin/sshd -T -f {config}")

    assert status == 0, err
    effective = {}
    for line in out.splitlines():
        name, _, value = line.partition(" ")
        effective.setdefault(name, value)
    assert {name: effective.get(name) for name in HARDENED} == HARDENED
    assert "subsystem" not in effective  # no sftp (nor any other subsystem)


def test_the_tasks_sshd_refuses_forwarding_a_tty_and_sftp(sandbox: Sandbox, job_factory):
    import paramiko

    job = job_factory()
    job.wait_for("RUNNING")
    client = job.ssh()
    try:
        transport = client.get_transport()
        assert transport is not None
        port = sandbox.state["ssh_port"]
        address = job.get()["address"]
        with pytest.raises(paramiko.ChannelException):  # ssh -L
            transport.open_channel("direct-tcpip", (address, port), ("127.0.0.1", 40000), timeout=10)
        with pytest.raises(paramiko.SSHException):  # ssh -R
            transport.request_port_forward("127.0.0.1", 0)
        with pytest.raises(paramiko.SSHException):  # sftp (and scp in its sftp mode)
            paramiko.SFTPClient.from_transport(transport)
        channel = transport.open_session(timeout=10)
        with pytest.raises(paramiko.SSHException):  # ssh -t
            channel.get_pty()
        channel.close()

        # What the driver does still works on the same connection: a shell with the script on stdin.
        channel = transport.open_session(timeout=10)
        channel.exec_command("bash")
        channel.sendall(b"echo driver-style-$((6 * 7))\n")
        channel.shutdown_write()
        assert channel.recv_exit_status() == 0
        assert channel.makefile().read().decode().strip() == "driver-style-42"
    finally:
        client.close()
