"""The sandbox's image store: the images its tasks can run, as root filesystem views for bubblewrap.

Two images are built in:
- the project's task image (`layout.IMAGE`, any tag): the machine's /usr (sshd, bash, git, ...) with a
  private copy of /etc that holds only what any user of the machine may read anyway (no host keys, no
  shadow), so a task sees what its entrypoint needs and none of the host's private files;
- `busybox` (any tag, Docker Hub's `library/busybox` however it is spelled): a root filesystem holding only
  the static busybox of Debian's `busybox-static` and its applet links (no sshd, no bash, no python, no git).

Derived images are added while the sandbox runs (`derive`, the control URL's POST /images): a name and tag
of Docker Hub's, a base image's filesystem, and config overrides (ExposedPorts, Cmd, Entrypoint, Env,
WorkingDir, User), as a Dockerfile `FROM base` with those instructions would make. Their containers run with
that config, except the user: a task's user namespace maps only uid 0, so they run as root (the config still
says the user, and the registry serves it).

Anything else does not exist, and the task fails as on AWS (CannotPullContainerError). The built-in images
are made once per sandbox (`build`), in its directory; sandbox/registry.py serves them all over HTTP.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import stat
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chalicelib.taskdefs import ImageRef, InvalidImage, parse_image
from sandbox.layout import ENTRYPOINT, IMAGE, TASK_ENTRYPOINT

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static installs it here (scripts/setup-system.sh)
# Host top-level entries the task image shows (read-only): the programs and their libraries.
TASK_IMAGE_TOP = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
# sshd's privilege-separation user must be one the task's user namespace maps (only root is mapped: the
# sandbox runs unprivileged), so the task image's copy of /etc names it uid 0. See container.py.
PRIVSEP_USER = "sshd"


@dataclass(frozen=True)
class Image:
    """An image as a container starts from it: its filesystem and its config (Docker's image config)."""

    name: str  # the repository it was found as, e.g. docker.io/library/busybox
    binds: tuple[tuple[str, str], ...]  # (host path, path in the container), read-only
    symlinks: tuple[tuple[str, str], ...] = ()  # (target, path in the container)
    # read-only too, but bound after the container's private /tmp, /run and /root are mounted
    files: tuple[tuple[str, str], ...] = ()
    read_only_root: bool = False  # the task image keeps today's read-only root; others are writable
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = (("PATH", PATH),)
    workdir: str = "/"
    user: str = ""  # as Docker's config: "" or "0" is root
    exposed_ports: tuple[str, ...] = field(default=())  # as Docker's config has them: "8080/tcp"


class ImageStore:
    """The images of one sandbox, under `root` (its directory's `images/`)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._derived: dict[tuple[str, str], Image] = {}  # (repository name, tag) -> image
        self._lock = threading.Lock()

    @property
    def task_etc(self) -> Path:
        return self.root / "task" / "etc"

    @property
    def busybox_root(self) -> Path:
        return self.root / "busybox" / "rootfs"

    def build(self) -> None:
        """Make both images (again, from scratch: a sandbox start sees the machine as it is now)."""
        shutil.rmtree(self.root, ignore_errors=True)
        self._build_task_etc()
        self._build_busybox()

    def resolve(self, reference: str) -> Image | None:
        """The image a container definition names, or None when no such image exists."""
        try:
            ref = parse_image(reference)
        except InvalidImage:
            return None
        with self._lock:
            derived = self._derived.get((ref.repository_name, ref.tag))
        if derived is not None:
            return derived
        if ref.repository_name == parse_image(IMAGE).repository_name:
            return self._task_image(ref)
        if ref.repository_name == "docker.io/library/busybox":
            return self._busybox(ref)
        return None

    def derive(self, name: str, base: str, config: Mapping[str, Any]) -> Image:
        """Add the image `name` (Docker Hub's, with a tag): `base`'s filesystem and config, with `config`'s
        overrides in Docker's image-config names. ValueError names what is wrong."""
        try:
            ref = parse_image(name)
        except InvalidImage as exc:
            raise ValueError(f"name: {exc}") from None
        if ref.registry != "docker.io" or ref.digest or ref.repository == "library/busybox":
            raise ValueError("name must be a Docker Hub name with a tag (not busybox), e.g. sandbox/web:1")
        parent = self.resolve(base) if isinstance(base, str) else None
        if parent is None:
            raise ValueError(f"base: no image {base!r} in the sandbox")
        if not isinstance(config, Mapping) or set(config) - DERIVED_CONFIG_KEYS:
            raise ValueError(f"config takes only {', '.join(sorted(DERIVED_CONFIG_KEYS))}")
        changes: dict[str, Any] = {"name": ref.repository_name}
        if "Entrypoint" in config:
            # As a Dockerfile's ENTRYPOINT: it resets the base's CMD unless CMD is given too.
            changes["entrypoint"], changes["cmd"] = _strings(config["Entrypoint"], "Entrypoint"), ()
        if "Cmd" in config:
            changes["cmd"] = _strings(config["Cmd"], "Cmd")
        if "Env" in config:
            env = dict(parent.env)
            for item in _strings(config["Env"], "Env"):
                key, sep, value = item.partition("=")
                if not sep or not key:
                    raise ValueError(f"Env: {item!r} is not NAME=VALUE")
                env[key] = value
            changes["env"] = tuple(env.items())
        if "WorkingDir" in config:
            workdir = config["WorkingDir"]
            if not isinstance(workdir, str) or not workdir.startswith("/"):
                raise ValueError("WorkingDir must be an absolute path")
            changes["workdir"] = workdir
        if "User" in config:
            if not isinstance(config["User"], str):
                raise ValueError("User must be a string")
            changes["user"] = config["User"]
        if "ExposedPorts" in config:
            changes["exposed_ports"] = _ports(config["ExposedPorts"])
        image = dataclasses.replace(parent, **changes)
        with self._lock:
            self._derived[(ref.repository_name, ref.tag)] = image
        return image

    # --- the two images -----------------------------------------------------------------------------

    def _task_image(self, ref: ImageRef) -> Image:
        binds: list[tuple[str, str]] = []
        links: list[tuple[str, str]] = []
        for entry in TASK_IMAGE_TOP:
            path = f"/{entry}"
            if os.path.islink(path):
                links.append((os.readlink(path), path))
            elif os.path.isdir(path):
                binds.append((path, path))
        binds.append((str(self.task_etc), "/etc"))
        return Image(
            name=ref.repository_name,
            binds=tuple(binds),
            symlinks=tuple(links),
            # In the image it is /usr/local/bin/entrypoint.sh; here /usr is the host's, so it has a place of
            # its own (a checkout under /tmp or /root, private in a task, works too).
            files=(
                (str(ENTRYPOINT), TASK_ENTRYPOINT),
                (
                    str(ENTRYPOINT.with_name("job-shell.sh")),
                    TASK_ENTRYPOINT.replace("entrypoint.sh", "job-shell.sh"),
                ),
            ),
            read_only_root=True,
            entrypoint=("/bin/sh", TASK_ENTRYPOINT),  # as the image runs it, minus tini
            env=(("PATH", PATH), ("LANG", "C.UTF-8")),
            workdir="/root",
            exposed_ports=("22/tcp",),
        )

    def _busybox(self, ref: ImageRef) -> Image:
        # Docker Hub's busybox image: Cmd ["sh"], no entrypoint, no working directory, root.
        return Image(
            name=ref.repository_name,
            binds=((str(self.busybox_root / "bin"), "/bin"),),
            cmd=("sh",),
        )

    # --- building -----------------------------------------------------------------------------------

    def _build_task_etc(self) -> None:
        """A copy of the host's /etc with only what every user may read (no keys, no shadow)."""
        target = self.task_etc
        for directory, dirs, files in os.walk("/etc"):
            rel = os.path.relpath(directory, "/etc")
            out = target / rel
            out.mkdir(parents=True, exist_ok=True)
            for name in list(dirs):
                path = os.path.join(directory, name)
                if os.path.islink(path):
                    dirs.remove(name)
                    files.append(name)
                elif not _world_readable(path, directory=True):
                    dirs.remove(name)
            for name in files:
                path = os.path.join(directory, name)
                if os.path.islink(path):
                    os.symlink(os.readlink(path), out / name)
                elif _world_readable(path) and stat.S_ISREG(os.stat(path).st_mode):
                    shutil.copyfile(path, out / name)
        if not (target / "hosts").is_file() or (target / "hosts").is_symlink():
            (target / "hosts").unlink(missing_ok=True)  # each container binds its own over this one
            (target / "hosts").write_text("127.0.0.1\tlocalhost\n")
        users = _privsep_passwd(target / "passwd")
        # No password for anyone ("*": none works; sshd takes "!" as locked, and takes keys only anyway).
        (target / "shadow").write_text("".join(f"{user}:*:19000:0:99999:7:::\n" for user in users))
        for path in target.rglob("*"):
            if not path.is_symlink():
                path.chmod(0o755 if path.is_dir() else 0o644)

    def _build_busybox(self) -> None:
        if not _is_static(BUSYBOX):
            raise RuntimeError(
                f"{BUSYBOX} is missing or not a static binary: install busybox-static "
                "(scripts/setup-system.sh)"
            )
        bin_dir = self.busybox_root / "bin"
        bin_dir.mkdir(parents=True)
        shutil.copy2(BUSYBOX, bin_dir / "busybox")
        applets = subprocess.run(
            [str(BUSYBOX), "--list"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.split()
        for applet in applets:
            if applet != "busybox" and "/" not in applet:
                os.symlink("busybox", bin_dir / applet)


DERIVED_CONFIG_KEYS = frozenset({"ExposedPorts", "Cmd", "Entrypoint", "Env", "WorkingDir", "User"})
_PORT = re.compile(r"[0-9]{1,5}(?:-[0-9]{1,5})?(?:/(?:tcp|udp|sctp))?", re.ASCII)


def _strings(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > 64 or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key} must be a list of at most 64 strings")
    return tuple(value)


def _ports(value: object) -> tuple[str, ...]:
    """ExposedPorts as Docker's config has it ({"8080/tcp": {}}), or a list of such names."""
    names = list(value) if isinstance(value, dict | list) else None
    if names is None or len(names) > 64 or not all(isinstance(n, str) and _PORT.fullmatch(n) for n in names):
        raise ValueError('ExposedPorts must name ports like "8080/tcp" (at most 64)')
    return tuple(n if "/" in n else f"{n}/tcp" for n in names)


def _world_readable(path: str, *, directory: bool = False) -> bool:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    need = stat.S_IROTH | (stat.S_IXOTH if directory else 0)
    return mode & need == need


def _privsep_passwd(passwd: Path) -> list[str]:
    """Give sshd's privilege-separation user uid/gid 0 (the one id mapped); return every user name."""
    lines, users = [], []
    for line in passwd.read_text().splitlines():
        fields = line.split(":")
        if len(fields) == 7:
            users.append(fields[0])
            if fields[0] == PRIVSEP_USER:
                fields[2:4] = ["0", "0"]
        lines.append(":".join(fields))
    if PRIVSEP_USER not in users:
        lines.append(f"{PRIVSEP_USER}:x:0:0::/run/sshd:/usr/sbin/nologin")
        users.append(PRIVSEP_USER)
    passwd.write_text("\n".join(lines) + "\n")
    return users


def _is_static(binary: Path) -> bool:
    """An ELF file without a program interpreter (PT_INTERP): it runs in a root with no libraries."""
    try:
        data = binary.read_bytes()
    except OSError:
        return False
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit ELF only (the machines here)
        return False
    order = "little" if data[5] == 1 else "big"
    phoff = int.from_bytes(data[0x20:0x28], order)
    phentsize = int.from_bytes(data[0x36:0x38], order)
    phnum = int.from_bytes(data[0x38:0x3A], order)
    for index in range(phnum):
        start = phoff + index * phentsize
        if int.from_bytes(data[start : start + 4], order) == 3:  # PT_INTERP
            return False
    return True
