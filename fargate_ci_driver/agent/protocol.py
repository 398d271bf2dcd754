"""The session agent's protocol: where an agent lives (`Spot`) and what goes over its socket (`Lines`).
Standard library only, and only modules built into the interpreter: a stage served by the agent costs a
small Python process and no SSH handshake.

An agent serves one signing environment: one driver config file (so one orchestrator URL, region, profile
and credentials file) and one set of AWS_* variables. A digest of them is in its socket's name,
`<metadata dir>/agent-3-<digest>.sock`, so a driver process whose environment differs finds no agent there
and starts its own (nobody reads anybody's `/proc/PID/environ`).

Requests are JSON objects, one per line. `run` connects to that socket and sends one naming the driver's
config path and the job key prepare recorded in the runner's per-job directory (`job_marker`; never a job
variable), together with the stage script's fd and its own stdout/stderr fds (SCM_RIGHTS), so the agent
streams the remote output straight into the runner's pipes; then it waits for the agent's answers, which
during a stage are plain `WORD VALUE` lines (decoding JSON would cost every stage the `json` and `re`
imports):

    started PID       the remote shell runs (PID is its process group)
    exit N            the stage ended with status N (-1: the shell ended without one)
    unavailable MSG   nothing was run (no state, task unreachable): `run` connects directly instead
    lost MSG          the connection to the task broke during the stage
    killed 1|0        the answer to {"op": "cancel"}: whether the remote stage's process group was killed

The other requests come from prepare, cleanup and tests, and are answered with one JSON object each:
"open" (connect to a job's task; with "check", prove the login, retrying for "wait" seconds while sshd is not
listening), "sign" (the headers of a signed API request), "ready" (send prepare's ready report), "drop",
"stats" and "shutdown".

The agent is optional: when its socket does not answer, `run` connects directly, as before, and starts an
agent for the stages after it. `FARGATE_DRIVER_AGENT=off` in the runner's environment turns it off.
"""

from __future__ import annotations

# A stage loads this module, so it imports only what is built into the interpreter: `_socket` rather than
# `socket` (its enums cost a stage ~7 ms), no `json` (it loads `re`, ~6 ms), and not `typing` either.
import _socket
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping


# The agent's files carry its protocol's version: after an upgrade, a new driver never talks to an agent an
# older one started (that agent serves the jobs it has until it idles out).
PROTOCOL = 3
PREFIX = f"agent-{PROTOCOL}-"
LOG_NAME = "agent.log"
# Runner-manager environment (never a job's: the runner passes job variables with a CUSTOM_ENV_ prefix).
ENV_SWITCH = "FARGATE_DRIVER_AGENT"
ENV_JOB_IDLE = "FARGATE_DRIVER_AGENT_JOB_IDLE"
ENV_EXIT_IDLE = "FARGATE_DRIVER_AGENT_EXIT_IDLE"
CONNECT_TIMEOUT = 2.0
MAX_LINE = 65536


def enabled(environ: Mapping[str, str]) -> bool:
    return environ.get(ENV_SWITCH, "").strip().lower() not in ("off", "0", "false", "no")


# --- where an agent lives: one per metadata directory and signing environment ---------------------------

# 2**127 - 1, a Mersenne prime, and a 64-bit odd multiplier: a polynomial fingerprint computed with int
# arithmetic, because `hashlib` is not built into the interpreter (its import costs a stage ~2.5 ms). It
# only names a socket; who may use it is decided by the uid check and the 0700 directory.
_MODULUS = (1 << 127) - 1
_BASE = 0x9E3779B97F4A7C15
_CHUNK = 15


def environment_digest(config_path: str, config_bytes: bytes, environ: Mapping[str, str]) -> str:
    """16 hex digits naming the signing environment: the config file (path and content: orchestrator URL,
    region, profile, credentials file) and every AWS_* variable (credentials, profile, region, config
    files: whatever botocore would sign with)."""
    aws = sorted((k, v) for k, v in environ.items() if k.startswith("AWS_"))
    parts = [os.path.abspath(config_path).encode(errors="surrogateescape"), config_bytes]
    parts += [f"{k}={v}".encode(errors="surrogateescape") for k, v in aws]
    data = b"\0".join(len(p).to_bytes(8, "big") + p for p in parts)
    value = len(data)
    for i in range(0, len(data), _CHUNK):
        value = (value * _BASE + int.from_bytes(data[i : i + _CHUNK], "big") + 1) % _MODULUS
    return f"{value ^ (value >> 64):032x}"[-16:]


class Spot:
    """The files of the agent for one metadata directory and signing environment (a plain class: dataclasses
    cost a stage ~10 ms)."""

    def __init__(self, directory: str, config: str, digest: str) -> None:
        self.directory = directory
        self.config = config  # absolute
        self.digest = digest
        base = os.path.join(directory, f"{PREFIX}{digest}")
        self.socket = base + ".sock"
        self.lock = base + ".lock"
        self.pid_file = base + ".pid"

    @classmethod
    def read(cls, config_path: str, environ: Mapping[str, str], directory: str | None = None) -> Spot | None:
        """The spot for this config file and environment; None when the file cannot be read, or (without
        `directory`) does not name its [TaskMetadata] Directory in the plain form."""
        config = os.path.abspath(config_path)
        try:
            with open(config, "rb") as f:
                raw = f.read()
        except OSError:
            return None
        if directory is None:
            directory = _metadata_directory(raw)
            if directory is None:
                return None
        return cls(os.path.abspath(directory), config, environment_digest(config, raw, environ))

    def __repr__(self) -> str:
        return f"Spot({self.socket!r})"


