"""A task's container: one process tree under bubblewrap, confined like a Fargate container, unprivileged.

Every container runs in a user namespace that maps only the sandbox's own user, as root (uid 0 inside), so
the sandbox needs no root and a task can reach nothing its user could not. A container sees only its
image's root filesystem (sandbox.images), the task's volumes and its own /tmp, /run and /root; never the
host's files. The containers of one task share its user and PID namespaces (the first one creates them, the
others join: ECS's `pidMode: task`) and, here, the host's network namespace (the sandbox gives each task its
own 127.x address instead). Each runs as root with Docker's default capabilities, the set Fargate grants.

In a user namespace the kernel refuses setgroups(2) (bwrap writes `deny` to /proc/self/setgroups, as an
unprivileged user must), and OpenSSH's sshd calls it when it switches users. A seccomp filter turns that one
call into a successful no-op: the group list stays [0], which is what it would be set to anyway.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import queue
import select
import signal
import struct
import subprocess
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.images import PATH, Image

# Docker's (and Fargate's) default capability set: no CAP_SYS_ADMIN, so no mounts.
CAPABILITIES = (
    "CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID",
    "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE",
)  # fmt: skip
PRIVATE_DIRS = ("/tmp", "/run", "/root")  # fresh tmpfs per container
TASK_DIRS = ("/builds", "/cache")  # the task image's writable places (its root is read-only)
log = logging.getLogger("sandbox.task")
__all__ = ["PATH", "Container", "ContainerLauncher", "ContainerSpec", "bwrap_argv", "seccomp_program"]


@dataclass(frozen=True)
class ContainerSpec:
    task_id: str
    name: str
    hostname: str
    image: Image
    host_dir: Path  # the task's directory: builds/, cache/, volumes/
    command: tuple[str, ...]
    env: dict[str, str]
    log_path: Path
    workdir: str = "/"
    # (host path, path in the container): the task's volumes this container mounts (writable)
    mounts: tuple[tuple[str, str], ...] = ()
    extra_capabilities: tuple[str, ...] = ()  # linuxParameters.capabilities.add
    join_pid: int | None = None  # a process of the task's first container: share its user and PID namespaces
    task_dirs: bool = field(
        default=True
    )  # bind the task's /builds and /cache (the task image's writable dirs)


def bwrap_argv(
    spec: ContainerSpec, info_fd: int, seccomp_fd: int, ns_fds: tuple[int, int] | None
) -> list[str]:
    """The bubblewrap command line. The environment goes through exec, never argv (it holds the keys).

    `ns_fds`: open user and PID namespace files of the task's first container, to join them."""
    argv = ["bwrap", "--die-with-parent"]
    if ns_fds is None:
        argv += ["--unshare-user", "--unshare-pid"]
    else:
        argv += ["--userns", str(ns_fds[0]), "--pidns", str(ns_fds[1])]
    argv += ["--uid", "0", "--gid", "0", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    argv += ["--hostname", spec.hostname, "--cap-drop", "ALL"]
    for cap in (*CAPABILITIES, *spec.extra_capabilities):
        argv += ["--cap-add", f"CAP_{cap}"]
    image = spec.image
    # A tmpfs root holding the image's directories: nothing of the host but what the image names.
    argv += ["--tmpfs", "/"]
    for target, path in image.symlinks:
        argv += ["--symlink", target, path]
    for source, path in image.binds:
        argv += ["--ro-bind", source, path]
    argv += ["--dev", "/dev", "--proc", "/proc"]
    for private in PRIVATE_DIRS:
        argv += ["--tmpfs", private]
    if spec.task_dirs:
        for task_dir in TASK_DIRS:
            argv += ["--bind", str(spec.host_dir / task_dir.strip("/")), task_dir]
    for source, path in spec.mounts:
        argv += ["--bind", source, path]
    for source, path in image.files:
        argv += ["--ro-bind", source, path]
    if image.read_only_root:
        argv += ["--remount-ro", "/"]
    argv += ["--chdir", spec.workdir or "/", "--info-fd", str(info_fd), "--seccomp", str(seccomp_fd)]
    return [*argv, "--", *spec.command]


# seccomp-bpf: `setgroups` returns 0 without doing anything; every other call is allowed.
_AUDIT_ARCH = {"x86_64": (0xC000003E, 116), "aarch64": (0xC00000B7, 159)}  # (AUDIT_ARCH_*, __NR_setgroups)


def seccomp_program() -> bytes:
    """The filter as bwrap's --seccomp reads it: struct sock_filter[] in the machine's byte order."""
    arch, setgroups = _AUDIT_ARCH[platform.machine()]

    def insn(code: int, jt: int, jf: int, k: int) -> bytes:
        return struct.pack("=HBBI", code, jt, jf, k)

    load, jeq, ret = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
    allow, errno_0 = 0x7FFF0000, 0x00050000  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | 0: "succeeded"
    return b"".join(
        (
            insn(load, 0, 0, 4),  # seccomp_data.arch
            insn(jeq, 0, 3, arch),
            insn(load, 0, 0, 0),  # seccomp_data.nr
            insn(jeq, 0, 1, setgroups),
            insn(ret, 0, 0, errno_0),
            insn(ret, 0, 0, allow),
        )
    )


class Container:
    """A started container: the outer bwrap process and the namespace's init it reports."""

    def __init__(self, process: subprocess.Popen, info_fd: int, *, joined: bool = False) -> None:
        self.process = process
        self.joined = joined  # joined the task's PID namespace: no init of its own
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
        """The container's main process (the entrypoint, then sshd): the namespace init's child, or for a
        container that joined the task's namespace, the process bwrap reports itself."""
        init = self.init_pid()
        if init is None or self.joined:
            return init
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
        """SIGKILL the namespace's init (the task's first container): the kernel then kills every process
        of the task; a container that joined it loses its main process."""
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


def wait_for_id_maps(pid: int, timeout: float = 5.0) -> bool:
    """Whether the user namespace of `pid` has its uid and gid maps written, waiting up to `timeout`.

    bwrap reports a new container's pid as soon as it has cloned it, before the maps of its new user
    namespace are written; a container that joins that namespace meanwhile runs with ids the namespace does
    not map, and bwrap's own PID handshake (SCM_CREDENTIALS) then fails with EINVAL ("Can't send pid")."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            written = all(Path(f"/proc/{pid}/{name}").read_text().strip() for name in ("uid_map", "gid_map"))
        except OSError:
            return False  # gone: the launch fails on its own, with bwrap's words
        if written:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


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
                future.set_result(self._launch_once_started(spec))
            except Exception as exc:  # noqa: BLE001 (handed to the waiting task thread)
                future.set_exception(exc)

    def _launch_once_started(self, spec: ContainerSpec) -> Container:
        """Launch; a container joining its task's namespaces is launched again if its bwrap died before it
        started anything (its PID handshake failed once under load, "Can't send pid: Invalid argument",
        before `wait_for_id_maps`: a failure of the emulation that Fargate does not have)."""
        container = self._launch(spec)
        if spec.join_pid is None or container.init_pid() is not None or container.wait(timeout=2) is None:
            return container
        log.warning(
            "container %s of task %s: bwrap failed to start; launching it again", spec.name, spec.task_id
        )
        return self._launch(spec)

    @staticmethod
    def _launch(spec: ContainerSpec) -> Container:
        for task_dir in TASK_DIRS:
            (spec.host_dir / task_dir.strip("/")).mkdir(parents=True, exist_ok=True)
        for source, _ in spec.mounts:
            if not Path(source).exists():  # a volume's directory (files, like /etc/hosts, exist already)
                Path(source).mkdir(parents=True)
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        fds: list[int] = []
        read_fd, write_fd = os.pipe()
        try:
            seccomp_fd = os.memfd_create("sandbox-seccomp", 0)
            fds.append(seccomp_fd)
            os.write(seccomp_fd, seccomp_program())
            os.lseek(seccomp_fd, 0, os.SEEK_SET)
            ns_fds = None
            if spec.join_pid is not None:
                wait_for_id_maps(spec.join_pid)
                ns_fds = (
                    os.open(f"/proc/{spec.join_pid}/ns/user", os.O_RDONLY),
                    os.open(f"/proc/{spec.join_pid}/ns/pid", os.O_RDONLY),
                )
                fds += ns_fds
            with open(spec.log_path, "ab") as log:
                process = subprocess.Popen(
                    bwrap_argv(spec, write_fd, seccomp_fd, ns_fds),
                    env=spec.env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    pass_fds=(write_fd, *fds),
                    start_new_session=True,
                )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
            for fd in fds:
                os.close(fd)
        return Container(process, read_fd, joined=spec.join_pid is not None)
