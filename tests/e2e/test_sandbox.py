"""The sandbox end to end: real moto, the real Chalice app behind SigV4, real sshd in bwrap-confined tasks.

Each test starts its jobs through the signed API (the driver's ApiClient) as the runner would, and looks
at the result where AWS would show it: DescribeTasks, the task's events, the job record, SSH.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import tomllib
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paramiko
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from tests.conftest import (
    Sandbox,
    run_sandbox_cli,
    sandbox_processes,
    start_sandbox,
    stop_sandbox,
    wait_until,
)
from tests.e2e.conftest import RUNNER, Job, KeyPair, next_job_id, started_by, table_key  # noqa: F401

pytestmark = pytest.mark.e2e


# --- helpers ------------------------------------------------------------------------------------------


class EventTap:
    """A second target on the sandbox's ECS rule: a queue the test reads (the app keeps its own)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sqs = sandbox.client("sqs")
        events = sandbox.client("events")
        self.queue_url = self.sqs.create_queue(QueueName="sandbox-test-tap")["QueueUrl"]
        arn = self.sqs.get_queue_attributes(QueueUrl=self.queue_url, AttributeNames=["QueueArn"])[
            "Attributes"
        ]["QueueArn"]
        rule = events.list_rules()["Rules"][0]["Name"]
        events.put_targets(Rule=rule, Targets=[{"Id": "test-tap", "Arn": arn}])
        self.seen: list[dict[str, Any]] = []

    def events_for(self, task_arn: str) -> list[dict[str, Any]]:
        while True:
            batch = self.sqs.receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=10).get(
                "Messages", []
            )
            if not batch:
                break
            for message in batch:
                self.seen.append(json.loads(message["Body"]))
                self.sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"])
        return [event for event in self.seen if event["detail"]["taskArn"] == task_arn]

    def wait_for(self, task_arn: str, last_status: str) -> list[dict[str, Any]]:
        return wait_until(
            lambda: (
                (events := self.events_for(task_arn))
                and any(e["detail"]["lastStatus"] == last_status for e in events)
                and events
            ),
            what=f"a {last_status} event",
        )


@pytest.fixture(scope="module")
def tap(sandbox: Sandbox) -> EventTap:
    return EventTap(sandbox)


def signed_request(
    sandbox: Sandbox,
    method: str,
    path: str,
    body: bytes = b"",
    *,
    secret: str | None = None,
    region: str | None = None,
    at: datetime | None = None,
    tamper: bytes | None = None,
) -> tuple[int, dict[str, Any]]:
    """A request signed with botocore's SigV4Auth by hand (profile `sandbox`), optionally spoiled."""
    import configparser

    parser = configparser.ConfigParser()
    parser.read(sandbox.credentials_file)
    key, real_secret = parser["sandbox"]["aws_access_key_id"], parser["sandbox"]["aws_secret_access_key"]
    url = sandbox.api_url + path
    request = AWSRequest(method=method, url=url, data=body, headers={"Content-Type": "application/json"})
    signer = SigV4Auth(Credentials(key, secret or real_secret), "execute-api", region or sandbox.region)
    if at is None:
        signer.add_auth(request)
    else:
        request.context["timestamp"] = at.strftime("%Y%m%dT%H%M%SZ")
        signer._modify_request_before_signing(request)
        canonical = signer.canonical_request(request)
        signature = signer.signature(signer.string_to_sign(request, canonical), request)
        signer._inject_signature_to_request(request, signature)
    prepared = urllib.request.Request(  # noqa: S310 (the sandbox's loopback URL)
        url,
        data=tamper if tamper is not None else (body or None),
        method=method,
        headers=dict(request.headers),
    )
    try:
        with urllib.request.urlopen(prepared, timeout=10) as response:  # noqa: S310
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def listening(url: str) -> bool:
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex((host, int(port))) == 0


# --- lifecycle ----------------------------------------------------------------------------------------


