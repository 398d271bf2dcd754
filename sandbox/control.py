"""Starting, stopping and steering a sandbox: what `python -m sandbox start|stop|fault` do."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fargate_ci_driver.pids import alive
from sandbox.errors import AlreadyRunning, NotRunning, StartFailed, UsageError
from sandbox.layout import (
    ACCOUNT_ID,
    CLUSTER,
    ENTRYPOINT,
    IDENTITIES,
    REGION,
    REPO_ROOT,
    ROLE,
    ROLE_PROFILE,
    TABLE,
    SandboxDir,
    user_arn,
)

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0  # the AWS host kills its tasks first
TOOL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class StartOptions:
    provision_delay: float = 0.5
    schedule_rate: float = 60.0
    ssh_port: int = 2222
    app_env: tuple[str, ...] = ()
    # NAME=VALUE pairs added to every task definition's container environment, as an operator sets them in
    # the real task definition: tests shorten the task's watchdog and sshd client-alive timings with them.
    task_env: tuple[str, ...] = ()
    app_dir: Path = REPO_ROOT

    def validate(self) -> None:
        if not 0 <= self.provision_delay <= 3600:
            raise UsageError("--provision-delay must be between 0 and 3600 seconds")
        if not 0.1 <= self.schedule_rate <= 86400:
            raise UsageError("--schedule-rate must be between 0.1 and 86400 seconds")
        if not 1 <= self.ssh_port <= 65535:
            raise UsageError("--ssh-port must be a TCP port (1-65535)")
        for flag, items in (("--app-env", self.app_env), ("--task-env", self.task_env)):
            for item in items:
                name, sep, _ = item.partition("=")
                if (
                    not sep
                    or not name
                    or not all(c in string.ascii_letters + string.digits + "_" for c in name)
                ):
                    raise UsageError(f"{flag} wants NAME=VALUE, got {item!r}")
        if not (self.app_dir / "app.py").is_file():
            raise UsageError(f"no Chalice app at {self.app_dir / 'app.py'}")


def check_prerequisites() -> None:
    """What the emulated tasks need from the machine (scripts/setup-system.sh installs it)."""
    missing = [tool for tool in ("bwrap", "sshd", "ssh-keygen") if not shutil.which(tool, path=TOOL_PATH)]
    if not Path("/bin/busybox").is_file():
        missing.append("busybox (busybox-static)")
    if missing:
        raise StartFailed(f"missing {', '.join(missing)}: run scripts/setup-system.sh (as root) first")
    if not ENTRYPOINT.is_file():
        raise StartFailed(f"the task entrypoint {ENTRYPOINT} is missing")


def start(directory: str, options: StartOptions) -> dict[str, Any]:
    """Start the sandbox in the background; return its state once everything answers."""
    options.validate()
    check_prerequisites()
    sandbox = SandboxDir.at(directory)
    for path in (sandbox.root, sandbox.run, sandbox.logs, sandbox.task_logs, sandbox.tasks):
        path.mkdir(parents=True, exist_ok=True)
    sandbox.metadata.mkdir(mode=0o700, exist_ok=True)
    lock = _take_lock(sandbox)
    started: list[subprocess.Popen] = []
    try:
        for stale in (sandbox.ready_file("aws"), sandbox.ready_file("api"), sandbox.state_file):
            stale.unlink(missing_ok=True)
        profiles = write_credentials(sandbox.credentials, sandbox.role_secret)
        aws_args = ["--provision-delay", str(options.provision_delay), "--ssh-port", str(options.ssh_port)]
        for item in options.task_env:
            aws_args += ["--task-env", item]
        aws_host = _spawn(sandbox, "aws", aws_args, lock)
        started.append(aws_host)
        aws = _wait_ready(sandbox, "aws", aws_host)
        api_args = ["--schedule-rate", str(options.schedule_rate), "--app-dir", str(options.app_dir)]
        for item in options.app_env:
            api_args += ["--app-env", item]
        api_host = _spawn(sandbox, "api", api_args, None)
        started.append(api_host)
        api = _wait_ready(sandbox, "api", api_host)
    except BaseException:
        for process in reversed(started):
            _terminate(process.pid, "", timeout=STOP_TIMEOUT)
        for half_written in (sandbox.ready_file("aws"), sandbox.ready_file("api")):
            half_written.unlink(missing_ok=True)
        raise
    finally:
        os.close(lock)

    state = {
        "dir": str(sandbox.root),
        "api_url": api["api_url"],
        "aws_endpoint_url": aws["aws_endpoint_url"],
        "control_url": aws["control_url"],
        "region": REGION,
        "cluster": CLUSTER,
        "cluster_arn": aws["cluster_arn"],
        "table": TABLE,
        "queue_url": aws["queue_url"],
        "subnets": aws["subnets"],
        "security_group": aws["security_group"],
        "vpc_cidr": aws["vpc_cidr"],
        "task_definitions": aws["task_definitions"],
        "ca_key_id": aws["ca_key_id"],  # the SSH user CA (KMS)
        "credentials_file": str(sandbox.credentials),
        "profiles": profiles,
        "toml_path": str(sandbox.toml_path),
        "metadata_dir": str(sandbox.metadata),
        "logs_dir": str(sandbox.logs),
        "ssh_port": options.ssh_port,
        "ssh_user": "root",
        "provision_delay": options.provision_delay,
        "schedule_rate": options.schedule_rate,
        "task_env": dict(item.partition("=")[::2] for item in options.task_env),
        "pids": {"aws_host": aws["pid"], "api_host": api["pid"]},
    }
    sandbox.toml_path.write_text(driver_config(state))
    tmp = sandbox.state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, sandbox.state_file)
    return state


def stop(directory: str) -> bool:
    """Stop the sandbox; False when nothing was running. Leaves no process or socket behind."""
    sandbox = SandboxDir.at(directory)
    pids = _known_pids(sandbox)
    stopped = False
    # The API first (it drives the app), then the AWS host, which kills every task before it exits.
    for name, marker in (("api_host", "sandbox.api_host"), ("aws_host", "sandbox.aws_host")):
        pid = pids.get(name)
        if pid and _is_ours(pid, marker, sandbox):
            _terminate(pid, marker, timeout=STOP_TIMEOUT)
            stopped = True
    # The driver's session agent for this sandbox's metadata directory (a job that never reached cleanup).
    from fargate_ci_driver.agent import client

    client.stop(str(sandbox.metadata))
    for leftover in (sandbox.ready_file("aws"), sandbox.ready_file("api"), sandbox.state_file):
        leftover.unlink(missing_ok=True)
    return stopped


def load_state(directory: str) -> dict[str, Any]:
    sandbox = SandboxDir.at(directory)
    try:
        state = json.loads(sandbox.state_file.read_text())
    except (OSError, ValueError):
        raise NotRunning(
            f"no sandbox running in {sandbox.root} (start one with: python -m sandbox start)"
        ) from None
    if not _is_ours(state["pids"]["aws_host"], "sandbox.aws_host", sandbox):
        raise NotRunning(f"the sandbox in {sandbox.root} is not running any more (its AWS host is gone)")
    return state


def arm_fault(directory: str, fault: dict[str, Any]) -> dict[str, Any]:
    """POST /faults on the control URL."""
    return _post_control(directory, "/faults", fault)["fault"]


def derive_image(directory: str, name: str, base: str, config: dict[str, Any]) -> dict[str, Any]:
    """POST /images on the control URL: the image `name` (Docker Hub's, e.g. `sandbox/web:1`) from `base`
    with `config`'s overrides (ExposedPorts, Cmd, Entrypoint, Env, WorkingDir, User); the sandbox's registry
    serves it and its tasks run it from now on."""
    return _post_control(directory, "/images", {"name": name, "base": base, "config": config})


def _post_control(directory: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST `body` to the running sandbox's control URL; its refusal's message is a UsageError."""
    state = load_state(directory)
    request = urllib.request.Request(  # noqa: S310 (our own loopback URL)
        state["control_url"] + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (our own loopback URL)
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["message"]
        except (ValueError, KeyError):
            message = f"control API answered {exc.code}"
        raise UsageError(message) from None


def clear_faults(directory: str) -> int:
    """DELETE /faults on the control URL; returns how many were armed."""
    state = load_state(directory)
    request = urllib.request.Request(state["control_url"] + "/faults", method="DELETE")  # noqa: S310
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (our own loopback URL)
        return int(json.loads(response.read())["cleared"])


def write_credentials(path: Path, role_secret: Path) -> dict[str, str]:
    """The sandbox's two IAM users and one session of its role, in AWS's shared-credentials format, and the
    role's secret (both mode 0600). Returns profile -> caller ARN."""
    lines = []
    profiles = {}
    for profile, user in IDENTITIES:
        key = "AKIA" + "".join(secrets.choice(string.ascii_uppercase + "234567") for _ in range(16))
        secret = secrets.token_urlsafe(30)[:40]
        lines += [f"[{profile}]", f"aws_access_key_id = {key}", f"aws_secret_access_key = {secret}", ""]
        profiles[profile] = user_arn(user)
    _write_private(role_secret, secrets.token_hex(32))
    session = role_sessions(role_secret).mint(f"{ROLE_PROFILE}-{secrets.token_hex(4)}")
    lines += [
        f"[{ROLE_PROFILE}]",
        f"aws_access_key_id = {session.access_key}",
        f"aws_secret_access_key = {session.secret_key}",
        f"aws_session_token = {session.session_token}",
        "",
    ]
    profiles[ROLE_PROFILE] = session.user_arn
    _write_private(path, "\n".join(lines))
    return profiles


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(text)


def role_sessions(role_secret: Path) -> Any:
    """The sandbox's STS for its role (sigv4.RoleSessions), from the secret `start` wrote."""
    from sandbox.credentials import TASK_ROLE
    from sandbox.sigv4 import RoleSessions

    secret = role_secret.read_text().strip().encode()
    return RoleSessions(secret, ACCOUNT_ID, ROLE, ROLE_PROFILE, other_roles=(TASK_ROLE,))


def assume_role(directory: str, session: str) -> dict[str, str]:
    """Temporary credentials for a new session of the sandbox's role, as STS AssumeRole hands them out: each
    call's session name makes a different caller ARN, which the orchestrator treats as the same role."""
    identity = role_sessions(SandboxDir.at(directory).role_secret).mint(session)
    return {
        "aws_access_key_id": identity.access_key,
        "aws_secret_access_key": identity.secret_key,
        "aws_session_token": identity.session_token or "",
        "arn": identity.user_arn,
    }


def driver_config(state: dict[str, Any]) -> str:
    """fargate.toml for `fargate-driver --config` (design.md "Driver configuration")."""

    def q(value: str) -> str:
        return json.dumps(value)  # a JSON string is a valid TOML basic string

    return "\n".join(
        [
            "# Written by `python -m sandbox start`: the driver configuration for this sandbox.",
            'LogLevel = "info"',
            "",
            "[Fargate]",
            f"Region = {q(state['region'])}",
            "",
            "[TaskMetadata]",
            f"Directory = {q(state['metadata_dir'])}",
            "",
            "[SSH]",
            f"Username = {q(state['ssh_user'])}",
            f"Port = {state['ssh_port']}",
            'Shell = "bash"',
            "",
            "[Orchestrator]",
            f"URL = {q(state['api_url'])}",
            f"Region = {q(state['region'])}",
            'Profile = "sandbox"',
            f"SharedCredentialsFile = {q(state['credentials_file'])}",
            "Timeout = 10",
            "",
            "[Runner]",
            # The runner emulator's runner (runner_emulator.RunnerConfig.short_token): job keys are
            # t3sT1234-<job id>, whatever a job's CI_RUNNER_SHORT_TOKEN variable says.
            'ShortToken = "t3sT1234"',
            "",
            "[Job]",
            'BuildsDir = "/builds"',
            'CacheDir = "/cache"',
            "PrepareTimeout = 600",
            "",
        ]
    )


# --- processes ----------------------------------------------------------------------------------------


def _take_lock(sandbox: SandboxDir) -> int:
    """The directory's lock; the AWS host inherits it and holds it for as long as the sandbox runs."""
    fd = os.open(sandbox.lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyRunning(
            f"a sandbox is already running in {sandbox.root}; "
            f"stop it first: python -m sandbox stop --dir {sandbox.root}"
        ) from None
    return fd


def _spawn(sandbox: SandboxDir, name: str, args: list[str], lock_fd: int | None) -> subprocess.Popen:
    # Nothing of the caller's AWS set-up (keys, profiles, ~/.aws) reaches the sandbox: it talks to moto only.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    log = open(sandbox.logs / f"{name}.log", "ab")  # noqa: SIM115 (handed to the child)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", f"sandbox.{name}_host", "--dir", str(sandbox.root), *args],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=(lock_fd,) if lock_fd is not None else (),
            start_new_session=True,  # outlives `start`, and a Ctrl-C in the caller's terminal
        )
    finally:
        log.close()


def _wait_ready(sandbox: SandboxDir, name: str, process: subprocess.Popen) -> dict[str, Any]:
    ready = sandbox.ready_file(name)
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if ready.exists():
            return json.loads(ready.read_text())
        if process.poll() is not None:
            raise StartFailed(
                f"the sandbox's {name} process exited ({process.returncode}): {_last_error(sandbox, name)}"
            )
        time.sleep(0.05)
    raise StartFailed(
        f"the sandbox's {name} process did not get ready in {READY_TIMEOUT:.0f} s; see {sandbox.logs}"
    )


def _last_error(sandbox: SandboxDir, name: str) -> str:
    try:
        lines = (sandbox.logs / f"{name}.log").read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return (lines[-1] if lines else "no output") + f" (log: {sandbox.logs / f'{name}.log'})"


def _known_pids(sandbox: SandboxDir) -> dict[str, int]:
    pids: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError, KeyError):
        pids.update(json.loads(sandbox.state_file.read_text())["pids"])
    # A start that failed half-way has no sandbox.json yet, but its processes announced themselves.
    for name in ("aws", "api"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            pids.setdefault(f"{name}_host", json.loads(sandbox.ready_file(name).read_text())["pid"])
    return pids


def _is_ours(pid: int, marker: str, sandbox: SandboxDir) -> bool:
    """The PID is still that sandbox process (not a recycled PID)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return alive(pid) and marker.encode() in argv and str(sandbox.root).encode() in argv


def _terminate(pid: int, marker: str, timeout: float) -> None:
    """SIGTERM, wait, SIGKILL. The processes are not our children once `start` returned: poll /proc."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while alive(pid):
            time.sleep(0.05)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # reap it when it was our child (a failed start)