def spots(directory: str) -> list[str]:
    """The sockets of this protocol's agents in `directory` (for tools and tests), newest first."""
    try:
        names = [n for n in os.listdir(directory) if n.startswith(PREFIX) and n.endswith(".sock")]
    except OSError:
        return []
    paths = [os.path.join(directory, n) for n in names]
    return sorted(paths, key=lambda p: os.stat(p).st_mtime_ns if os.path.exists(p) else 0, reverse=True)


def _socket_of(where: Spot | str) -> str:
    """A spot's socket; for a directory (tools and tests), its newest agent's socket."""
    if isinstance(where, Spot):
        return where.socket
    found = spots(where)
    return found[0] if found else os.path.join(where, f"{PREFIX}none.sock")


class AgentGone(Exception):
    """The agent's socket does not answer or closed without a word: not a driver error, a reason to go
    direct (before a stage starts) or a lost stage (after)."""


class Lines:
    """One line per message over a Unix stream socket: JSON requests and answers, and a stage's word lines."""

    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self._buffer = b""

    def send(self, message: dict, fds: list[int] | None = None) -> None:
        self._send(encode_json(message).encode() + b"\n", fds)

    def say(self, word: str, value: object) -> None:
        """A stage answer: `WORD VALUE` on one line."""
        text = " ".join(str(value).split())  # a message's newlines would end the line early
        self._send(f"{word} {text}\n".encode(), None)

    def _send(self, data: bytes, fds: list[int] | None) -> None:
        try:
            if fds:
                # The C ints `socket.send_fds` would pack with `array` (whose import costs ~2 ms).
                packed = b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds)
                rights = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, packed)]
                data = data[self.sock.sendmsg([data], rights) :]
            if data:
                self.sock.sendall(data)
        except OSError as exc:
            raise AgentGone(f"cannot write to the session agent: {exc}") from None

    def receive(self) -> dict:
        import json  # only the answers to prepare's, cleanup's and the tests' requests are JSON

        line = self._line()
        try:
            message = json.loads(line)
        except ValueError:
            raise AgentGone("the session agent sent something that is not JSON") from None
        if not isinstance(message, dict):
            raise AgentGone("the session agent sent something that is not a JSON object")
        return message

    def hear(self) -> tuple[str, str]:
        """A stage answer: (word, value)."""
        word, _, value = self._line().decode(errors="replace").partition(" ")
        return word, value

    def _line(self) -> bytes:
        while b"\n" not in self._buffer:
            try:
                chunk = self.sock.recv(4096)
            except OSError as exc:  # TimeoutError included
                raise AgentGone(f"cannot read from the session agent: {exc}") from None
            if not chunk:
                raise AgentGone("the session agent closed the connection")
            self._buffer += chunk
            if len(self._buffer) > MAX_LINE:
                raise AgentGone("the session agent sent an overlong line")
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def close(self) -> None:
        self.sock.close()


def encode_json(value: object) -> str:
    """`json.dumps` for what the agent's messages hold (dicts, lists, strings, numbers, booleans, None), kept
    here so that a stage need not import `json`. Strings are escaped as RFC 8259 §7 requires."""
    if isinstance(value, str):
        return '"' + "".join(_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if c < " " else c) for c in value) + '"'
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float) and value - value == 0:  # finite: JSON has no NaN or infinity
        return repr(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{encode_json(str(k))}:{encode_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(encode_json(v) for v in value) + "]"
    raise TypeError(f"cannot encode {type(value).__name__} for the session agent")


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def connect(where: Spot | str, timeout: float | None = CONNECT_TIMEOUT) -> Lines:
    return connect_socket(_socket_of(where), timeout)


def connect_socket(path: str, timeout: float | None = CONNECT_TIMEOUT) -> Lines:
    """Lines to the agent listening on the socket `path`; AgentGone when none answers there."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(CONNECT_TIMEOUT)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise AgentGone(f"no session agent at {path}: {exc.strerror or exc}") from None
    sock.settimeout(timeout)
    return Lines(sock)


class StageResult:
    """What became of a stage the agent was asked to run (a plain class: dataclasses cost a stage ~10 ms)."""

    def __init__(self, status: int | None = None, lost: str | None = None, unavailable: str | None = None):
        self.status = status
        self.lost = lost
        # Set when the agent ran nothing (absent, or it could not reach the task): connect directly.
        self.unavailable = unavailable

    def __repr__(self) -> str:
        return f"StageResult(status={self.status}, lost={self.lost!r}, unavailable={self.unavailable!r})"


def pid_of(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _metadata_directory(data: bytes) -> str | None:
    """[TaskMetadata] Directory, read with a plain scan instead of tomllib (whose import costs a stage ~6 ms).

    Only the plain form `Directory = "/abs/path"` (any key case) is recognised; anything else is None and
    the full driver reads the file. A wrong answer costs nothing: the agent checks that the config it loads
    names its own directory, and otherwise tells `run` to go direct."""
    try:
        text = data.decode()
    except ValueError:
        return None
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line.strip("[] \t").lower()
            continue
        name, equals, value = line.partition("=")
        if section != "taskmetadata" or not equals or name.strip().lower() != "directory":
            continue
        value = value.strip()
        quote = value[:1]
        if quote not in ('"', "'") or value.count(quote) != 2 or "\\" in value:
            return None
        path = value[1 : value.index(quote, 1)]
        rest = value[value.index(quote, 1) + 1 :].strip()
        if rest and not rest.startswith("#"):
            return None
        return path if os.path.isabs(path) else None
    return None