def test_start_writes_driver_config_state_and_credentials(sandbox: Sandbox):
    config = tomllib.loads(sandbox.toml_path.read_text())
    assert config["Fargate"] == {"Region": sandbox.region}  # the cluster is the orchestrator's setting now
    assert config["TaskMetadata"]["Directory"] == str(sandbox.dir / "metadata")
    assert config["SSH"]["Username"] == "root" and config["SSH"]["Port"] == sandbox.state["ssh_port"]
    assert config["Orchestrator"] == {
        "URL": sandbox.api_url,
        "Region": sandbox.region,
        "Profile": "sandbox",
        "SharedCredentialsFile": sandbox.credentials_file,
        "Timeout": 10,
    }
    assert config["Job"]["BuildsDir"] == "/builds" and config["Job"]["CacheDir"] == "/cache"
    for key in (
        "api_url",
        "aws_endpoint_url",
        "region",
        "cluster",
        "table",
        "control_url",
        "credentials_file",
    ):
        assert sandbox.state[key], key
    assert set(sandbox.state["pids"]) == {"aws_host", "api_host"}
    assert os.stat(sandbox.credentials_file).st_mode & 0o777 == 0o600
    credentials = Path(sandbox.credentials_file).read_text()
    assert "[sandbox]" in credentials and "[sandbox-other]" in credentials
    status = run_sandbox_cli("status", "--dir", str(sandbox.dir))
    assert status.returncode == 0 and json.loads(status.stdout)["pids"] == sandbox.state["pids"]


def test_second_start_on_the_same_dir_refuses(sandbox: Sandbox):
    result = run_sandbox_cli("start", "--dir", str(sandbox.dir))
    assert result.returncode != 0
    assert "already running" in result.stderr
    assert json.loads((sandbox.dir / "sandbox.json").read_text())["pids"] == sandbox.state["pids"]


def test_stop_leaves_no_process_or_socket(sandbox_root: Path):
    other = start_sandbox(sandbox_root / "own", "--ssh-port", "2299")
    job = Job(other)  # a task still running when the sandbox stops
    address = job.wait_for("RUNNING")["address"]
    assert job.run("true")[0] == 0
    assert len(sandbox_processes(other.dir)) >= 4  # AWS host, API host, the task's bwrap and sshd
    assert listening(other.api_url) and listening(other.aws_endpoint_url) and listening(other.control_url)

    stop_sandbox(other.dir)

    assert not listening(f"http://{address}:2299/")

    assert sandbox_processes(other.dir) == []
    assert not (listening(other.api_url) or listening(other.aws_endpoint_url) or listening(other.control_url))
    assert not (other.dir / "sandbox.json").exists()


def test_bad_options_are_one_line_errors(tmp_path: Path):
    result = run_sandbox_cli("start", "--dir", str(tmp_path / "x"), "--ssh-port", "0")
    assert (
        result.returncode == 2 and result.stderr.strip() == "sandbox: --ssh-port must be a TCP port (1-65535)"
    )
    result = run_sandbox_cli("fault", "--dir", str(tmp_path / "x"), "--job-id", "1", "fail-to-start")
    assert (
        result.returncode == 4 and "no sandbox running" in result.stderr and "Traceback" not in result.stderr
    )


# --- tasks, SSH and confinement -----------------------------------------------------------------------


