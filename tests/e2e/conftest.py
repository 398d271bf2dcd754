"""End-to-end helpers: CI jobs started through the signed API of a running sandbox."""

from __future__ import annotations

import base64
import io
import itertools
import os
import time
from pathlib import Path
from typing import Any

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from chalicelib.callers import owner_of
from chalicelib.jobs import record_key
from chalicelib.schema import TABLE_KEY
from fargate_ci_driver.errors import ApiError
from tests.conftest import Sandbox, wait_until

RUNNER = "sbxtest"
_job_ids = itertools.count(int(time.time() * 1000) % 10**12)


class KeyPair:
    """An ed25519 key pair in the forms the API and SSH need."""

    def __init__(self) -> None:
        self._key = Ed25519PrivateKey.generate()
        self.private_pem = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ).decode()
        self.public_line = (
            self._key.public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            .decode()
        )

    def paramiko_key(self) -> paramiko.Ed25519Key:
        return paramiko.Ed25519Key.from_private_key(io.StringIO(self.private_pem))


def record_key_of(sandbox: Sandbox, key: str, profile: str = "sandbox") -> str:
    """The jobs table's key of `profile`'s record of job `key` (the owner is part of it)."""
    return record_key(owner_of({"userArn": sandbox.state["profiles"][profile]}), key)


def table_key(sandbox: Sandbox, key: str, profile: str = "sandbox") -> dict:
    """`Key=` for the DynamoDB client."""
    return {TABLE_KEY: {"S": record_key_of(sandbox, key, profile)}}


def started_by(sandbox: Sandbox, key: str, profile: str = "sandbox") -> str:
    """The `startedBy` RunTask got for `profile`'s job `key`."""
    return "gl-" + record_key_of(sandbox, key, profile)


def next_job_id() -> str:
    return str(next(_job_ids))


class Job:
    """One CI job started through the API, with its client key (certified by the orchestrator's CA for the
    job's task); the task publishes its own host key."""

    def __init__(self, sandbox: Sandbox, job_id: str | None = None, **body: Any) -> None:
        self.sandbox = sandbox
        self.job_id = job_id or next_job_id()
        self.client_key = KeyPair()
        self.api = sandbox.api()
        self.view = self.api.create_job(
            {
                "runner": RUNNER,
                "job_id": self.job_id,
                "project_id": "7",
                "pipeline_id": "11",
                "ssh_public_key": self.client_key.public_line,
                **body,
            }
        )
        self.key = self.view["job_key"]

    def get(self) -> dict[str, Any]:
        return self.api.get_job(self.key)

    def wait_for(self, *states: str, timeout: float = 30.0) -> dict[str, Any]:
        return wait_until(
            lambda: (view := self.get())["state"] in states and view, timeout, 0.1, f"{self.key} in {states}"
        )

    def describe(self) -> dict[str, Any]:
        return self.sandbox.ecs().describe_tasks(cluster=self.sandbox.cluster, tasks=[self.view["task_arn"]])[
            "tasks"
        ][0]

    def wait_for_task(self, last_status: str, timeout: float = 30.0) -> dict[str, Any]:
        return wait_until(
            lambda: (task := self.describe())["lastStatus"] == last_status and task,
            timeout,
            0.1,
            f"task of {self.key} {last_status}",
        )

    def published(self, timeout: float = 30.0) -> dict[str, Any]:
        """The job view once its task has an address and has published its host key."""
        return wait_until(
            lambda: (view := self.get()).get("host_key") and view.get("address") and view,
            timeout,
            0.1,
            f"the host key of {self.key}'s task",
        )

    def client_pkey(self, key: KeyPair | None = None, certificate: str | None = None) -> paramiko.Ed25519Key:
        """The client key with a certificate (default: the one the orchestrator issued for this job)."""
        pkey = (key or self.client_key).paramiko_key()
        pkey.load_certificate(certificate or self.view["ssh_certificate"])
        return pkey

    def ssh(
        self,
        key: KeyPair | None = None,
        timeout: float = 20.0,
        *,
        certificate: str | None = None,
        pinned: str | None = None,
    ) -> paramiko.SSHClient:
        """Connect as the driver does: the job's certified key, the host key pinned to the published one
        (or `pinned`)."""
        view = self.published()
        address = view["address"]
        port = self.sandbox.state["ssh_port"]
        client = paramiko.SSHClient()
        host_key = paramiko.Ed25519Key(data=base64.b64decode((pinned or view["host_key"]).split()[1]))
        client.get_host_keys().add(f"[{address}]:{port}", "ssh-ed25519", host_key)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        pkey = self.client_pkey(key, certificate)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.connect(
                    address,
                    port=port,
                    username="root",
                    pkey=pkey,
                    look_for_keys=False,
                    allow_agent=False,
                    timeout=5,
                )
                return client
            except (ConnectionRefusedError, paramiko.ssh_exception.NoValidConnectionsError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def run(self, command: str) -> tuple[int, str, str]:
        client = self.ssh()
        try:
            _, stdout, stderr = client.exec_command(command, timeout=20)
            status = stdout.channel.recv_exit_status()
            return status, stdout.read().decode(), stderr.read().decode()
        finally:
            client.close()

    def stop(self, reason: str = "test done") -> dict[str, Any]:
        return self.api.stop_job(self.key, reason, attempt=self.view["attempt"])


@pytest.fixture
def job_factory(sandbox: Sandbox):
    """Jobs for one test; every one still running at the end is stopped."""
    jobs: list[Job] = []

    def make(job_id: str | None = None, **body: Any) -> Job:
        job = Job(sandbox, job_id, **body)
        jobs.append(job)
        return job

    yield make
    for job in jobs:
        try:
            job.stop("test teardown")
        except ApiError as exc:
            if exc.code != "AttemptMismatch":  # a newer attempt of the job is not this one's to stop
                raise
    for job in jobs:
        job.wait_for_task("STOPPED")
    sandbox.clear_faults()


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (its children, theirs, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
