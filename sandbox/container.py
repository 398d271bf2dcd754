"""A task's container: the real entrypoint under bubblewrap, confined like a Fargate task.

Each container gets its own mount, PID, IPC and UTS namespaces, the host filesystem read-only, a clean
writable /root, /tmp and /run, and its own /builds and /cache. It shares the host's network namespace
(the sandbox gives each task its own 127.x address instead). It runs as root with Docker's default
capabilities, the same set Fargate grants, so it cannot remount or otherwise change the host.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import select
import signal
import subprocess
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from sandbox.layout import ENTRYPOINT, TASK_ENTRYPOINT

# Docker's (and Fargate's) default capability set: no CAP_SYS_ADMIN, so no mounts.
CAPABILITIES = (
    "CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID",
    "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE",
)  # fmt: skip
PRIVATE_DIRS = ("/tmp", "/run", "/root")  # fresh tmpfs per task
TASK_DIRS = ("/builds", "/cache")  # bound from the task's own directory on the host
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class ContainerSpec:
    task_id: str
    hostname: str
    host_dir: Path  # holds builds/ and cache/
    hidden: tuple[Path, ...]  # host paths the job must not see (the sandbox directory)
    command: tuple[str, ...]
    env: dict[str, str]
    log_path: Path


def bwrap_argv(spec: ContainerSpec, info_fd: int) -> list[str]:
    """The bubblewrap command line. The environment goes through exec, never argv (it holds the keys)."""
    argv = ["bwrap", "--die-with-parent", "--unshare-pid", "--unshare-ipc", "--unshare-uts"]
    argv += ["--hostname", spec.hostname, "--cap-drop", "ALL"]
    for cap in CAPABILITIES:
        argv += ["--cap-add", f"CAP_{cap}"]
    # A tmpfs root with every host top-level directory bound read-only, then made read-only itself:
    # the same view as `--ro-bind / /`, but with room for the /builds and /cache mount points.
    argv += ["--tmpfs", "/"]
    skip = {"proc", "dev", *(d.strip("/") for d in PRIVATE_DIRS + TASK_DIRS)}
    for entry in sorted(os.listdir("/")):
        path = f"/{entry}"
        if entry in skip:
            continue
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    argv += ["--dev", "/dev", "--proc", "/proc"]
    for private in PRIVATE_DIRS:
        argv += ["--tmpfs", private]
    for hidden in spec.hidden:
        if not any(hidden.is_relative_to(private) for private in PRIVATE_DIRS):
            argv += ["--tmpfs", str(hidden)]
    for task_dir in TASK_DIRS:
        argv += ["--bind", str(spec.host_dir / task_dir.strip("/")), task_dir]
    argv += ["--ro-bind", str(ENTRYPOINT), TASK_ENTRYPOINT]
    argv += ["--remount-ro", "/", "--chdir", "/root", "--info-fd", str(info_fd), "--", *spec.command]
    return argv


class Container:
    """A started container: the outer bwrap process and the namespace's init it reports."""

    def __init__(self, process: subprocess.Popen, info_fd: int) -> None:
        self.process = process
        self._info_fd = info_fd
        self._init_pid: int | None = None
        self._lock = threading.Lock()

    def init_pid(self, timeout: float = 5.0) -> int | None:
        """The host PID of the namespace's init (bwrap reports it on --info-fd)."""
        with self._lock:
            return self._read_init_pid(timeout)

    def _read_init_pid(self, timeout: float) -> int | None:
        if self._init_pid is None and self._info_fd >= 0:
            data = b""
            with contextlib.suppress(OSError):
                while select.select([self._info_fd], [], [], timeout)[0]:
                    chunk = os.read(self._info_fd, 4096)
                    if not chunk:
                        break
                    data += chunk
            os.close(self._info_fd)
            self._info_fd = -1
            with contextlib.suppress(ValueError):
                self._init_pid = int(json.loads(data)["child-pid"])
        return self._init_pid

    def main_pid(self) -> int | None:
        """The container's main process (the entrypoint, then sshd): the namespace init's child."""
        init = self.init_pid()
        if init is None:
            return None
        try:
            children = Path(f"/proc/{init}/task/{init}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def poll(self) -> int | None:
        return _exit_code(self.process.poll())

    def terminate(self) -> None:
        """SIGTERM to the container's main process, as ECS does on StopTask."""
        pid = self.main_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the namespace's init: the kernel then kills every process of the task."""
        init = self.init_pid(timeout=0.5)
        for pid in (init, self.process.pid):
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            return _exit_code(self.process.wait(timeout))
        except subprocess.TimeoutExpired:
            return None


def _exit_code(returncode: int | None) -> int | None:
    """bwrap already reports a signalled child as 128+N; a signalled bwrap shows as negative."""
    if returncode is None:
        return None
    return 128 - returncode if returncode < 0 else returncode


class ContainerLauncher:
    """Forks every container from one long-lived thread.

    `--die-with-parent` (PR_SET_PDEATHSIG) fires when the *thread* that forked bwrap ends, so forking from
    a short-lived task thread would kill the container with it.
    """

    def __init__(self) -> None:
        self._requests: queue.Queue[tuple[ContainerSpec, Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="container-launcher", daemon=True)
        self._thread.start()

    def start(self, spec: ContainerSpec) -> Container:
        future: Future[Container] = Future()
        self._requests.put((spec, future))
        return future.result(timeout=30)

    def close(self) -> None:
        self._requests.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while (request := self._requests.get()) is not None:
            spec, future = request
            try:
                future.set_result(self._launch(spec))
            except Exception as exc:  # noqa: BLE001 (handed to the waiting task thread)
                future.set_exception(exc)

    @staticmethod
    def _launch(spec: ContainerSpec) -> Container:
        for task_dir in TASK_DIRS:
            (spec.host_dir / task_dir.strip("/")).mkdir(parents=True, exist_ok=True)
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        read_fd, write_fd = os.pipe()
        try:
            with open(spec.log_path, "ab") as log:
                process = subprocess.Popen(
                    bwrap_argv(spec, write_fd),
                    env=spec.env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    pass_fds=(write_fd,),
                    start_new_session=True,
                )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        return Container(process, read_fd)