def test_task_is_reachable_with_its_jobs_certificate_only_and_presents_its_published_host_key(job_factory):
    job = job_factory()
    view = job.wait_for("RUNNING")
    assert view["address"].startswith("127.")

    status, out, _ = job.run("hostname; echo $HOME; ls -A ~; env; echo PROCESSES; ps -eo ppid=,args=")
    assert status == 0
    lines = out.splitlines()
    assert lines[0].startswith("ip-127-")
    assert lines[1] == "/root"
    # The task role's credentials and the task metadata, per task (sandbox/credentials.py), reach sessions.
    assert re.search(r"AWS_CONTAINER_CREDENTIALS_FULL_URI=http://127\.0\.0\.1:\d+/v2/credentials/", out)
    assert re.search(r"ECS_CONTAINER_METADATA_URI_V4=http://127\.0\.0\.1:\d+/v4/", out)
    assert "SSH_HOST_KEY" not in out and "SSH_PUBLIC_KEY" not in out and "PRIVATE KEY" not in out
    # The entrypoint exec'd sshd in the foreground: it is the container's main process (the child of the
    # namespace's init, PID 1), no shell in its place. Its orphan watchdog and log relay are sshd's children.
    processes = [line.split(None, 1) for line in out.split("PROCESSES\n", 1)[1].splitlines()]
    main = [args for ppid, args in processes if ppid == "1"]
    assert any("sshd" in p and " -D" in p for p in main), processes
    assert not any("entrypoint" in p for p in main), processes

    client = job.ssh()  # RejectPolicy: connecting at all proves the host key is the one the task published
    published = job.get()["host_key"]
    assert client.get_transport().get_remote_server_key().get_base64() == published.split()[1]
    client.close()
    with pytest.raises(paramiko.AuthenticationException):  # the job's key without its certificate
        plain = paramiko.SSHClient()
        plain.set_missing_host_key_policy(paramiko.AutoAddPolicy())  # noqa: S507 (the key is what is tested)
        plain.connect(
            view["address"],
            port=job.sandbox.state["ssh_port"],
            username="root",
            pkey=job.client_key.paramiko_key(),
            look_for_keys=False,
            allow_agent=False,
            timeout=5,
        )


def test_a_certificate_for_one_task_is_refused_by_another_and_an_expired_one_too(sandbox, job_factory):
    first, second = job_factory(), job_factory()
    first.wait_for("RUNNING")
    second.wait_for("RUNNING")
    # The second job's key with the first job's certificate: a certificate names its key, so use the
    # first job's own key and certificate against the second job's task.
    with pytest.raises(paramiko.AuthenticationException):
        first_cert_at_second = second.ssh(key=first.client_key, certificate=first.view["ssh_certificate"])
        first_cert_at_second.close()
    # A certificate the same CA signed for this very task, but expired.
    expired = _certificate(
        sandbox, first, valid_after=int(time.time()) - 3600, valid_before=int(time.time()) - 60
    )
    with pytest.raises(paramiko.AuthenticationException):
        first.ssh(certificate=expired).close()
    # The same, valid now: accepted (so the refusals above are about the task and the expiry).
    fresh = _certificate(
        sandbox, first, valid_after=int(time.time()) - 60, valid_before=int(time.time()) + 600
    )
    first.ssh(certificate=fresh).close()


def _certificate(sandbox, job, *, valid_after: int, valid_before: int) -> str:
    """A certificate for `job`'s client key and task, signed by the sandbox's CA in KMS (moto)."""
    from chalicelib.certs import CertificateRequest, user_certificate

    kms = sandbox.client("kms")
    key_id = sandbox.state["ca_key_id"]
    request = CertificateRequest(
        public_key_line=job.client_key.public_line,
        principal=job.view["task_arn"].rsplit("/", 1)[1],
        key_id=f"{job.key} test",
        valid_after=valid_after,
        valid_before=valid_before,
        serial=1,
        nonce=os.urandom(32),
    )

    def sign(message: bytes) -> bytes:
        answer = kms.sign(KeyId=key_id, Message=message, MessageType="RAW", SigningAlgorithm="ECDSA_SHA_256")
        return answer["Signature"]

    return user_certificate(request, kms.get_public_key(KeyId=key_id)["PublicKey"], sign)


def test_task_with_another_host_key_than_the_published_one_is_refused_by_the_pinning_client(job_factory):
    job = job_factory()
    job.wait_for("RUNNING")
    with pytest.raises(paramiko.SSHException):
        job.ssh(pinned=KeyPair().public_line)  # the driver would pin this one: the task must not match it


