"""The sandbox's pure parts, without starting one: faults, event misbehaviour, addresses, SigV4, config."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from sandbox.container import ContainerLauncher, ContainerSpec, bwrap_argv, seccomp_program, wait_for_id_maps
from sandbox.control import driver_config
from sandbox.errors import UsageError
from sandbox.events import EventFaults
from sandbox.fargate import AddressAllocator
from sandbox.faults import FaultRegistry, parse_fault
from sandbox.images import Image
from sandbox.sigv4 import Identity, RoleSessions, SignatureRejected, verify
from tests.conftest import wait_until

# --- faults -------------------------------------------------------------------------------------------


def test_parse_fault_accepts_every_kind():
    assert parse_fault({"job_id": "12", "kind": "fail-to-start"}).params == {}
    assert parse_fault({"job_id": "12", "kind": "exit", "after": "1.5", "code": 3}).params == {
        "after": 1.5,
        "code": 3,
    }
    assert parse_fault({"job_id": "*", "kind": "spot", "after": 0, "notice": 2}).job_id == "*"
    assert parse_fault({"job_id": 7, "kind": "events", "drop": "running,STOPPED"}).params == {
        "drop": ["RUNNING", "STOPPED"]
    }


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"job_id": "abc", "kind": "exit"}, "job_id must be a GitLab job id"),
        ({"job_id": "1", "kind": "melt"}, "unknown fault kind 'melt'"),
        ({"job_id": "1", "kind": "exit", "after": 1}, "fault exit needs --code"),
        ({"job_id": "1", "kind": "exit", "after": 1, "code": 300}, "exit code 0-255"),
        ({"job_id": "1", "kind": "sshd-delay", "seconds": "soon"}, "must be a number of seconds"),
        ({"job_id": "1", "kind": "fail-to-start", "seconds": 1}, "takes no parameter seconds"),
        ({"job_id": "1", "kind": "events"}, "needs --drop"),
        ({"job_id": "1", "kind": "events", "drop": "LOST"}, "unknown task status LOST"),
        ([], "a fault must be a JSON object"),
    ],
)
def test_parse_fault_names_what_is_wrong(body, says):
    with pytest.raises(UsageError, match=says):
        parse_fault(body)


def test_a_jobs_faults_are_used_up_and_every_job_faults_stay():
    registry = FaultRegistry()
    mine = parse_fault({"job_id": "5", "kind": "fail-to-start"})
    everyone = parse_fault({"job_id": "*", "kind": "sshd-delay", "seconds": 1})
    registry.arm(mine)
    registry.arm(everyone)

    assert registry.take("6") == [everyone]
    assert registry.take("5") == [mine, everyone]
    assert registry.take("5") == [everyone]
    assert registry.take(None) == [everyone]
    assert registry.clear() == 1 and registry.take("5") == []


# --- events -------------------------------------------------------------------------------------------


def _detail(version: int, status: str) -> dict:
    return {"version": version, "lastStatus": status}


def test_event_faults_drop_duplicate_and_reorder():
    dropping = EventFaults(drop={"RUNNING"})
    assert dropping.apply(_detail(3, "RUNNING"), final=False) == []
    assert dropping.apply(_detail(4, "STOPPING"), final=False) == [_detail(4, "STOPPING")]

    doubling = EventFaults(duplicate=True)
    assert doubling.apply(_detail(1, "PENDING"), final=False) == [_detail(1, "PENDING")] * 2

    swapping = EventFaults(reorder=True)
    delivered = []
    for version, status in enumerate(["PROVISIONING", "PENDING", "RUNNING", "STOPPING", "STOPPED"], 1):
        delivered += swapping.apply(_detail(version, status), final=status == "STOPPED")
    assert [d["version"] for d in delivered] == [2, 1, 4, 3, 5]


def test_reordering_never_loses_the_last_event():
    swapping = EventFaults(reorder=True)
    assert swapping.apply(_detail(1, "PROVISIONING"), final=False) == []
    assert swapping.apply(_detail(2, "STOPPED"), final=True) == [
        _detail(2, "STOPPED"),
        _detail(1, "PROVISIONING"),
    ]


# --- addresses ----------------------------------------------------------------------------------------


def test_addresses_skip_reserved_and_used_ones_and_run_out_cleanly():
    allocator = AddressAllocator()
    first = [allocator.allocate("127.50.1.0/29") for _ in range(3)]
    assert first == ["127.50.1.4", "127.50.1.5", "127.50.1.6"]  # .0-.3 and .7 (broadcast) are AWS's
    with pytest.raises(RuntimeError, match="no free address"):
        allocator.allocate("127.50.1.0/29")
    allocator.release("127.50.1.5")
    assert allocator.allocate("127.50.1.0/29") == "127.50.1.5"


def test_addresses_go_round_robin_before_reusing_one():
    allocator = AddressAllocator()
    a = allocator.allocate("127.50.2.0/24")
    allocator.release(a)
    assert allocator.allocate("127.50.2.0/24") != a


# --- SigV4 --------------------------------------------------------------------------------------------

IDENTITY = Identity("sandbox", "arn:aws:iam::123456789012:user/runner-a", "AIDAX", "AKIATEST", "s3cret")
IDENTITIES = {IDENTITY.access_key: IDENTITY}
URL = "http://127.0.0.1:9/api/jobs/r-1/heartbeat"


def _signed(
    body: bytes = b"{}", secret: str | None = None, region: str = "eu-west-1", **headers: str
) -> dict:
    request = AWSRequest(
        method="POST", url=URL, data=body, headers={"Content-Type": "application/json", **headers}
    )
    SigV4Auth(Credentials("AKIATEST", secret or IDENTITY.secret_key), "execute-api", region).add_auth(request)
    return {"Host": "127.0.0.1:9", **dict(request.headers.items())}  # the HTTP client adds Host


def test_a_botocore_signature_verifies_and_names_the_caller():
    headers = _signed()
    assert verify(IDENTITIES, "eu-west-1", "POST", URL, headers, b"{}") is IDENTITY
    assert IDENTITY.request_context()["userArn"] == "arn:aws:iam::123456789012:user/runner-a"


def test_headers_the_client_did_not_sign_may_change():
    headers = _signed()
    headers["User-Agent"] = "something else"
    assert verify(IDENTITIES, "eu-west-1", "POST", URL, headers, b"{}") is IDENTITY


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda h, b: (h, b'{"x": 1}'), "does not match"),
        (lambda h, b: ({**h, "Content-Type": "text/plain"}, b), "does not match"),
        (
            lambda h, b: ({k: v for k, v in h.items() if k != "Authorization"}, b),
            "Missing Authentication Token",
        ),
        (lambda h, b: ({**h, "Authorization": "Bearer abc"}, b), "not a valid AWS4-HMAC-SHA256"),
        (
            lambda h, b: ({**h, "Authorization": h["Authorization"].replace("AKIATEST", "AKIAOTHER")}, b),
            "invalid",
        ),
        (
            lambda h, b: ({**h, "X-Amz-Content-SHA256": hashlib.sha256(b"other").hexdigest()}, b),
            "x-amz-content",
        ),
    ],
    ids=["body", "signed-header", "unsigned", "not-sigv4", "unknown-key", "declared-hash"],
)
def test_any_change_to_a_signed_request_is_rejected(change, says):
    headers, body = change(_signed(), b"{}")
    with pytest.raises(SignatureRejected, match=says):
        verify(IDENTITIES, "eu-west-1", "POST", URL, headers, body)


def test_wrong_secret_region_and_clock_skew_are_rejected():
    with pytest.raises(SignatureRejected, match="does not match"):
        verify(IDENTITIES, "eu-west-1", "POST", URL, _signed(secret="nope"), b"{}")
    with pytest.raises(SignatureRejected, match="region"):
        verify(IDENTITIES, "eu-west-1", "POST", URL, _signed(region="us-east-1"), b"{}")
    later = datetime.now(UTC) + timedelta(minutes=6)
    with pytest.raises(SignatureRejected, match="expired"):
        verify(IDENTITIES, "eu-west-1", "POST", URL, _signed(), b"{}", now=later)


def _signed_with(credentials: Credentials) -> dict:
    request = AWSRequest(method="POST", url=URL, data=b"{}", headers={"Content-Type": "application/json"})
    SigV4Auth(credentials, "execute-api", "eu-west-1").add_auth(request)
    return {"Host": "127.0.0.1:9", **dict(request.headers.items())}


def test_each_role_session_is_its_own_assumed_role_caller_and_only_its_own_credentials_verify():
    sts = RoleSessions(b"role-secret", "123456789012", "ci-runner", "sandbox-role")
    one, two = sts.mint("session-1"), sts.mint("session-2")

    for session, name in ((one, "session-1"), (two, "session-2")):
        credentials = Credentials(session.access_key, session.secret_key, session.session_token)
        who = verify(IDENTITIES, "eu-west-1", "POST", URL, _signed_with(credentials), b"{}", sessions=sts)
        assert who.user_arn == f"arn:aws:sts::123456789012:assumed-role/ci-runner/{name}"
        assert who.request_context()["caller"].endswith(f":{name}")
    forged = [
        Credentials(one.access_key, two.secret_key, one.session_token),  # another session's secret
        Credentials(one.access_key, one.secret_key, two.session_token),  # another session's token
        Credentials(one.access_key, one.secret_key, None),  # no token
        Credentials(IDENTITY.access_key, IDENTITY.secret_key, one.session_token),  # a user's key, a token
    ]
    for credentials in forged:
        with pytest.raises(SignatureRejected):
            verify(IDENTITIES, "eu-west-1", "POST", URL, _signed_with(credentials), b"{}", sessions=sts)
    other_role = RoleSessions(b"another secret", "123456789012", "ci-runner", "sandbox-role")
    credentials = Credentials(one.access_key, one.secret_key, one.session_token)
    with pytest.raises(SignatureRejected, match="does not match"):
        verify(IDENTITIES, "eu-west-1", "POST", URL, _signed_with(credentials), b"{}", sessions=other_role)
    with pytest.raises(ValueError, match="session name"):
        sts.mint("a/b")


# --- driver configuration and the container command line ---------------------------------------------


def test_driver_config_is_valid_toml_even_for_odd_paths():
    state = {
        "cluster": "fargate-ci",
        "region": "eu-west-1",
        "metadata_dir": '/tmp/a "quoted" dir/metadata',
        "ssh_user": "root",
        "ssh_port": 2222,
        "api_url": "http://127.0.0.1:1/api",
        "credentials_file": "/tmp/x\\y/credentials",
    }
    config = tomllib.loads(driver_config(state))
    assert config["TaskMetadata"]["Directory"] == state["metadata_dir"]
    assert config["Orchestrator"]["SharedCredentialsFile"] == state["credentials_file"]
    assert config["Orchestrator"]["Profile"] == "sandbox" and config["SSH"]["Port"] == 2222


def test_the_container_is_confined_unprivileged_and_its_secrets_stay_out_of_argv(tmp_path: Path):
    image = Image(
        name="docker.io/library/busybox",
        binds=(("/srv/images/busybox/bin", "/bin"),),
        files=(("/srv/entrypoint.sh", "/run/image/entrypoint.sh"),),
        read_only_root=True,
    )
    spec = ContainerSpec(
        task_id="t1",
        name="ci-coordinator",
        hostname="ip-127-42-1-4",
        image=image,
        host_dir=tmp_path / "tasks" / "t1",
        command=("/entrypoint.sh",),
        env={"SSH_HOST_KEY": "-----BEGIN OPENSSH PRIVATE KEY-----secret"},
        log_path=tmp_path / "t1.log",
    )
    argv = bwrap_argv(spec, info_fd=7, seccomp_fd=8, ns_fds=None)
    joined = " ".join(argv)
    for flag in ("--die-with-parent", "--unshare-user", "--uid 0", "--unshare-pid", "--unshare-ipc",
                 "--unshare-uts", "--remount-ro /", "--seccomp 8"):  # fmt: skip
        assert flag in joined
    assert "--cap-drop ALL" in joined and "CAP_SYS_ADMIN" not in joined
    # The root is a tmpfs holding the image's directories, never a host directory as a whole.
    assert "--tmpfs / " in joined and "--ro-bind / /" not in joined
    assert "--ro-bind /srv/images/busybox/bin /bin" in joined
    # The entrypoint is bound after /run's tmpfs, or the tmpfs would hide it.
    assert joined.index("--tmpfs /run") < joined.index(
        "--ro-bind /srv/entrypoint.sh /run/image/entrypoint.sh"
    )
    assert f"--bind {tmp_path}/tasks/t1/builds /builds" in joined
    assert "secret" not in joined
    assert argv[-2:] == ["--", "/entrypoint.sh"]

    # A second container of the task joins the first one's user and PID namespaces instead.
    joined = " ".join(bwrap_argv(spec, info_fd=7, seccomp_fd=8, ns_fds=(9, 10)))
    assert (
        "--userns 9 --pidns 10" in joined and "--unshare-user" not in joined and "--unshare-pid" not in joined
    )


def _in_user_namespace(script: str, seccomp: bytes | None) -> subprocess.CompletedProcess:
    with tempfile.TemporaryFile() as program:
        program.write(seccomp or b"")
        program.seek(0)
        argv = ["bwrap", "--unshare-user", "--uid", "0", "--gid", "0", "--ro-bind", "/", "/", "--dev", "/dev"]
        if seccomp is not None:
            argv += ["--seccomp", str(program.fileno())]
        return subprocess.run(
            [*argv, sys.executable, "-c", script],
            pass_fds=(program.fileno(),),
            capture_output=True,
            text=True,
            timeout=30,
        )


def test_the_seccomp_filter_fakes_setgroups_only():
    """setgroups, refused in an unprivileged user namespace, "succeeds" under the filter and changes
    nothing; other calls still fail as they should (the filter is not a blanket allow-with-0)."""
    script = (
        "import os\n"
        "before = os.getgroups()\n"
        "try:\n    os.setgroups([0])\n    print('setgroups ok', os.getgroups() == before)\n"
        "except OSError as e:\n    print('setgroups', e.errno)\n"
        "try:\n    os.setuid(4242)\nexcept OSError as e:\n    print('setuid', e.errno)\n"
    )
    without = _in_user_namespace(script, None)
    assert "setgroups 1" in without.stdout, without.stderr  # EPERM: why the sandbox needs the filter
    result = _in_user_namespace(script, seccomp_program())
    assert result.returncode == 0, result.stderr
    assert "setgroups ok True" in result.stdout
    assert "setuid 22" in result.stdout  # EINVAL: 4242 is not mapped, and the filter did not hide it


def test_a_joining_container_whose_bwrap_dies_before_starting_is_launched_again(tmp_path: Path, caplog):
    # Joining the namespaces of a process that is not a task's (this test's own: the host's user namespace)
    # makes bwrap fail before it starts anything, as its PID-socket handshake sometimes does under load.
    caplog.set_level(logging.WARNING, logger="sandbox.task")
    image = Image(name="docker.io/library/busybox", binds=())
    spec = ContainerSpec(
        task_id="t9",
        name="job",
        hostname="ip-127-42-1-9",
        image=image,
        host_dir=tmp_path / "tasks" / "t9",
        command=("/bin/sh",),
        env={},
        log_path=tmp_path / "t9.job.log",
        join_pid=os.getpid(),
    )
    launcher = ContainerLauncher()
    try:
        container = launcher.start(spec)
    finally:
        launcher.close()

    assert container.wait(timeout=10) not in (None, 0)  # it did fail, twice
    assert [r.getMessage() for r in caplog.records] == [
        "container job of task t9: bwrap failed to start; launching it again"
    ]
    assert spec.log_path.read_text().count("bwrap:") >= 2  # both attempts' own words, in its log


def test_a_joining_container_waits_for_the_user_namespaces_id_maps():
    # A user namespace whose maps nobody writes (unshare -U alone) never gets them; one unshare maps (-r) has
    # them at once: what bwrap's first container has a moment after it reports its pid.
    unmapped = subprocess.Popen(["unshare", "-U", "sleep", "30"])
    mapped = subprocess.Popen(["unshare", "-Ur", "sleep", "30"])
    try:
        ours = os.readlink("/proc/self/ns/user")
        for process in (unmapped, mapped):  # until each has entered its own user namespace
            wait_until(lambda p=process: os.readlink(f"/proc/{p.pid}/ns/user") != ours, timeout=10)
        assert wait_for_id_maps(mapped.pid, timeout=2)
        started = time.monotonic()
        assert not wait_for_id_maps(unmapped.pid, timeout=0.3)
        assert time.monotonic() - started >= 0.3
    finally:
        for process in (unmapped, mapped):
            process.kill()
            process.wait()
    assert not wait_for_id_maps(mapped.pid, timeout=0.1)  # gone
