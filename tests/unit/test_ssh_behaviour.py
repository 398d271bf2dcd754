"""What the SSH adapter tells the job log and the runner when a login fails, and how a stage's script and
output travel, against a real OpenSSH sshd on loopback (the server of test_driver_ssh_pinning.py)."""

from __future__ import annotations

import base64
import hashlib
import io
import logging

import pytest

from fargate_ci_driver.errors import HostKeyMismatch, SshError, SshUnavailable
from fargate_ci_driver.ssh import PID_MARKER, READ_SIZE, TaskConnection, _take_pid
from tests.unit.test_driver_ssh_pinning import Sshd, _keypair, kill_running_stage
from tests.unit.test_driver_ssh_pinning import pytestmark as needs_sshd

pytestmark = needs_sshd


@pytest.fixture
def sshd(tmp_path):
    server = Sshd(tmp_path)
    yield server
    server.stop()


def fingerprint(public_line: str) -> str:
    return hashlib.md5(base64.b64decode(public_line.split()[1])).hexdigest()  # noqa: S324 (paramiko's)


def test_another_host_key_is_named_with_its_fingerprint_and_refused(sshd):
    _, stranger = _keypair()

    with pytest.raises(HostKeyMismatch) as caught:
        sshd.connection(host_public=stranger).connect()

    assert str(caught.value) == (
        f"root@127.0.0.1:{sshd.port} presented host key {fingerprint(sshd.host_public)} (ssh-ed25519), "
        "not the one pinned for this job: refusing to connect"
    )


def test_a_host_with_only_another_key_type_is_refused_naming_it(tmp_path):
    server = Sshd(tmp_path, host_key_type="rsa")
    try:
        _, pinned = _keypair()
        with pytest.raises(HostKeyMismatch) as caught:
            server.connection(host_public=pinned).connect()
    finally:
        server.stop()

    assert str(caught.value).startswith(f"root@127.0.0.1:{server.port} presented host key ")
    assert str(caught.value).endswith(" (ssh-rsa), not the one pinned for this job: refusing to connect")


def test_a_key_the_task_does_not_authorise_is_an_ssh_error_not_unavailable(sshd):
    other_private, _ = _keypair()
    connection = TaskConnection("127.0.0.1", sshd.port, "root", other_private, sshd.host_public, timeout=5.0)

    with pytest.raises(SshError) as caught:
        connection.connect()

    assert not isinstance(caught.value, SshUnavailable)  # prepare counts these, and gives up after a few
    assert str(caught.value).startswith(
        f"root@127.0.0.1:{sshd.port}: authentication with the job's key failed"
    )


def test_an_unusable_client_key_is_named_without_its_content(sshd):
    connection = TaskConnection("127.0.0.1", sshd.port, "root", "not a key", sshd.host_public, timeout=5.0)

    with pytest.raises(SshError) as caught:
        connection.connect()

    assert str(caught.value).startswith("the job's client key is unusable: ")
    assert "not a key" not in str(caught.value)


@pytest.mark.parametrize("line", ["ssh-ed25519", "ssh-ed25519 !!!not-base64!!!", "ssh-ed25519 AAAA"])
def test_a_malformed_pinned_key_is_refused_before_connecting(sshd, line):
    with pytest.raises(SshError, match="the pinned host key is"):
        sshd.connection(host_public=line).connect()


def test_nothing_listening_names_where_and_why(sshd):
    # Port 1: nothing listens there, and it is outside the ephemeral range a self-connect could use.
    connection = TaskConnection("127.0.0.1", 1, "root", sshd.client_private, sshd.host_public, timeout=5.0)

    with pytest.raises(SshUnavailable) as caught:
        connection.connect()

    assert str(caught.value) == "root@127.0.0.1:1: Connection refused"


def test_a_connection_that_was_never_made_or_is_closed_refuses_work(sshd):
    connection = sshd.connection()
    assert not connection.is_active()
    with pytest.raises(SshError, match=r"^not connected$"):
        connection.check()

    connection.connect()
    assert connection.is_active()
    connection.close()
    connection.close()  # twice is fine

    assert not connection.is_active()
    with pytest.raises(SshError, match=r"^not connected$"):
        connection.run_script(io.BytesIO(b"true\n"), "sh", io.BytesIO(), io.BytesIO())
    with pytest.raises(SshError, match=r"^not connected$"):
        connection.kill_process_group(12345)


def test_a_script_and_its_output_larger_than_one_read_arrive_whole_and_in_order(sshd):
    lines = [f"echo line-{i:06d}" for i in range(20000)]  # ~300 kB of script, ~220 kB of output
    script = io.BytesIO(("\n".join(lines) + "\necho done >&2\n").encode())
    stdout, stderr = io.BytesIO(), io.BytesIO()

    with sshd.connection() as connection:
        status = connection.run_script(script, "sh", stdout, stderr)

    assert status == 0
    expected = "".join(f"line-{i:06d}\n" for i in range(20000)).encode()
    assert len(expected) > 4 * READ_SIZE
    assert stdout.getvalue() == expected
    assert stderr.getvalue() == b"done\n"


def test_a_stage_without_a_started_callback_still_runs(sshd):
    stdout = io.BytesIO()

    with sshd.connection() as connection:
        status = connection.run_script(
            io.BytesIO(b"printf 'no newline'; exit 7\n"), "sh", stdout, io.BytesIO()
        )

    assert (status, stdout.getvalue()) == (7, b"no newline")


def test_a_stage_whose_shell_does_not_exist_reports_the_shells_failure(sshd):
    stderr = io.BytesIO()

    with sshd.connection() as connection:
        status = connection.run_script(io.BytesIO(b"true\n"), "/nonexistent/shell", io.BytesIO(), stderr)

    assert status == 127 or status == 126 or status == 2
    assert b"nonexistent" in stderr.getvalue()


def test_a_stage_that_ignores_sigterm_is_killed_after_the_grace(sshd, caplog):
    caplog.set_level(logging.INFO, logger="fargate_driver")

    status, pid, left = kill_running_stage(sshd, b"trap '' TERM; sleep 300 & wait; sleep 300\n", grace=0.3)

    assert status != 0
    assert not left
    (line,) = [r for r in caplog.records if r.getMessage() == "remote stage killed"]
    assert line.fields == {"host": "127.0.0.1", "pid": pid}


def test_a_number_a_login_script_prints_before_the_marker_is_output_not_the_pid():
    number = b"1" * (len(PID_MARKER) + 5)  # as long as the marker, and then some digits
    head = number + b"\n" + PID_MARKER + b"4242\nrest"

    assert _take_pid(head) == (4242, b"rest", number + b"\n")