def test_job_cannot_change_the_host(job_factory):
    job = job_factory()
    job.wait_for("RUNNING")
    marker = f"sandbox-escape-{job.job_id}"
    status, out, _ = job.run(
        f"touch /etc/{marker}; echo etc=$?; touch /{marker}; echo root=$?; "
        f"touch /usr/{marker}; echo usr=$?; mount -o remount,rw /etc 2>/dev/null; echo mount=$?; "
        f"echo ok > /builds/{marker} && echo builds=$?; echo ok > /tmp/{marker} && echo tmp=$?"
    )
    assert status == 0
    assert "etc=1" in out and "root=1" in out and "usr=1" in out and "mount=32" in out
    assert "builds=0" in out and "tmp=0" in out
    for path in (f"/etc/{marker}", f"/{marker}", f"/usr/{marker}", f"/tmp/{marker}"):
        assert not Path(path).exists(), path


def test_tasks_cannot_see_each_others_files_or_the_sandbox(job_factory, sandbox: Sandbox):
    first, second = job_factory(), job_factory()
    first.wait_for("RUNNING")
    second.wait_for("RUNNING")
    status, _, _ = first.run("echo secret > /builds/mine && echo secret > /tmp/mine && echo secret > ~/mine")
    assert status == 0

    status, out, _ = second.run(
        f"ls /builds/mine /tmp/mine ~/mine 2>&1; ls {sandbox.dir} 2>&1; cat {sandbox.credentials_file} 2>&1; "
        "ps -e -o comm= | sort -u"
    )
    assert out.count("No such file or directory") == 5
    assert "aws_secret_access_key" not in out
    assert "python" not in out  # its own PID namespace: no sandbox (or other task's) processes


def test_stopping_the_task_kills_every_process_of_it(job_factory):
    job = job_factory()
    job.wait_for("RUNNING")
    marker = f"{job.job_id}.5"
    status, _, _ = job.run(f"setsid nohup sleep {marker} >/dev/null 2>&1 < /dev/null & echo started")
    assert status == 0
    # The shell answers before its background child has exec'd sleep: wait until the host sees it.
    sleepers = wait_until(
        lambda: [pid for pid in os.listdir("/proc") if pid.isdigit() and f"sleep {marker}" in _cmd(pid)],
        10,
        0.05,
        "the job's background process to run (seen from the host)",
    )

    job.stop()
    task = job.wait_for_task("STOPPED")

    assert task["stopCode"] == "UserInitiated" and task["stoppedReason"] == "test done"
    assert not [pid for pid in sleepers if Path(f"/proc/{pid}").exists() and f"sleep {marker}" in _cmd(pid)]


