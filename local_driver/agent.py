"""The session agent: one process per metadata directory that holds one SSH connection per job, so the
nine or so `run` stages of a job pay one handshake instead of nine, and paramiko and botocore are loaded once
per runner manager instead of once per stage (`agent_client` is the `run` side and describes the protocol).

    python -m local_driver.agent --dir METADATA_DIR [--job-idle S] [--exit-idle S] [--open JOB_KEY]
    python -m local_driver.agent --dir METADATA_DIR --stop

It listens on `<dir>/agent-2.sock` (0600 in the 0700 directory; peers of another uid are refused) and takes
`<dir>/agent-2.lock`, so there is one agent per directory (2: the protocol's version). It reads a job's
address, pinned host key and client key from the same files `run` would, and reconnects when they change. It
heartbeats a job only while a `run` client for it is connected: a runner manager killed mid-job stops the
heartbeats, and the orchestrator's reaper stops the task. A job's connection goes at cleanup ("drop"), when
its task stops (the transport dies), when its state file is gone, or after --job-idle seconds without a stage.
The agent exits --exit-idle seconds after its last job and client (staying warm for the next job meanwhile),
when asked to, or when its directory is removed. It also signs API requests for the directory's driver
processes ("sign"), so that `prepare` and `cleanup` need not load botocore, tries a starting task's sshd for
`prepare` ("open" with "wait"), and sends prepare's ready report ("ready"). It logs to `<dir>/agent.log`,
never a key.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from local_driver import agent_client
from local_driver.agent_client import AgentGone, Lines
from local_driver.api import ApiClient
from local_driver.errors import ConfigError, DriverError, HostKeyMismatch, SshError, SshUnavailable
from local_driver.heartbeat import HEARTBEAT_TIMEOUT, Heartbeat
from local_driver.job import job_key
from local_driver.logs import fields, log, setup
from local_driver.metadata import MetadataDir
from local_driver.settings import Settings
from local_driver.settings import load as load_settings
from local_driver.ssh import TaskConnection

# A job's connection is dropped after this long without a stage. GitLab Runner starts a job's stages back to
# back, so a live job rarely waits even seconds; a held connection keeps the task's watchdog from stopping a
# job whose runner is gone (its cleanup never ran), so this adds straight to how long such a task lives.
DEFAULT_JOB_IDLE = 30.0
DEFAULT_EXIT_IDLE = 60.0
CONNECT_TIMEOUT = 10.0
# prepare's SSH check may ask the agent to keep trying a task whose sshd is not listening yet: this often,
# for at most this long per request.
SSH_RETRY_SECONDS = 0.02
MAX_SSH_WAIT = 5.0
HOUSEKEEPING_SECONDS = 1.0
# How often the accept loop looks up, e.g. to notice it was asked to stop.
ACCEPT_TIMEOUT = 0.2
# A cancel that arrives before the remote shell has reported its PID waits this long for it.
PID_WAIT = 10.0


@dataclass
class JobSession:
    key: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    connection: TaskConnection | None = None
    fingerprint: tuple = ()
    active: int = 0
    connections: int = 0
    stages: int = 0
    heartbeats: int = 0
    last_beat: float | None = None
    last_used: float = field(default_factory=time.monotonic)

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


class Agent:
    def __init__(
        self, directory: str, job_idle: float = DEFAULT_JOB_IDLE, exit_idle: float = DEFAULT_EXIT_IDLE
    ):
        self.directory = directory
        self.metadata = MetadataDir(directory)
        self.job_idle = job_idle
        self.exit_idle = exit_idle
        self.sessions: dict[str, JobSession] = {}
        self.lock = threading.Lock()
        self.clients = 0
        self.signed = 0
        # Heartbeats, signatures and reports use the agent's AWS credentials: it serves only driver processes
        # whose environment leads to the same ones, and retires when the runner's changes (keys rotated).
        self.credentials = credentials_digest(os.environ)
        self.retiring = threading.Event()
        self.last_activity = time.monotonic()
        self.stopping = threading.Event()
        self._apis: dict[tuple, ApiClient] = {}
        self._settings: dict[str, tuple[tuple, Settings]] = {}

    # --- the job connections ---

    def session(self, key: str, timeout: float = CONNECT_TIMEOUT) -> JobSession:
        """The job's session with a live connection to its task (connecting if need be), marked active.
        Raises DriverError when the job's state is missing or the task cannot be reached."""
        state = self.metadata.load(key)
        if state is None or not state.address:
            raise DriverError(f"job {key} has no running task on record")
        pem = self.metadata.load_client_key(key)
        fingerprint = (
            state.address,
            state.ssh_port,
            state.ssh_user,
            state.host_public_key,
            hashlib.sha256(pem.encode()).hexdigest(),
        )
        with self.lock:
            session = self.sessions.setdefault(key, JobSession(key))
            session.active += 1
        try:
            with session.lock:
                if session.connection is not None and (
                    session.fingerprint != fingerprint or not session.connection.is_active()
                ):
                    log.info("job connection replaced", extra=fields(job_key=key))
                    session.close()
                if session.connection is None:
                    connection = TaskConnection(
                        state.address,
                        state.ssh_port,
                        state.ssh_user,
                        pem,
                        state.host_public_key,
                        timeout=timeout,
                    )
                    connection.connect()
                    session.connection, session.fingerprint = connection, fingerprint
                    session.connections += 1
                    log.info("job connected", extra=fields(job_key=key, address=state.address))
        except BaseException:
            self.release(session)
            raise
        return session

    def open_checked(self, key: str, timeout: float, wait: float = 0.0) -> dict:
        """prepare's SSH check: connect (or reuse the connection) and run `true`; the errors by kind. While
        sshd is not listening yet, try again every SSH_RETRY_SECONDS for up to `wait` seconds, so prepare
        learns within milliseconds that the task's sshd is up rather than at its next look at the API."""
        deadline = time.monotonic() + wait
        while True:
            answer = self._open_checked_once(key, timeout)
            if answer.get("kind") != "unavailable" or time.monotonic() + SSH_RETRY_SECONDS > deadline:
                return answer
            if self.stopping.wait(SSH_RETRY_SECONDS):
                return answer

    def _open_checked_once(self, key: str, timeout: float) -> dict:
        try:
            session = self.session(key, timeout)
        except HostKeyMismatch as exc:
            return {"kind": "hostkey", "error": str(exc)}
        except SshUnavailable as exc:
            return {"kind": "unavailable", "error": str(exc)}
        except SshError as exc:
            return {"kind": "ssh", "error": str(exc)}
        except DriverError as exc:
            return {"kind": "state", "error": str(exc)}
        try:
            session.connection.check()
        except SshError as exc:
            self.drop(key, "its check failed")
            return {"kind": "unavailable" if isinstance(exc, SshUnavailable) else "ssh", "error": str(exc)}
        finally:
            self.release(session)
        return {"ok": True}

    def release(self, session: JobSession) -> None:
        with self.lock:
            session.active -= 1
            session.last_used = time.monotonic()

    def drop(self, key: str, why: str) -> bool:
        with self.lock:
            session = self.sessions.pop(key, None)
            self.last_activity = time.monotonic()
        if session is None:
            return False
        session.close()
        log.info("job connection dropped", extra=fields(job_key=key, reason=why))
        return True

    def housekeeping(self) -> None:
        now = time.monotonic()
        with self.lock:
            idle = [s for s in self.sessions.values() if s.active == 0]
        for session in idle:
            if session.connection is None or not session.connection.is_active():
                self.drop(session.key, "the task's connection ended")
            elif now - session.last_used > self.job_idle:
                self.drop(session.key, "idle")
            elif not os.path.exists(self.metadata.state_path(session.key)):
                self.drop(session.key, "the job's state is gone")

    def should_exit(self) -> bool:
        if self.stopping.is_set() or not os.path.isdir(self.directory):
            return True
        with self.lock:
            if self.retiring.is_set():
                return not self.clients
            # Idle, it stays warm for the manager's next job (its prepare then needs no botocore) until
            # --exit-idle says otherwise.
            return (
                not self.sessions
                and not self.clients
                and time.monotonic() - self.last_activity > self.exit_idle
            )

    def settings(self, path: str) -> Settings:
        """The driver's config as `run` would load it (cached while the file is unchanged); it must name
        this agent's directory."""
        try:
            info = os.stat(path)
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror or exc}") from None
        stamp = (path, info.st_mtime_ns, info.st_size)
        with self.lock:
            cached = self._settings.get(path)
        if cached is None or cached[0] != stamp:
            cached = (stamp, load_settings(path))
            with self.lock:
                self._settings[path] = cached
        settings = cached[1]
        if os.path.abspath(settings.metadata_dir) != self.directory:
            raise ConfigError(f"{path}: its [TaskMetadata] Directory is not {self.directory}")
        return settings

    def api(self, s: Settings) -> ApiClient:
        """One client per orchestrator, so credentials are resolved once, not once per heartbeat."""
        key = (s.orchestrator_url, s.region, s.profile, s.credentials_file, s.api_timeout)
        with self.lock:
            if key not in self._apis:
                self._apis[key] = ApiClient(
                    s.orchestrator_url,
                    s.region,
                    profile=s.profile,
                    credentials_file=s.credentials_file,
                    timeout=min(s.api_timeout, HEARTBEAT_TIMEOUT),
                )
            return self._apis[key]

    # --- serving ---

    def serve(self, listening: Listening) -> None:
        listening.server.settimeout(ACCEPT_TIMEOUT)
        next_housekeeping = time.monotonic() + HOUSEKEEPING_SECONDS
        while not self.should_exit():
            if self.retiring.is_set():
                listening.release()  # a new agent may start; we only finish the stages under way
            conn = None
            if listening.released:
                time.sleep(ACCEPT_TIMEOUT)
            else:
                with contextlib.suppress(TimeoutError):
                    conn, _ = listening.server.accept()
            if conn is not None:
                with self.lock:
                    self.clients += 1
                    self.last_activity = time.monotonic()
                threading.Thread(target=self._handle, args=(conn,), daemon=True).start()
            if time.monotonic() >= next_housekeeping:
                self.housekeeping()
                next_housekeeping = time.monotonic() + HOUSEKEEPING_SECONDS

    def _handle(self, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            conn.settimeout(None)
            peer = _peer_pid(conn)
            if peer is None:
                log.warning("refused a client of another user")
                return
            message, fds = _first_message(conn)
            lines = Lines(conn)
            op = message.get("op")
            key = str(message.get("job_key") or "")
            if op in ("run", "sign", "ready") and not self.same_credentials(peer):
                why = "the runner's AWS environment is not this agent's: it retires for a new one"
                if op == "run":
                    lines.say("unavailable", why)
                else:
                    lines.send({"error": why})
            elif op == "run" and len(fds) == 3:
                script_fd, stdout_fd, stderr_fd = fds
                fds = []
                StageServer(self, lines, message).serve(script_fd, stdout_fd, stderr_fd)
            elif op == "open" and key and message.get("check"):
                timeout = min(CONNECT_TIMEOUT, max(1.0, float(message.get("timeout") or CONNECT_TIMEOUT)))
                wait = min(MAX_SSH_WAIT, max(0.0, float(message.get("wait") or 0)))
                lines.send(self.open_checked(key, timeout, wait))
            elif op == "open" and key:
                lines.send({"ok": True})
                with contextlib.suppress(DriverError):
                    self.release(self.session(key))
            elif op == "drop" and key:
                lines.send({"ok": True, "dropped": self.drop(key, "cleanup")})
            elif op == "ready" and key:
                lines.send(self.report_ready(message, key))
            elif op == "sign":
                lines.send(self.sign(message))
            elif op == "stats":
                lines.send(self.stats())
            elif op == "shutdown":
                self.stopping.set()
                lines.send({"ok": True})
            else:
                lines.send({"error": f"bad request {op!r}"})
        except (AgentGone, OSError, ValueError) as exc:
            log.debug("client went away", extra=fields(error=str(exc)))
        except Exception:  # noqa: BLE001 - one client's trouble must never take the agent down
            log.exception("internal error serving a client")
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            conn.close()
            with self.lock:
                self.clients -= 1
                self.last_activity = time.monotonic()

    def report_ready(self, message: dict, key: str) -> dict:
        """prepare's one-off "SSH ready after N s" heartbeat (the orchestrator's start-latency metric), sent
        from here in the background so that prepare need not wait for it."""
        try:
            api = self._caller_api(message)
            seconds = float(message.get("seconds") or 0)
        except (DriverError, ValueError) as exc:
            return {"error": str(exc)}

        def report() -> None:
            try:
                api.heartbeat(key, ssh_ready_seconds=seconds)
            except DriverError as exc:
                log.warning("start-latency heartbeat failed", extra=fields(job_key=key, error=str(exc)))

        threading.Thread(target=report, name="ready", daemon=True).start()
        return {"ok": True}

    def sign(self, message: dict) -> dict:
        """Sign an API request for a driver process of this directory, which then need not load botocore or
        look up credentials. Any failure is an "error": the process signs itself and reports what is wrong."""
        method, path, body = (str(message.get(k) or "") for k in ("method", "path", "body"))
        if method not in ("GET", "POST", "DELETE") or not path.startswith("/"):
            return {"error": "not an orchestrator request"}
        try:
            headers = self._caller_api(message).signed_headers(method, path, body.encode())
        except DriverError as exc:
            return {"error": str(exc)}
        with self.lock:
            self.signed += 1
        return {"headers": headers}

    def _caller_api(self, message: dict) -> ApiClient:
        """The API client for a driver process's request, whose config must name this directory. Raises
        DriverError."""
        return self.api(self.settings(str(message.get("config") or "")))

    def same_credentials(self, pid: int) -> bool:
        """Whether the driver process `pid` started with the AWS environment the agent did; if not, the
        runner's changed since (keys rotated, say), and the agent retires so that a new one starts with it.
        A process whose environment cannot be read counts as the same."""
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                raw = f.read()
        except OSError:
            return True
        pairs = (item.partition(b"=") for item in raw.split(b"\0") if b"=" in item)
        environ = {
            k.decode(errors="surrogateescape"): v.decode(errors="surrogateescape") for k, _, v in pairs
        }
        if credentials_digest(environ) == self.credentials:
            return True
        if not self.retiring.is_set():
            self.retiring.set()
            log.warning("the runner's AWS environment changed: retiring once the stages under way end")
        return False

    def stats(self) -> dict:
        with self.lock:
            jobs = {
                s.key: {
                    "connected": s.connection is not None,
                    "connections": s.connections,
                    "stages": s.stages,
                    "heartbeats": s.heartbeats,
                    "active": s.active,
                }
                for s in self.sessions.values()
            }
            signed = self.signed
        return {"pid": os.getpid(), "jobs": jobs, "signed": signed}

    def close(self) -> None:
        with self.lock:
            sessions = list(self.sessions.values())
            self.sessions.clear()
        for session in sessions:
            session.close()


class StageServer:
    """One `run` client: the stage runs on the job's shared connection, its output goes straight into the
    runner's pipes, and a cancel (or the client vanishing) kills the remote stage."""

    def __init__(self, agent: Agent, lines: Lines, message: dict) -> None:
        self.agent = agent
        self.lines = lines
        self.message = message
        self.key = ""
        self.send_lock = threading.Lock()
        self.done = threading.Event()
        self.pid_known = threading.Event()
        self.pid: int | None = None
        self.heartbeat: Heartbeat | None = None
        self.settings: Settings | None = None
        self.session: JobSession | None = None
        self.client_left = threading.Event()

    def say(self, word: str, value: object) -> None:
        with self.send_lock, contextlib.suppress(AgentGone):
            self.lines.say(word, value)

    def serve(self, script_fd: int, stdout_fd: int, stderr_fd: int) -> None:
        script = os.fdopen(script_fd, "rb")
        stdout = open(stdout_fd, "wb", buffering=0)  # noqa: SIM115 (closed below)
        stderr = open(stderr_fd, "wb", buffering=0)  # noqa: SIM115
        session: JobSession | None = None
        try:
            try:
                self.settings = self.agent.settings(str(self.message.get("config") or ""))
                self.key = job_key(self.message.get("env") or {})
                session = self.session = self.agent.session(self.key)
            except DriverError as exc:
                self.say("unavailable", exc)
                return
            session.stages += 1
            threading.Thread(target=self._watch_client, args=(session,), daemon=True).start()
            try:
                status = session.connection.run_script(
                    script, self.settings.ssh_shell, stdout, stderr, on_started=self._started
                )
            except SshError as exc:
                self.done.set()
                self.say("lost", exc)
                return
            self.done.set()
            self.say("exit", status)
        finally:
            self.done.set()
            if self.heartbeat is not None:
                self.heartbeat.stop()
            for f in (script, stdout, stderr):
                with contextlib.suppress(OSError):
                    f.close()
            if session is not None:
                self.agent.release(session)

    def _started(self, pid: int) -> None:
        self.pid = pid
        self.pid_known.set()
        if self.client_left.is_set():
            return
        self.say("started", pid)
        api = self.agent.api(self.settings)
        interval = self.settings.heartbeat_interval
        session = self.session
        since = None if session.last_beat is None else time.monotonic() - session.last_beat
        first_delay = 0.0 if since is None else max(0.0, interval - since)

        def beaten() -> None:
            session.last_beat = time.monotonic()
            session.heartbeats += 1

        self.heartbeat = Heartbeat(lambda: api, self.key, interval, first_delay, beaten).start()
        if self.client_left.is_set():  # the client left between the check above and now
            self.heartbeat.stop()

    def _watch_client(self, session: JobSession) -> None:
        """A cancel, or the `run` process gone (killed, or the runner with it): stop heartbeating this job and
        kill the remote stage. Returns quietly when the stage ends first."""
        try:
            message = self.lines.receive()
            cancelled = message.get("op") == "cancel"
        except AgentGone:
            cancelled = False
        if self.done.is_set():
            return
        self.client_left.set()
        if self.heartbeat is not None:
            self.heartbeat.stop()
        self.pid_known.wait(PID_WAIT)
        killed = False
        if self.pid is not None and not self.done.is_set() and session.connection is not None:
            try:
                session.connection.kill_process_group(self.pid)
                killed = True
            except SshError as exc:
                log.warning("could not kill the remote stage", extra=fields(job_key=self.key, error=str(exc)))
        log.info(
            "stage cancelled" if cancelled else "run client vanished",
            extra=fields(job_key=self.key, killed=killed),
        )
        if cancelled:
            self.say("killed", int(killed))


def _peer_pid(conn: socket.socket) -> int | None:
    """The connected process's pid; None when it runs as another user."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return pid if uid == os.getuid() else None


def credentials_digest(environ: Mapping[str, str]) -> str:
    """A digest (never the values) of the AWS_* variables that lead botocore to its credentials."""
    aws = sorted((k, v) for k, v in environ.items() if k.startswith("AWS_"))
    return hashlib.sha256(repr(aws).encode()).hexdigest()


def _first_message(conn: socket.socket) -> tuple[dict, list[int]]:
    """The request line and the fds that came with it."""
    import json

    data, fds = b"", []
    while b"\n" not in data:
        chunk, new_fds, _flags, _addr = socket.recv_fds(conn, 4096, 3)
        fds += new_fds
        if not chunk:
            raise AgentGone("the client closed before asking anything")
        data += chunk
        if len(data) > agent_client.MAX_LINE:
            raise ValueError("overlong request")
    line, _, rest = data.partition(b"\n")
    if rest:
        raise ValueError("a client sent more than its request")
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError("the request is not a JSON object")
    return message, fds


class Listening:
    """The directory's agent lock, socket and pid file, held until `release` (at exit, or when retiring)."""

    def __init__(self, directory: str, server: socket.socket, lock_fd: int) -> None:
        self.directory = directory
        self.server = server
        self._lock_fd: int | None = lock_fd

    @property
    def released(self) -> bool:
        return self._lock_fd is None

    def release(self) -> None:
        """Give the directory up: another agent may take it from now on (the files are ours while we hold
        the lock, so they go first)."""
        if self._lock_fd is None:
            return
        for name in (agent_client.SOCKET_NAME, agent_client.PID_NAME):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.directory, name))
        self.server.close()
        os.close(self._lock_fd)
        self._lock_fd = None


