"""The one module that owns paramiko (fabric's idea): connecting to a task with its pinned host key, running
a stage script piped to the remote shell's stdin, and killing the remote stage's process group.

paramiko is imported inside `TaskConnection.connect`, so `run` pays for it only when it connects.
"""

from __future__ import annotations

import base64
import contextlib
import io
import select
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, BinaryIO

from fargate_ci_driver.errors import HostKeyMismatch, SshError, SshUnavailable
from fargate_ci_driver.logs import fields, log

if TYPE_CHECKING:
    import paramiko

READ_SIZE = 32768
# The exec command's first line: the remote shell's PID, which is also its process group.
PID_MARKER = b"fargate-ci-stage-pid="
# How long a stage's remote process group gets between SIGTERM and SIGKILL after a cancel.
KILL_GRACE_SECONDS = 2.0


# GitLab's Docker executor picks the job's shell this way (gitlab-runner shells/bash.go,
# BashDetectShellScript): bash where the image has it, else sh. Any image can run a job.
BASH_OR_SH = (
    "/usr/local/bin/bash", "/usr/bin/bash", "/bin/bash",
    "/usr/local/bin/sh", "/usr/bin/sh", "/bin/sh", "/busybox/sh",
)  # fmt: skip


def shell_exec(shell: str) -> str:
    """The command that turns a stage's exec channel into its shell: `[SSH] Shell` as configured, except the
    default `bash`, which is bash where present, else sh."""
    if shell != "bash":
        return f"exec {shell}"
    tries = "; ".join(f"[ -x {path} ] && exec {path}" for path in BASH_OR_SH)
    return f"{tries}; echo 'shell not found' >&2; exit 1"