def _cmd(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


# --- what AWS shows -----------------------------------------------------------------------------------


def test_describe_tasks_and_events_show_the_whole_lifecycle(job_factory, tap: EventTap, sandbox: Sandbox):
    job = job_factory()
    job.wait_for("RUNNING")
    running = job.describe()
    with urllib.request.urlopen(sandbox.control_url + "/tasks", timeout=10) as answer:  # noqa: S310
        live = {task["task_arn"]: task for task in json.loads(answer.read())["tasks"]}
    assert live[running["taskArn"]]["job_id"] == job.job_id
    job.stop()
    stopped = job.wait_for_task("STOPPED")
    events = tap.wait_for(job.view["task_arn"], "STOPPED")

    assert running["lastStatus"] == "RUNNING" and running["containers"][0]["lastStatus"] == "RUNNING"
    address = running["containers"][0]["networkInterfaces"][0]["privateIpv4Address"]
    assert address == job.get()["address"]
    assert any(
        d["name"] == "privateIPv4Address" and d["value"] == address
        for d in running["attachments"][0]["details"]
    )
    for field in ("createdAt", "pullStartedAt", "pullStoppedAt", "startedAt", "stoppingAt", "stoppedAt"):
        assert field in stopped, field
    assert stopped["createdAt"] <= stopped["startedAt"] <= stopped["stoppingAt"] <= stopped["stoppedAt"]
    assert stopped["version"] > running["version"]
    assert stopped["containers"][0]["lastStatus"] == "STOPPED" and "exitCode" in stopped["containers"][0]

    statuses = [e["detail"]["lastStatus"] for e in events]
    for status in (
        "PROVISIONING",
        "PENDING",
        "RUNNING",
        "DEACTIVATING",
        "STOPPING",
        "DEPROVISIONING",
        "STOPPED",
    ):
        assert status in statuses
    versions = [e["detail"]["version"] for e in events]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)

    event = events[-1]
    assert set(event) >= {
        "version",
        "id",
        "detail-type",
        "source",
        "account",
        "time",
        "region",
        "resources",
        "detail",
    }
    assert (event["version"], event["source"], event["detail-type"]) == (
        "0",
        "aws.ecs",
        "ECS Task State Change",
    )
    assert event["resources"] == [job.view["task_arn"]] and event["region"] == sandbox.region
    assert datetime.strptime(event["time"], "%Y-%m-%dT%H:%M:%SZ")
    detail = event["detail"]
    assert detail["clusterArn"] == sandbox.state["cluster_arn"]
    assert detail["startedBy"] == started_by(sandbox, job.key) and detail["group"] == "family:ci-coordinator"
    assert detail["stopCode"] == "UserInitiated" and detail["desiredStatus"] == "STOPPED"
    assert (
        detail["containers"][0]["name"] == "ci-coordinator" and "networkInterfaces" in detail["containers"][0]
    )
    assert detail["stoppedAt"].endswith("Z") and "overrides" in detail


def test_run_task_client_token_gives_the_same_task(sandbox: Sandbox, job_factory):
    job = job_factory()
    task = job.describe()
    ecs = sandbox.ecs()
    vpc = {"subnets": sandbox.state["subnets"], "securityGroups": [sandbox.state["security_group"]]}
    request = {
        "cluster": sandbox.cluster,
        "taskDefinition": "ci-other",
        "launchType": "FARGATE",
        "networkConfiguration": {"awsvpcConfiguration": vpc},
        "clientToken": f"token-{job.job_id}",
        "startedBy": "sandbox-test",
    }
    first = ecs.run_task(**request)["tasks"][0]
    again = ecs.run_task(**request)["tasks"][0]
    assert first["taskArn"] == again["taskArn"] != task["taskArn"]
    with pytest.raises(ecs.exceptions.ClientError, match="ConflictException"):
        ecs.run_task(**{**request, "startedBy": "someone-else"})
    ecs.stop_task(cluster=sandbox.cluster, task=first["taskArn"], reason="test done")
    wait_until(
        lambda: (
            ecs.describe_tasks(cluster=sandbox.cluster, tasks=[first["taskArn"]])["tasks"][0]["lastStatus"]
            == "STOPPED"
        )
    )


def test_list_tasks_shows_running_tasks_unless_asked_for_stopped_ones(sandbox: Sandbox, job_factory):
    job = job_factory()
    arn = job.wait_for_task("RUNNING")["taskArn"]
    ecs, ours = sandbox.ecs(), started_by(sandbox, job.key)
    assert ecs.list_tasks(cluster=sandbox.cluster, startedBy=ours)["taskArns"] == [arn]
    job.stop()
    job.wait_for_task("STOPPED")
    assert ecs.list_tasks(cluster=sandbox.cluster, startedBy=ours)["taskArns"] == []
    stopped = ecs.list_tasks(cluster=sandbox.cluster, startedBy=ours, desiredStatus="STOPPED")
    assert stopped["taskArns"] == [arn]


