"""The warm pool in the sandbox, through the real driver: a warm claim and a cold start side by side, and a
claimed task that dies before the job connects (the driver fails over within PrepareTimeout)."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import paramiko
import pytest

from tests.conftest import start_sandbox, stop_sandbox, wait_until
from tests.e2e.conftest import KeyPair
from tests.e2e.test_driver import driver, runner_env

PROVISION_DELAY = "3"  # a cold start is visibly slower than a warm claim


@pytest.fixture(scope="module")
def pool_sandbox(sandbox_root: Path):
    directory = sandbox_root / "warm-pool"
    running = start_sandbox(directory, "--provision-delay", PROVISION_DELAY, "--app-env", "WARM_POOL_SIZE=1")
    try:
        yield running
    finally:
        stop_sandbox(directory)


def idle_pool_task(sandbox, timeout: float = 60.0) -> dict:
    """An idle (claimable) warm pool record, once the pool has one."""
    table = sandbox.dynamodb()

    def find() -> dict | None:
        items = table.scan(TableName=sandbox.table)["Items"]
        idle = [i for i in items if i.get("pool", {}).get("S") == "idle"]
        return idle[0] if idle else None

    return wait_until(find, timeout, 0.2, "an idle warm pool task")


def test_a_matching_job_claims_the_warm_task_and_the_next_starts_cold(pool_sandbox, tmp_path):
    idle = idle_pool_task(pool_sandbox)
    first_env = runner_env(tmp_path, 880001 + os.getpid() % 1000)
    second_env = runner_env(tmp_path, 881001 + os.getpid() % 1000)
    try:
        warm = driver(pool_sandbox, first_env, "prepare")
        cold = driver(pool_sandbox, second_env, "prepare")  # the refill is still warming: the pool is empty
        assert warm.returncode == 0, warm.stdout + warm.stderr
        assert cold.returncode == 0, cold.stdout + cold.stderr
        assert (
            f"Warm task claimed: {idle['claimed_task']['S'] if 'claimed_task' in idle else ''}" in warm.stdout
        )
        assert "Warm task claimed: arn:aws:ecs:" in warm.stdout and "cold start" not in warm.stdout
        assert "Task requested: arn:aws:ecs:" in cold.stdout and "(cold start)" in cold.stdout
    finally:
        for env in (first_env, second_env):
            driver(pool_sandbox, env, "cleanup")


def test_a_claimed_task_that_dies_before_the_job_connects_is_replaced_within_prepare(pool_sandbox, tmp_path):
    idle = idle_pool_task(pool_sandbox)
    task_arn = idle["task_arn"]["S"]
    _freeze_sshd(pool_sandbox, idle)  # it still runs and looks idle, but no login will ever complete
    env = runner_env(tmp_path, 882001 + os.getpid() % 1000)
    argv = [sys.executable, "-m", "fargate_ci_driver", "--config", str(pool_sandbox.toml_path), "custom"]
    prepare = subprocess.Popen(
        [*argv, "prepare"],
        env=env,
        cwd=env["TMPDIR"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(prepare.stdout), daemon=True)
    reader.start()
    try:
        wait_until(lambda: f"Warm task claimed: {task_arn}" in "".join(output), 30, 0.05, "the warm claim")
        # The claimed task dies before the job could log in.
        pool_sandbox.ecs().stop_task(cluster=pool_sandbox.cluster, task=task_arn, reason="test: task lost")
        assert prepare.wait(120) == 0, "".join(output) + prepare.stderr.read()
        reader.join(5)
        log = "".join(output)
        assert "The warm task stopped before the job could connect: asking for another task" in log
        assert "(attempt 2)" in log and "SSH ready after" in log
        replacement = log.split("asking for another task", 1)[1]
        assert task_arn not in replacement  # never the dead task again
    finally:
        if prepare.poll() is None:
            prepare.kill()
        driver(pool_sandbox, env, "cleanup")


def _freeze_sshd(sandbox, idle: dict) -> None:
    """Log in to the idle pool task with a certificate for it (the sandbox's CA in KMS) and SIGSTOP its sshd
    listener."""
    from chalicelib.certs import CertificateRequest, user_certificate

    kms = sandbox.client("kms")
    key_id = sandbox.state["ca_key_id"]
    client_key = KeyPair()
    task_id = idle["task_arn"]["S"].rsplit("/", 1)[1]
    now = int(time.time())
    request = CertificateRequest(
        client_key.public_line, task_id, "test", now - 60, now + 600, 1, os.urandom(32)
    )

    def sign(message: bytes) -> bytes:
        answer = kms.sign(KeyId=key_id, Message=message, MessageType="RAW", SigningAlgorithm="ECDSA_SHA_256")
        return answer["Signature"]

    certificate = user_certificate(request, kms.get_public_key(KeyId=key_id)["PublicKey"], sign)
    pkey = client_key.paramiko_key()
    pkey.load_certificate(certificate)
    address, port = idle["address"]["S"], sandbox.state["ssh_port"]
    client = paramiko.SSHClient()
    host_key = paramiko.Ed25519Key(data=base64.b64decode(idle["host_key"]["S"].split()[1]))
    client.get_host_keys().add(f"[{address}]:{port}", "ssh-ed25519", host_key)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(address, port=port, username="root", pkey=pkey, look_for_keys=False, allow_agent=False)
    try:
        _, stdout, _ = client.exec_command("kill -STOP $(pgrep -f '\\[listener\\]')")
        assert stdout.channel.recv_exit_status() == 0
    finally:
        client.close()
