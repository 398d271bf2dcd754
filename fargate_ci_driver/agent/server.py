"""The session agent: one process per metadata directory and signing environment that holds one SSH connection
per job, so the nine or so `run` stages of a job pay one handshake instead of nine, and paramiko and botocore
are loaded once per runner manager instead of once per stage (`client` is the driver's side, `protocol`
describes the wire format).

    python -m fargate_ci_driver.agent --dir METADATA_DIR --config FARGATE_TOML [--job-idle S] [--exit-idle S]
                                 [--open JOB_KEY]
    python -m fargate_ci_driver.agent --dir METADATA_DIR --stop

It serves only what it was started for: it reads its config (orchestrator URL, region, profile, credentials
file) once at start and signs with its own AWS environment, and it listens on
`<dir>/agent-3-<digest>.sock`, the digest being that of its config file and AWS_* variables
(`protocol.environment_digest`): a driver process with another environment computes another name, finds
no agent and starts its own. 0600 in the 0700 directory; peers of another uid are refused. It takes
`<dir>/agent-3-<digest>.lock`, so there is one such agent (3: the protocol's version). It signs only requests
for its orchestrator's routes. It reads a job's address, pinned host key, client key and attempt from the
same files `run` would, and reconnects when they change. It heartbeats a job (naming its attempt) only while a
`run` client for it is connected: a runner manager killed mid-job stops the heartbeats, and the
orchestrator's reaper stops the task. A job's connection goes at cleanup ("drop"), when its task stops (the
transport dies), when its state file is gone, or after --job-idle seconds without a stage. The agent exits
--exit-idle seconds after its last job and client (staying warm for the next job meanwhile), when asked to,
or when its directory is removed. It also signs API requests for the driver processes of its environment
("sign"), so that `prepare` and `cleanup` need not load botocore, tries a starting task's sshd for `prepare`
("open" with "wait"), and sends prepare's ready report ("ready"). It logs to `<dir>/agent.log`, never a key.
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

from fargate_ci_driver.agent import client, protocol
from fargate_ci_driver.agent.protocol import AgentGone, Lines, Spot
from fargate_ci_driver.agent.sessions import JobSession
from fargate_ci_driver.api import ApiClient
from fargate_ci_driver.errors import ConfigError, DriverError, HostKeyMismatch, SshError, SshUnavailable
from fargate_ci_driver.heartbeat import HEARTBEAT_TIMEOUT, Heartbeat
from fargate_ci_driver.job_marker import valid_key
from fargate_ci_driver.logs import fields, log, setup
from fargate_ci_driver.metadata import MetadataDir
from fargate_ci_driver.settings import Settings, parse_text
from fargate_ci_driver.ssh import TaskConnection

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


class Agent:
    def __init__(
        self,
        spot: Spot,
        settings: Settings,
        job_idle: float = DEFAULT_JOB_IDLE,
        exit_idle: float = DEFAULT_EXIT_IDLE,
    ):
        self.spot = spot
        self.directory = spot.directory
        self.metadata = MetadataDir(spot.directory)
        self.job_idle = job_idle
        self.exit_idle = exit_idle
        self.sessions: dict[str, JobSession] = {}
        self.lock = threading.Lock()
        self.clients = 0
        self.signed = 0
        self.last_activity = time.monotonic()
        self.stopping = threading.Event()
        # Read once, at start: the agent signs for this orchestrator and no other.
        self.config = settings
        self._api = ApiClient(
            settings.orchestrator_url,
            settings.region,
            profile=settings.profile,
            credentials_file=settings.credentials_file,
            timeout=min(settings.api_timeout, HEARTBEAT_TIMEOUT),
        )

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
            if session.attempt != state.attempt:
                session.attempt, session.beats_over = state.attempt, False
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
            # Idle, it stays warm for the manager's next job (its prepare then needs no botocore) until
            # --exit-idle says otherwise.
            return (
                not self.sessions
                and not self.clients
                and time.monotonic() - self.last_activity > self.exit_idle
            )

    def settings(self, path: str) -> Settings:
        """The config a driver process names must be the one this agent was started with (the socket's name
        already says so; this is belt and braces)."""
        if path != self.spot.config:
            raise ConfigError(f"this session agent serves {self.spot.config}, not {path or 'no config'}")
        return self.config

    def api(self, _settings: Settings | None = None) -> ApiClient:
        """The one client for the agent's orchestrator: credentials are resolved once, not per heartbeat."""
        return self._api

    # --- serving ---

    def serve(self, listening: Listening) -> None:
        listening.server.settimeout(ACCEPT_TIMEOUT)
        next_housekeeping = time.monotonic() + HOUSEKEEPING_SECONDS
        while not self.should_exit():
            conn = None
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
            if not _same_user(conn):
                log.warning("refused a client of another user")
                return
            message, fds = _first_message(conn)
            lines = Lines(conn)
            op = message.get("op")
            key = str(message.get("job_key") or "")
            if key and not valid_key(key):
                if op == "run":
                    lines.say("unavailable", f"{key[:40]!r} is not a job key")
                else:
                    lines.send({"error": f"{key[:40]!r} is not a job key"})
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
            state = self.metadata.load(key)
        except (DriverError, ValueError) as exc:
            return {"error": str(exc)}
        if state is None or not state.attempt:
            return {"error": f"job {key} has no attempt on record"}
        attempt = state.attempt

        def report() -> None:
            try:
                api.heartbeat(key, ssh_ready_seconds=seconds, attempt=attempt)
            except DriverError as exc:
                log.warning("start-latency heartbeat failed", extra=fields(job_key=key, error=str(exc)))

        threading.Thread(target=report, name="ready", daemon=True).start()
        return {"ok": True}

    def sign(self, message: dict) -> dict:
        """Sign an API request for a driver process of this directory, which then need not load botocore or
        look up credentials. Any failure is an "error": the process signs itself and reports what is wrong."""
        method, path, body = (str(message.get(k) or "") for k in ("method", "path", "body"))
        try:
            api = self._caller_api(message)
        except DriverError as exc:
            return {"error": str(exc)}
        if not orchestrator_route(api.prefix, method, path):
            return {"error": f"{method[:10]} {path[:80]!r} is not one of the orchestrator's routes"}
        try:
            headers = api.signed_headers(method, path, body.encode())
        except DriverError as exc:
            return {"error": str(exc)}
        with self.lock:
            self.signed += 1
        return {"headers": headers}

    def _caller_api(self, message: dict) -> ApiClient:
        """The API client for a driver process's request, whose config must name this directory. Raises
        DriverError."""
        return self.api(self.settings(str(message.get("config") or "")))

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
                self.key = str(self.message.get("job_key") or "")
                if not valid_key(self.key):
                    raise DriverError("the request names no job key")
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
        if session.attempt is None or session.beats_over:
            return  # no attempt to name, or the orchestrator said it is over: nothing to keep alive
        since = None if session.last_beat is None else time.monotonic() - session.last_beat
        first_delay = 0.0 if since is None else max(0.0, interval - since)

        def beaten() -> None:
            session.last_beat = time.monotonic()
            session.heartbeats += 1

        def over(_why: str) -> None:
            session.beats_over = True

        self.heartbeat = Heartbeat(
            lambda: api, self.key, session.attempt, interval, first_delay, beaten, over
        ).start()
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