def test_describe_tasks_reports_missing_tasks(sandbox: Sandbox):
    arn = f"arn:aws:ecs:{sandbox.region}:123456789012:task/{sandbox.cluster}/0123456789abcdef"
    answer = sandbox.ecs().describe_tasks(cluster=sandbox.cluster, tasks=[arn])
    assert answer["tasks"] == [] and answer["failures"] == [{"arn": arn, "reason": "MISSING"}]


# --- faults -------------------------------------------------------------------------------------------


def test_fault_fail_to_start(sandbox: Sandbox, job_factory):
    job_id = next_job_id()
    sandbox.fault(job_id, "fail-to-start")
    job = job_factory(job_id)
    task = job.wait_for_task("STOPPED")
    view = job.wait_for("FAILED")

    assert task["stopCode"] == "TaskFailedToStart"
    assert task["stoppedReason"].startswith("CannotPullContainerError: ")
    assert task["containers"][0]["reason"] == task["stoppedReason"]
    assert "startedAt" not in task and "exitCode" not in task["containers"][0]
    assert view["stop_code"] == "TaskFailedToStart"
    assert view["stopped_reason"].startswith("CannotPullContainerError: ")


def test_fault_is_used_up_by_the_first_task_of_its_job(sandbox: Sandbox, job_factory):
    job_id = next_job_id()
    sandbox.fault(job_id, "fail-to-start")
    failed = job_factory(job_id)
    failed.wait_for("FAILED")
    retry = Job(sandbox, job_id)  # the runner's prepare retry: a new key pair, a new attempt
    view = retry.wait_for("RUNNING")
    assert view["attempt"] == 2 and view["task_arn"] != failed.view["task_arn"]
    retry.stop()
    retry.wait_for_task("STOPPED")


def test_fault_exit(sandbox: Sandbox, job_factory):
    job_id = next_job_id()
    sandbox.fault(job_id, "exit", after=0.5, code=3)
    job = job_factory(job_id)
    task = job.wait_for_task("STOPPED")
    view = job.wait_for("STOPPED")

    assert task["stopCode"] == "EssentialContainerExited"
    assert task["stoppedReason"] == "Essential container in task exited"
    assert task["containers"][0]["exitCode"] == 3
    assert "startedAt" in task
    assert (view["stop_code"], view["exit_code"]) == ("EssentialContainerExited", 3)


def test_fault_spot_interruption(sandbox: Sandbox, job_factory, tap: EventTap):
    job_id = next_job_id()
    sandbox.fault(job_id, "spot", after=0.5, notice=1)
    job = job_factory(job_id)
    task = job.wait_for_task("STOPPED")
    events = tap.wait_for(job.view["task_arn"], "STOPPED")
    view = job.wait_for("STOPPED")

    notice = [e["detail"] for e in events if e["detail"].get("stopCode") == "TerminationNotice"]
    assert notice and notice[0]["lastStatus"] == "RUNNING" and notice[0]["desiredStatus"] == "STOPPED"
    assert task["stopCode"] == "SpotInterruption"
    assert task["stoppedReason"] == "Your Spot Task was interrupted."
    assert isinstance(task["containers"][0]["exitCode"], int)  # whatever sshd exits with on SIGTERM
    assert view["stop_code"] == "SpotInterruption"


def test_fault_slow_provisioning(sandbox: Sandbox, job_factory):
    job_id = next_job_id()
    sandbox.fault(job_id, "slow-provisioning", seconds=2)
    job = job_factory(job_id)
    assert job.describe()["lastStatus"] in ("PROVISIONING", "PENDING")
    task = job.wait_for_task("RUNNING")
    created = task["createdAt"]
    assert task["pullStartedAt"] - created >= timedelta(seconds=1)
    assert task["startedAt"] - created >= timedelta(seconds=2)


def test_fault_sshd_delay(sandbox: Sandbox, job_factory):
    job_id = next_job_id()
    sandbox.fault(job_id, "sshd-delay", seconds=60)
    job = job_factory(job_id)
    view = job.wait_for("RUNNING")
    with socket.socket() as probe:
        probe.settimeout(2)
        assert probe.connect_ex((view["address"], sandbox.state["ssh_port"])) != 0


