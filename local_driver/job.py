"""Who the job is (design.md "Job identity") and what task it asks for, from the runner's environment.

The runner passes every CI/CD variable as `CUSTOM_ENV_<NAME>`. Identity variables come from GitLab itself, so
a missing or malformed one is a system problem (ConfigError). The FARGATE_* variables are the job author's, so
a bad one is the job's fault (JobInputError: a build failure the runner does not retry).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

from local_driver.errors import ConfigError, JobInputError
from local_driver.settings import PLATFORM_VERSION_RE, TASK_DEFINITION_RE, Settings

PREFIX = "CUSTOM_ENV_"
RUNNER_RE = re.compile(r"^[A-Za-z0-9_-]{1,12}$")
DIGITS_RE = re.compile(r"^[0-9]{1,19}$")
JOB_NAME_MAX = 255
# Fargate's CPU units; the API checks the memory that goes with them (design.md: FARGATE_MAX_*).
FARGATE_CPU_UNITS = (256, 512, 1024, 2048, 4096, 8192, 16384)
FARGATE_MEMORY_RANGE = (512, 122880)


@dataclass(frozen=True)
class Job:
    runner: str
    job_id: str
    project_id: str
    pipeline_id: str
    gitlab_url: str | None = None
    project_path: str | None = None
    job_name: str | None = None
    timeout_seconds: int | None = None

    @property
    def key(self) -> str:
        return f"{self.runner}-{self.job_id}"


@dataclass(frozen=True)
class TaskRequest:
    """What the runner asks the orchestrator for; the API checks it against its allowlist and limits."""

    task_definition: str | None = None
    platform_version: str | None = None
    cpu: int | None = None
    memory: int | None = None


def _var(environ: Mapping[str, str], name: str) -> str:
    return environ.get(PREFIX + name, "").strip()


# The variables `run` and `cleanup` need to find their job (the session agent is handed only these).
KEY_VARIABLES = tuple(PREFIX + n for n in ("CI_JOB_ID", "CI_RUNNER_SHORT_TOKEN", "CI_SERVER_URL"))


def job_key(environ: Mapping[str, str]) -> str:
    """run and cleanup need only the key; it comes from the same variables prepare used."""
    job_id = _var(environ, "CI_JOB_ID")
    if not DIGITS_RE.match(job_id):
        raise ConfigError(
            f"{PREFIX}CI_JOB_ID {job_id!r} is not a GitLab job id: is GitLab Runner running this?"
        )
    return f"{runner_name(environ)}-{job_id}"


def runner_name(environ: Mapping[str, str]) -> str:
    token = _var(environ, "CI_RUNNER_SHORT_TOKEN")
    if token:
        if not RUNNER_RE.match(token):
            raise ConfigError(f"{PREFIX}CI_RUNNER_SHORT_TOKEN {token!r} is not 1-12 of [A-Za-z0-9_-]")
        return token
    server = _var(environ, "CI_SERVER_URL")
    if not server:
        raise ConfigError(
            f"neither {PREFIX}CI_RUNNER_SHORT_TOKEN nor {PREFIX}CI_SERVER_URL is set: "
            "is GitLab Runner running this driver?"
        )
    return "u" + hashlib.sha256(server.encode()).hexdigest()[:11]


def _digits(environ: Mapping[str, str], name: str) -> str:
    value = _var(environ, name)
    if not value:
        raise ConfigError(f"{PREFIX}{name} is not set: is GitLab Runner running this driver?")
    if not DIGITS_RE.match(value):
        raise ConfigError(f"{PREFIX}{name} {value!r} is not a GitLab id (1-19 digits)")
    return value


def job_from_environ(environ: Mapping[str, str]) -> Job:
    timeout = _var(environ, "CI_JOB_TIMEOUT")
    if timeout and not timeout.isdigit():
        raise ConfigError(f"{PREFIX}CI_JOB_TIMEOUT {timeout!r} is not a number of seconds")
    return Job(
        runner=runner_name(environ),
        job_id=_digits(environ, "CI_JOB_ID"),
        project_id=_digits(environ, "CI_PROJECT_ID"),
        pipeline_id=_digits(environ, "CI_PIPELINE_ID"),
        gitlab_url=_var(environ, "CI_SERVER_URL") or None,
        project_path=_var(environ, "CI_PROJECT_PATH") or None,
        job_name=(_var(environ, "CI_JOB_NAME") or None) and _var(environ, "CI_JOB_NAME")[:JOB_NAME_MAX],
        timeout_seconds=int(timeout) if timeout and int(timeout) > 0 else None,
    )


def task_request(
    environ: Mapping[str, str],
    settings: Settings,
    task_def_flag: str | None = None,
    platform_version_flag: str | None = None,
) -> TaskRequest:
    """Flag, then job variable, then fargate.toml: the Go driver's order (its flags read the same env)."""
    task_definition = task_def_flag or _checked(
        environ, "FARGATE_TASK_DEFINITION", TASK_DEFINITION_RE, "a task definition family[:revision] or ARN"
    )
    if task_def_flag and not TASK_DEFINITION_RE.match(task_def_flag):
        raise ConfigError(f"--task-def {task_def_flag!r} is not a task definition family[:revision] or ARN")
    platform_version = platform_version_flag or _checked(
        environ, "FARGATE_PLATFORM_VERSION", PLATFORM_VERSION_RE, "LATEST or a version like 1.4.0"
    )
    if platform_version_flag and not PLATFORM_VERSION_RE.match(platform_version_flag):
        raise ConfigError(
            f"--platform-version {platform_version_flag!r} is not LATEST or a version like 1.4.0"
        )
    return TaskRequest(
        task_definition=task_definition or settings.task_definition,
        platform_version=platform_version or settings.platform_version,
        cpu=_cpu(environ),
        memory=_memory(environ),
    )


