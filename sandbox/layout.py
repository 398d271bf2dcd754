"""Names, addresses and file locations the sandbox's processes and its users share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REGION = "eu-west-1"
ACCOUNT_ID = "123456789012"  # moto's default account
AVAILABILITY_ZONES = ("eu-west-1a", "eu-west-1b", "eu-west-1c")
CLUSTER = "fargate-ci"
TABLE = "fargate-ci-jobs"
QUEUE = "fargate-ci-task-events"
RULE = "fargate-ci-task-state-change"
CONTAINER = "ci-coordinator"
TASK_FAMILY = "ci-coordinator"
LARGE_TASK_FAMILY = "ci-coordinator-large"
OTHER_TASK_FAMILY = "ci-other"  # registered but not allowed: tests use it to check the allowlist
IMAGE = f"{ACCOUNT_ID}.dkr.ecr.{REGION}.amazonaws.com/fargate-ci/debian:latest"
STOP_TIMEOUT = 10  # seconds between SIGTERM and SIGKILL on StopTask (the task definition's stopTimeout)

# The two IAM users the API accepts: (profile, IAM user name).
IDENTITIES = (("sandbox", "runner-a"), ("sandbox-other", "runner-b"))
# And one role, assumed as botocore does (a new session name per set of temporary credentials): profile
# `sandbox-role` holds one session's credentials; `control.assume_role` hands out more.
ROLE_PROFILE = "sandbox-role"
ROLE = "ci-runner"

REPO_ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = REPO_ROOT / "images" / "debian" / "entrypoint.sh"
# Where a task sees it: bound in at a fixed path, so a checkout under /tmp or /root (private in a task) works.
TASK_ENTRYPOINT = "/run/image/entrypoint.sh"


def user_arn(user: str) -> str:
    return f"arn:aws:iam::{ACCOUNT_ID}:user/{user}"


def assumed_role_arn(role: str, session: str | None = None) -> str:
    """A session's caller ARN; without a session, the role as the orchestrator names the owner."""
    arn = f"arn:aws:sts::{ACCOUNT_ID}:assumed-role/{role}"
    return f"{arn}/{session}" if session else arn


@dataclass(frozen=True)
class SandboxDir:
    """Everything a sandbox keeps lives under one directory."""

    root: Path

    @classmethod
    def at(cls, path: str | Path) -> SandboxDir:
        return cls(Path(path).expanduser().resolve())

    @property
    def state_file(self) -> Path:
        return self.root / "sandbox.json"

    @property
    def toml_path(self) -> Path:
        return self.root / "fargate.toml"

    @property
    def credentials(self) -> Path:
        return self.root / "credentials"

    @property
    def role_secret(self) -> Path:
        """What the sandbox's STS derives the role's session credentials from (0600)."""
        return self.root / "role-secret"

    @property
    def metadata(self) -> Path:
        return self.root / "metadata"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def task_logs(self) -> Path:
        return self.root / "logs" / "tasks"

    @property
    def tasks(self) -> Path:
        """Per-task writable directories (/builds, /cache), removed when the task stops."""
        return self.root / "tasks"

    @property
    def run(self) -> Path:
        """Hand-over files between `start` and the processes it launches."""
        return self.root / "run"

    @property
    def lock(self) -> Path:
        return self.run / "sandbox.lock"

    def ready_file(self, process: str) -> Path:
        return self.run / f"{process}.json"