def _same_user(conn: socket.socket) -> bool:
    """Whether the connected process runs as this agent's user (the kernel says, SO_PEERCRED)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid == os.getuid()


# The routes of the orchestrator's HTTP API (design.md "HTTP API"): the only requests the agent signs.
def orchestrator_route(prefix: str, method: str, path: str) -> bool:
    """`path` (with the URL's path prefix) is one of the orchestrator's routes for `method`."""
    if not path.startswith(prefix + "/"):
        return False
    route = path[len(prefix) :]
    if route == "/health":
        return method == "GET"
    if route == "/jobs":
        return method == "POST"
    parts = route.split("/")  # "", "jobs", key[, "heartbeat"]
    if len(parts) < 3 or parts[1] != "jobs" or not valid_key(parts[2]):
        return False
    if len(parts) == 3:
        return method in ("GET", "DELETE")
    return len(parts) == 4 and parts[3] == "heartbeat" and method == "POST"


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
        if len(data) > protocol.MAX_LINE:
            raise ValueError("overlong request")
    line, _, rest = data.partition(b"\n")
    if rest:
        raise ValueError("a client sent more than its request")
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError("the request is not a JSON object")
    return message, fds


class Listening:
    """The agent's lock, socket and pid file, held until `release` (at exit)."""

    def __init__(self, spot: Spot, server: socket.socket, lock_fd: int) -> None:
        self.spot = spot
        self.server = server
        self._lock_fd: int | None = lock_fd

    def release(self) -> None:
        """Give the directory up: another agent may take it from now on (the files are ours while we hold
        the lock, so they go first)."""
        if self._lock_fd is None:
            return
        for path in (self.spot.socket, self.spot.pid_file):
            with contextlib.suppress(OSError):
                os.unlink(path)
        self.server.close()
        os.close(self._lock_fd)
        self._lock_fd = None


def listen(spot: Spot) -> Listening | None:
    """Take the spot's agent lock and its socket; None when another agent holds them."""
    lock_fd = os.open(spot.lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        return None
    path = spot.socket
    # Bound and listening under a private name first, then renamed into place: a client that finds the
    # socket can connect at once (between bind and listen it would be refused).
    staging = f"{path}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(staging)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        server.bind(staging)
    finally:
        os.umask(old_umask)
    os.chmod(staging, 0o600)
    server.listen(128)
    os.replace(staging, path)  # over a dead agent's socket: the lock says nobody serves it
    with open(spot.pid_file, "w", encoding="ascii") as f:
        f.write(f"{os.getpid()}\n")
    return Listening(spot, server, lock_fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fargate_ci_driver.agent", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--dir", required=True, help="the driver's [TaskMetadata] Directory")
    parser.add_argument("--config", help="the driver's fargate.toml, which this agent serves (read once)")
    parser.add_argument("--job-idle", type=float, default=DEFAULT_JOB_IDLE)
    parser.add_argument("--exit-idle", type=float, default=DEFAULT_EXIT_IDLE)
    parser.add_argument("--open", help="connect to this job's task right away")
    parser.add_argument("--stop", action="store_true", help="ask the directory's agent to exit")
    args = parser.parse_args(argv)
    directory = os.path.abspath(args.dir)
    if args.stop:
        client.stop(directory)
        return 0
    if not args.config:
        parser.error("--config is required (the fargate.toml the agent serves)")
    config = os.path.abspath(args.config)
    try:
        with open(config, "rb") as f:
            raw = f.read()
        settings = parse_text(raw, config)
    except (OSError, ConfigError) as exc:
        print(f"session agent: {exc}", file=sys.stderr)
        return 2
    if os.path.abspath(settings.metadata_dir) != directory:
        print(f"session agent: {config}: its [TaskMetadata] Directory is not {directory}", file=sys.stderr)
        return 2
    # The digest of exactly what was read and of the environment it signs with (design.md "Session agent").
    spot = Spot(directory, config, protocol.environment_digest(config, raw, os.environ))
    MetadataDir(directory).ensure()
    listening = listen(spot)
    if listening is None:
        if args.open:  # the other agent may as well open it
            with contextlib.suppress(AgentGone):
                client.request(spot, {"op": "open", "job_key": args.open})
        return 0
    setup("info", "text", os.path.join(directory, protocol.LOG_NAME))
    agent = Agent(spot, settings, args.job_idle, args.exit_idle)
    signal.signal(signal.SIGTERM, lambda *_: agent.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: agent.stopping.set())
    log.info("agent started", extra=fields(pid=os.getpid(), directory=directory, digest=spot.digest))
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