class TaskConnection:
    """One SSH connection to one job's task. Never trusts a host key it was not given."""

    def __init__(
        self,
        host: str,
        port: int,
        user: str,
        client_key_pem: str,
        host_public_key: str,
        timeout: float = 10.0,
    ) -> None:
        self.host = host
        self.port = port
        self.user = user
        self._client_key_pem = client_key_pem
        self.host_public_key = host_public_key
        self.timeout = timeout
        self._client = None

    def __enter__(self) -> TaskConnection:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        import paramiko

        client = paramiko.SSHClient()
        # RejectPolicy plus the pinned key: any other key, or a key of another type, is refused.
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        pinned = _public_key(self.host_public_key)
        for name in {self.host, f"[{self.host}]:{self.port}"}:
            client.get_host_keys().add(name, pinned.get_name(), pinned)
        client_key = _client_key(self._client_key_pem)
        where = f"{self.user}@{self.host}:{self.port}"
        try:
            sock = _nodelay_socket(self.host, self.port, self.timeout)
        except OSError as exc:
            client.close()
            raise SshUnavailable(f"{where}: {exc.strerror or exc}") from None
        try:
            client.connect(
                self.host,
                port=self.port,
                sock=sock,
                username=self.user,
                pkey=client_key,
                timeout=self.timeout,
                banner_timeout=self.timeout,
                auth_timeout=self.timeout,
                allow_agent=False,
                look_for_keys=False,
            )
        except paramiko.BadHostKeyException as exc:
            client.close()
            sock.close()
            raise HostKeyMismatch(
                f"{where} presented host key {exc.key.get_fingerprint().hex()} ({exc.key.get_name()}), "
                f"not the one pinned for this job: refusing to connect"
            ) from None
        except paramiko.AuthenticationException as exc:
            client.close()
            sock.close()
            raise SshError(f"{where}: authentication with the job's key failed: {exc}") from None
        except paramiko.SSHException as exc:
            client.close()
            sock.close()
            if "known_hosts" in str(exc):
                raise HostKeyMismatch(
                    f"{where} did not offer the pinned ed25519 host key: refusing"
                ) from None
            raise SshUnavailable(f"{where}: {exc}") from None
        except (OSError, EOFError) as exc:
            client.close()
            sock.close()
            raise SshUnavailable(
                f"{where}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}"
            ) from None
        transport = client.get_transport()
        # A dead task network otherwise goes unnoticed until TCP gives up.
        transport.set_keepalive(15)
        self._client = client

    def is_active(self) -> bool:
        """Whether the SSH transport is still up (it dies with the task's sshd or its network)."""
        transport = self._client.get_transport() if self._client is not None else None
        return transport is not None and transport.is_active()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _session(self) -> paramiko.Channel:
        import paramiko

        if self._client is None:
            raise SshError("not connected")
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise SshError(f"the connection to {self.host} was lost")
        try:
            return transport.open_session(timeout=self.timeout)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise SshError(f"cannot open a session on {self.host}: {exc}") from None

    def check(self) -> None:
        """Prove the login works end to end: run `true`."""
        import paramiko

        channel = self._session()
        try:
            channel.settimeout(self.timeout)
            channel.exec_command("true")
            status = _exit_status(channel, self.timeout)
        except (paramiko.SSHException, EOFError, OSError) as exc:  # a timeout or a dropped connection
            raise SshUnavailable(f"{self.host}: `true` did not complete: {exc}") from None
        finally:
            channel.close()
        if status != 0:
            raise SshError(f"{self.host}: `true` exited {status}: the task's shell for {self.user} is broken")

    def run_script(
        self,
        script: BinaryIO,
        shell: str,
        stdout: BinaryIO,
        stderr: BinaryIO,
        on_started: Callable[[int], None] | None = None,
    ) -> int:
        """Pipe `script` to `shell` on the task, streaming output; returns the remote exit status.

        The exec command only prints the remote shell's PID and execs the shell, so the script's size is not
        bounded by the exec argument limit. Without a PTY, sshd makes that shell a session and process-group
        leader, which is what `kill_process_group` uses. Returns -1 when the channel closed without a status.
        """
        import paramiko

        channel = self._session()
        try:
            channel.exec_command(f"echo {PID_MARKER.decode()}$$; {shell_exec(shell)}")
        except (paramiko.SSHException, EOFError, OSError) as exc:  # the session went away
            channel.close()
            raise SshError(f"{self.host}: cannot start {shell}: {exc}") from None
        feeder = threading.Thread(target=_feed, args=(channel, script), name="ssh-stdin", daemon=True)
        feeder.start()
        head = b""
        pid_known = False
        try:
            while True:
                select.select([channel], [], [], 1.0)
                # Data always arrives before EOF, so once EOF is seen, draining the buffers drains everything.
                finished = channel.eof_received or channel.closed
                while channel.recv_stderr_ready():
                    stderr.write(channel.recv_stderr(READ_SIZE))
                    stderr.flush()
                while channel.recv_ready():
                    data = channel.recv(READ_SIZE)
                    if not pid_known:
                        # Anything a login script prints before the marker is the job's output.
                        head += data
                        pid, head, data = _take_pid(head)
                        pid_known = pid is not None or len(head) > READ_SIZE
                        if pid_known:
                            data, head = data + head, b""
                        if pid is not None and on_started is not None:
                            on_started(pid)
                    if data:
                        stdout.write(data)
                        stdout.flush()
                if finished and not channel.recv_ready() and not channel.recv_stderr_ready():
                    break
            # The status follows EOF at once; a peer that never sends it must not hang the stage.
            return _exit_status(channel, self.timeout)
        finally:
            channel.close()

    def kill_process_group(self, pid: int, grace: float = KILL_GRACE_SECONDS) -> None:
        """SIGTERM the remote stage's process group, then SIGKILL what is left after `grace` seconds."""
        import paramiko

        steps = max(1, int(grace / 0.1))
        command = (
            f"kill -s TERM -- -{pid} 2>/dev/null; i=0; "
            f"while kill -s 0 -- -{pid} 2>/dev/null && [ $i -lt {steps} ]; do sleep 0.1; i=$((i+1)); done; "
            f"kill -s KILL -- -{pid} 2>/dev/null; true"
        )
        channel = self._session()
        try:
            channel.settimeout(grace + self.timeout)
            channel.exec_command(command)
            _exit_status(channel, grace + self.timeout)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise SshError(f"{self.host}: cannot kill the stage's processes: {exc}") from None
        finally:
            channel.close()
        log.info("remote stage killed", extra=fields(host=self.host, pid=pid))