def test_fault_events_dropped(sandbox: Sandbox, job_factory, tap: EventTap):
    job_id = next_job_id()
    sandbox.fault(job_id, "events", drop="RUNNING,DEACTIVATING")
    job = job_factory(job_id)
    job.wait_for_task("RUNNING")
    job.stop()
    events = tap.wait_for(job.view["task_arn"], "STOPPED")
    statuses = [e["detail"]["lastStatus"] for e in events]
    assert "RUNNING" not in statuses and "DEACTIVATING" not in statuses
    assert "PENDING" in statuses and "STOPPING" in statuses
    assert job.wait_for("STOPPED")["stop_code"] == "UserInitiated"


def test_fault_events_duplicated_and_reordered(sandbox: Sandbox, job_factory, tap: EventTap):
    job_id = next_job_id()
    sandbox.fault(job_id, "events", duplicate=True, reorder=True)
    job = job_factory(job_id)
    job.wait_for("RUNNING")
    job.stop()
    events = tap.wait_for(job.view["task_arn"], "STOPPED")
    wait_until(lambda: len(tap.events_for(job.view["task_arn"])) >= 16, what="every event twice")
    versions = [e["detail"]["version"] for e in tap.events_for(job.view["task_arn"])]

    assert all(versions.count(v) == 2 for v in set(versions))
    assert versions != sorted(versions)
    assert job.wait_for("STOPPED")["last_status"] == "STOPPED"  # the app still ends in the right state
    assert events


def test_fault_for_every_job(sandbox: Sandbox, job_factory):
    sandbox.fault("*", "fail-to-start")
    first, second = job_factory(), job_factory()
    assert first.wait_for("FAILED")["stop_code"] == "TaskFailedToStart"
    assert second.wait_for("FAILED")["stop_code"] == "TaskFailedToStart"
    sandbox.clear_faults()


def test_fault_cli_validates_and_arms(sandbox: Sandbox):
    ok = run_sandbox_cli(
        "fault", "--dir", str(sandbox.dir), "--job-id", "424242", "exit", "--after", "1", "--code", "2"
    )
    assert ok.returncode == 0 and '"kind": "exit"' in ok.stdout
    missing = run_sandbox_cli(
        "fault", "--dir", str(sandbox.dir), "--job-id", "424242", "spot", "--after", "1"
    )
    assert missing.returncode == 2 and missing.stderr.strip() == "sandbox: fault spot needs --notice"
    bad = run_sandbox_cli("fault", "--dir", str(sandbox.dir), "--job-id", "x1", "fail-to-start")
    assert bad.returncode == 2 and "job_id must be a GitLab job id" in bad.stderr
    cleared = run_sandbox_cli("fault", "--dir", str(sandbox.dir), "--clear")
    assert cleared.returncode == 0 and cleared.stdout.strip() == "faults cleared: 1"


# --- IAM authorisation --------------------------------------------------------------------------------


def test_signed_requests_pass_and_carry_the_callers_identity(sandbox: Sandbox, job_factory):
    status, body = signed_request(sandbox, "GET", "/health")
    assert (status, body) == (200, {"status": "ok"})
    job = job_factory()
    assert sandbox.api("sandbox").get_job(job.key)["job_key"] == job.key
    from fargate_ci_driver.errors import ApiError

    with pytest.raises(ApiError) as refused:
        sandbox.api("sandbox-other").get_job(job.key)  # runner-b does not own runner-a's job
    assert refused.value.status == 404


