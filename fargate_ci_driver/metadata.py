"""The per-job state prepare leaves for run and cleanup (design.md "Metadata directory").

`<dir>/<job_key>.json` holds the job key, attempt, task ARN, address, SSH port and user and the pinned host
public key (as the task published it through the orchestrator); `<dir>/<job_key>.key` the client private
key and, once the orchestrator issued it, the key's certificate (a public line after the PEM).
Directory 0700, files 0600, written atomically
(write a temp file, then rename), so a SIGTERM never leaves a half-written file behind. prepare creates them
exclusively (`claim`: a hard link, which fails when the name exists): it never overwrites another job's
files; only the job that created them updates them afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from dataclasses import asdict, dataclass, fields

from fargate_ci_driver.errors import StateError, StateExists


@dataclass
class JobState:
    job_key: str
    ssh_port: int
    ssh_user: str
    host_public_key: str
    attempt: int | None = None
    task_arn: str | None = None
    address: str | None = None


class MetadataDir:
    def __init__(self, directory: str) -> None:
        self.directory = directory

    def state_path(self, job_key: str) -> str:
        return os.path.join(self.directory, f"{job_key}.json")

    def key_path(self, job_key: str) -> str:
        return os.path.join(self.directory, f"{job_key}.key")

    def ensure(self) -> None:
        """Create the directory 0700, or tighten an existing one: it holds private keys."""
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            mode = stat.S_IMODE(os.stat(self.directory).st_mode)
            if mode & 0o077:
                os.chmod(self.directory, 0o700)
        except OSError as exc:
            raise StateError(f"metadata directory {self.directory}: {exc.strerror or exc}") from exc

    def claim(self, state: JobState, private_pem: str) -> None:
        """Create the job's state and key files, never replacing existing ones. Raises StateExists when
        either is already there (its content untouched), StateError on any other failure."""
        key = state.job_key
        self._write(self.state_path(key), json.dumps(asdict(state), indent=1) + "\n", exclusive=True)
        try:
            self._write(self.key_path(key), private_pem, exclusive=True)
        except StateError:
            with contextlib.suppress(OSError):
                os.unlink(self.state_path(key))  # ours: created just above
            raise

    def save_client_key(self, job_key: str, private_pem: str, certificate: str = "") -> None:
        """Replace the job's key file (its own job's: prepare holds it), e.g. with the key's certificate."""
        text = private_pem if not certificate else private_pem.rstrip("\n") + "\n" + certificate + "\n"
        self._write(self.key_path(job_key), text)

    def save(self, state: JobState) -> None:
        self._write(self.state_path(state.job_key), json.dumps(asdict(state), indent=1) + "\n")

    def load(self, job_key: str) -> JobState | None:
        """The job's state, or None when prepare never left any."""
        path = self.state_path(job_key)
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StateError(f"job state {path} is unreadable: {exc}") from exc
        known = {f.name for f in fields(JobState)}
        try:
            return JobState(**{k: v for k, v in raw.items() if k in known})
        except TypeError as exc:
            raise StateError(f"job state {path} is incomplete: {exc}") from exc

    def load_client_key(self, job_key: str) -> str:
        path = self.key_path(job_key)
        try:
            with open(path, encoding="ascii") as f:
                return f.read()
        except OSError as exc:
            raise StateError(f"client key {path} is unreadable: {exc.strerror or exc}") from exc

    def remove(self, job_key: str) -> list[str]:
        """Delete the job's files; returns those that existed."""
        removed = []
        for path in (self.key_path(job_key), self.state_path(job_key)):
            try:
                os.unlink(path)
                removed.append(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise StateError(f"cannot remove {path}: {exc.strerror or exc}") from exc
        return removed

    def _write(self, path: str, text: str, exclusive: bool = False) -> None:
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            if exclusive:
                os.link(tmp, path)  # complete or absent, and never over an existing file
                os.unlink(tmp)
            else:
                os.replace(tmp, path)
        except FileExistsError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StateExists(
                f"{path} already exists: another prepare holds this job key; not touching its files"
            ) from exc
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StateError(f"cannot write {path}: {exc.strerror or exc}") from exc