def _checked(environ: Mapping[str, str], name: str, pattern: re.Pattern, what: str) -> str | None:
    value = _var(environ, name)
    if value and not pattern.match(value):
        raise JobInputError(f"job variable {name}={value!r} is not {what}")
    return value or None


def _cpu(environ: Mapping[str, str]) -> int | None:
    value = _var(environ, "FARGATE_CPU")
    if not value:
        return None
    if not value.isdigit() or int(value) not in FARGATE_CPU_UNITS:
        units = ", ".join(str(u) for u in FARGATE_CPU_UNITS)
        raise JobInputError(f"job variable FARGATE_CPU={value!r} is not a Fargate CPU size ({units})")
    return int(value)


def _memory(environ: Mapping[str, str]) -> int | None:
    value = _var(environ, "FARGATE_MEMORY")
    if not value:
        return None
    low, high = FARGATE_MEMORY_RANGE
    if not value.isdigit() or not low <= int(value) <= high:
        raise JobInputError(
            f"job variable FARGATE_MEMORY={value!r} is not a memory size in MiB ({low}-{high})"
        )
    return int(value)


# Request fields a job variable can set: a 400 naming one of these is the job's fault.
JOB_VARIABLE_FIELDS = {
    "task_definition": "FARGATE_TASK_DEFINITION",
    "platform_version": "FARGATE_PLATFORM_VERSION",
    "cpu": "FARGATE_CPU",
    "memory": "FARGATE_MEMORY",
}


def create_body(job: Job, request: TaskRequest, ssh_public_key: str, ssh_host_key: str) -> dict:
    """POST /jobs body (design.md). `ssh_host_key` is a private key: this dict must never be logged."""
    body = {
        "runner": job.runner,
        "job_id": job.job_id,
        "gitlab_url": job.gitlab_url,
        "project_id": job.project_id,
        "pipeline_id": job.pipeline_id,
        "project_path": job.project_path,
        "job_name": job.job_name,
        "ssh_public_key": ssh_public_key,
        "ssh_host_key": ssh_host_key,
        "timeout_seconds": job.timeout_seconds,
        "task_definition": request.task_definition,
        "cpu": request.cpu,
        "memory": request.memory,
        "platform_version": request.platform_version,
    }
    return {k: v for k, v in body.items() if v is not None}