@pytest.mark.parametrize(
    ("spoil", "says"),
    [
        ({"secret": "not-the-secret-key-of-this-user-at-all0"}, "signature we calculated does not match"),
        ({"region": "us-east-1"}, "scoped to a valid region"),
        ({"at": datetime.now(UTC) - timedelta(minutes=10)}, "Signature expired"),
        ({"tamper": b'{"other": "body"}'}, "signature we calculated does not match"),
    ],
    ids=["wrong-secret", "wrong-region", "expired", "tampered-body"],
)
def test_badly_signed_requests_get_403(sandbox: Sandbox, spoil: dict[str, Any], says: str):
    status, body = signed_request(sandbox, "POST", "/jobs/sbxtest-1/heartbeat", b"{}", **spoil)
    assert status == 403
    assert body["error"] == "Forbidden" and says in body["message"]


@pytest.mark.parametrize("path", ["/health", "/jobs/sbxtest-1", "/no-such-route"])
def test_unsigned_requests_get_403(sandbox: Sandbox, path: str):
    try:
        with urllib.request.urlopen(sandbox.api_url + path, timeout=10) as response:  # noqa: S310
            status, body = response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        status, body = exc.code, json.loads(exc.read())
    assert status == 403
    assert body == {"error": "Forbidden", "message": "Missing Authentication Token", "field": None}


# --- secrets ------------------------------------------------------------------------------------------


def test_the_tasks_host_private_key_is_nowhere_but_in_the_task(sandbox: Sandbox, job_factory, tap: EventTap):
    """No DescribeTasks answer (overrides, environment, tags), no event, no log and no job record holds a
    private key: the task made its own, and only its public half left it."""
    job = job_factory()
    job.wait_for("RUNNING")
    status, out, _ = job.run(
        "cat /run/ci-sshd/host_ed25519_key; echo ===; cat /run/ci-sshd/host_ed25519_key.pub"
    )
    private, public = out.split("===\n")
    assert status == 0 and "PRIVATE KEY" in private
    secret_line = private.splitlines()[2]  # a line of the key's base64 body
    described = sandbox.ecs().describe_tasks(
        cluster=sandbox.cluster, tasks=[job.view["task_arn"]], include=["TAGS"]
    )["tasks"][0]
    job.stop()
    job.wait_for("STOPPED")

    events = tap.wait_for(job.view["task_arn"], "STOPPED")  # every ECS Task State Change of the task
    assert events
    for event in events:
        shown = json.dumps(event)
        assert "PRIVATE KEY" not in shown and secret_line not in shown
    text = json.dumps(described, default=str)
    assert "PRIVATE KEY" not in text and secret_line not in text
    env = described["overrides"]["containerOverrides"][0]["environment"]
    assert [e["name"] for e in env] == ["FARGATE_CI_API_URL"]
    # Events carry the same task description (sandbox/task.py: `detail`); the logs show every event's
    # delivery, the API's answers and the task's own output.
    logs = [path for path in Path(sandbox.state["logs_dir"]).rglob("*.log")]
    assert logs
    for path in logs:
        content = path.read_text(errors="replace")
        assert secret_line not in content and "BEGIN OPENSSH PRIVATE KEY" not in content, path
    item = sandbox.dynamodb().get_item(TableName=sandbox.table, Key=table_key(sandbox, job.key))["Item"]
    assert item["host_key"]["S"].split()[1] == public.split()[1]  # the public half is what is stored
    assert "PRIVATE KEY" not in json.dumps(item) and secret_line not in json.dumps(item)


# --- the app's settings in the sandbox ----------------------------------------------------------------


def test_the_large_task_definition_is_allowed_and_the_other_is_not(sandbox: Sandbox, job_factory):
    from fargate_ci_driver.errors import ApiError

    large = job_factory(task_definition="ci-coordinator-large")
    task = large.wait_for_task("RUNNING")
    assert "task-definition/ci-coordinator-large:" in task["taskDefinitionArn"]
    assert (task["cpu"], task["memory"]) == ("1024", "2048")

    with pytest.raises(ApiError) as refused:
        job_factory(task_definition="ci-other")
    assert (refused.value.status, refused.value.code) == (400, "InvalidInput")