def _nodelay_socket(host: str, port: int, timeout: float) -> QuickAckSocket:
    """paramiko does not set TCP_NODELAY; without it Nagle plus delayed ACKs can add ~40 ms per exchange."""
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return QuickAckSocket(sock)


# Linux only; elsewhere the socket is used as it is.
_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class QuickAckSocket:
    """The task's socket as paramiko uses it, acknowledging what it reads at once. The other end matters too:
    sshd sets TCP_NODELAY only for sessions with a TTY, so a small message it sends right after another
    waits (Nagle) until that one is acknowledged, and Linux delays an acknowledgement up to 40 ms when the
    reader has nothing to send. After login sshd sends its hostkeys-00@openssh.com notice, so the first
    session's confirmation waited exactly that long (measured: 44 ms, 2 ms with this). TCP_QUICKACK is not
    sticky (the kernel may go back to delaying), hence set again after every read."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def recv(self, size: int, *flags: int) -> bytes:
        data = self._sock.recv(size, *flags)
        if _TCP_QUICKACK is not None:
            with contextlib.suppress(OSError):  # closed meanwhile: the next read says so
                self._sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
        return data

    def __getattr__(self, name: str) -> object:  # send, settimeout, close, fileno, ...: the socket's own
        return getattr(self._sock, name)


def _exit_status(channel: paramiko.Channel, timeout: float) -> int:
    """The remote exit status; -1 when the channel closed without one or it did not come in time."""
    if not channel.status_event.wait(timeout):
        return -1
    return channel.recv_exit_status()


def _feed(channel: paramiko.Channel, script: BinaryIO) -> None:
    """Send the script on stdin in its own thread: the remote shell reads it only as it runs, and the main
    thread must keep draining output meanwhile or both sides stall on full windows."""
    import paramiko

    try:
        while chunk := script.read(READ_SIZE):
            channel.sendall(chunk)
        channel.shutdown_write()
    except (paramiko.SSHException, OSError, EOFError, ValueError) as exc:  # the main loop reports it
        log.debug("stdin feed stopped", extra=fields(error=str(exc)))


def _take_pid(head: bytes) -> tuple[int | None, bytes, bytes]:
    """Split the start of stdout into (pid, unread rest, output to pass on): complete lines before the
    marker line are output; the marker line itself is swallowed."""
    output = b""
    while b"\n" in head:
        line, _, head = head.partition(b"\n")
        if line.startswith(PID_MARKER) and line[len(PID_MARKER) :].strip().isdigit():
            return int(line[len(PID_MARKER) :]), head, output
        output += line + b"\n"
    return None, head, output


CERTIFICATE_TYPE = "ssh-ed25519-cert-v01@openssh.com"


def _client_key(text: str) -> paramiko.Ed25519Key:
    """The job's client key from its key file: the private key (OpenSSH PEM) and, after it, the certificate
    the orchestrator's CA issued for it (the task's sshd accepts only that)."""
    import paramiko

    certificate = next((ln for ln in text.splitlines() if ln.startswith(CERTIFICATE_TYPE + " ")), None)
    try:
        key = paramiko.Ed25519Key.from_private_key(io.StringIO(text))
        if certificate is not None:
            key.load_certificate(certificate)
    except (paramiko.SSHException, ValueError) as exc:
        raise SshError(f"the job's client key is unusable: {type(exc).__name__}") from None
    return key


def _public_key(line: str) -> paramiko.Ed25519Key:
    import paramiko

    parts = line.split()
    if len(parts) < 2 or parts[0] != "ssh-ed25519":
        raise SshError("the pinned host key is not an ssh-ed25519 public key line")
    try:
        return paramiko.Ed25519Key(data=base64.b64decode(parts[1], validate=True))
    except (ValueError, paramiko.SSHException) as exc:
        raise SshError(f"the pinned host key is malformed: {exc}") from None