def listen(directory: str) -> Listening | None:
    """Take the directory's agent lock and its socket; None when another agent holds them."""
    lock_fd = os.open(os.path.join(directory, agent_client.LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        return None
    path = agent_client.socket_path(directory)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a dead agent's socket: the lock says nobody serves it
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        server.bind(path)
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    server.listen(128)
    pid_path = os.path.join(directory, agent_client.PID_NAME)
    with open(pid_path, "w", encoding="ascii") as f:
        f.write(f"{os.getpid()}\n")
    return Listening(directory, server, lock_fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m local_driver.agent", description=__doc__.split("\n")[0])
    parser.add_argument("--dir", required=True, help="the driver's [TaskMetadata] Directory")
    parser.add_argument("--job-idle", type=float, default=DEFAULT_JOB_IDLE)
    parser.add_argument("--exit-idle", type=float, default=DEFAULT_EXIT_IDLE)
    parser.add_argument("--open", help="connect to this job's task right away")
    parser.add_argument("--stop", action="store_true", help="ask the directory's agent to exit")
    args = parser.parse_args(argv)
    directory = os.path.abspath(args.dir)
    if args.stop:
        agent_client.stop(directory)
        return 0
    MetadataDir(directory).ensure()
    listening = listen(directory)
    if listening is None:
        if args.open:  # the other agent may as well open it
            with contextlib.suppress(AgentGone):
                agent_client.request(directory, {"op": "open", "job_key": args.open})
        return 0
    setup("info", "text", os.path.join(directory, agent_client.LOG_NAME))
    agent = Agent(directory, args.job_idle, args.exit_idle)
    signal.signal(signal.SIGTERM, lambda *_: agent.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: agent.stopping.set())
    log.info("agent started", extra=fields(pid=os.getpid(), directory=directory))
    threading.Thread(target=_warm_up, name="warm-up", daemon=True).start()
    if args.open:
        threading.Thread(target=lambda: _open_quietly(agent, args.open), name="open", daemon=True).start()
    try:
        agent.serve(listening)
    finally:
        listening.release()
        agent.close()
        log.info("agent exiting", extra=fields(pid=os.getpid()))
    return 0


def _warm_up() -> None:
    """Load paramiko and botocore's signer now, while nothing waits for them, rather than in a stage."""
    with contextlib.suppress(ImportError):
        import botocore.auth
        import botocore.session  # noqa: F401
        import paramiko  # noqa: F401


def _open_quietly(agent: Agent, key: str) -> None:
    with contextlib.suppress(DriverError):
        agent.release(agent.session(key))


if __name__ == "__main__":
    sys.exit(main())
