"""Who the job is (design.md "Job identity") and what task it asks for.

Every `CUSTOM_ENV_*` variable can be set by whoever edits the job's `.gitlab-ci.yml`: GitLab appends a job's
own variables after the predefined ones, so `CI_JOB_ID`, `CI_PROJECT_ID`, `CI_RUNNER_SHORT_TOKEN`, ... are
all theirs to choose. The job's identity therefore comes only from what GitLab Runner itself writes, the job
payload in `JOB_RESPONSE_FILE` (`id`, `job_info`, `git_info`, `runner_info`), and from the driver's own
configuration (`[Runner] ShortToken`, `GitLabURL`). Where a `CUSTOM_ENV_` variable disagrees, prepare says
so in the job log and the trusted value wins. A missing or malformed payload is a system problem
(ConfigError); a bad FARGATE_* variable is the job's fault (JobInputError: a build failure the runner does
not retry).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from fargate_ci_driver.errors import ConfigError, JobInputError
from fargate_ci_driver.job_marker import RESPONSE_VARIABLE
from fargate_ci_driver.settings import PLATFORM_VERSION_RE, TASK_DEFINITION_RE, Settings

PREFIX = "CUSTOM_ENV_"
JOB_NAME_MAX = 255
# GitLab's ids are int64 (gitlab-runner common/spec/spec.go).
MAX_ID = 2**63 - 1
# The payload carries every job variable, file variables included: big, but not this big.
MAX_PAYLOAD_BYTES = 64 << 20
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
    image: dict | None = None  # {"name", "entrypoint"?}: the job's `image:`
    services: list[dict] | None = None  # the job's `services:`, as GitLab Runner passes them


def _var(environ: Mapping[str, str], name: str) -> str:
    return environ.get(PREFIX + name, "").strip()


# --- the trusted identity -------------------------------------------------------------------------------


def read_job_payload(environ: Mapping[str, str]) -> dict:
    """The job payload GitLab Runner wrote for this job (`JOB_RESPONSE_FILE`). It holds the job token: never
    log it or any part of it but the fields `job_from_payload` takes. Raises ConfigError."""
    path = environ.get(RESPONSE_VARIABLE, "")
    if not path:
        raise ConfigError(
            f"{RESPONSE_VARIABLE} is not set: the job's identity comes from GitLab Runner's job payload "
            "(is GitLab Runner's Custom executor running this driver?)"
        )
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_PAYLOAD_BYTES + 1)
    except OSError as exc:
        raise ConfigError(
            f"{RESPONSE_VARIABLE} {path}: cannot read the job payload: {exc.strerror or exc}"
        ) from None
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise ConfigError(
            f"{RESPONSE_VARIABLE} {path}: over {MAX_PAYLOAD_BYTES >> 20} MiB, not a job payload"
        )
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError):
        raise ConfigError(
            f"{RESPONSE_VARIABLE} {path}: not JSON, so not GitLab Runner's job payload"
        ) from None
    if not isinstance(payload, dict):
        raise ConfigError(
            f"{RESPONSE_VARIABLE} {path}: not a JSON object, so not GitLab Runner's job payload"
        )
    return payload


def job_from_payload(payload: Mapping, settings: Settings, where: str = RESPONSE_VARIABLE) -> Job:
    """The job as GitLab Runner and the driver's configuration say it is. Raises ConfigError."""
    job_info = payload.get("job_info")
    if not isinstance(job_info, dict):
        raise ConfigError(f"{where}: job_info is missing or not an object")
    project_path = _payload_text(job_info, "project_full_path", where, "job_info.") or None
    gitlab_url = settings.gitlab_url or gitlab_instance(payload.get("git_info"), project_path)
    runner_info = payload.get("runner_info")
    timeout = runner_info.get("timeout") if isinstance(runner_info, dict) else None
    name = _payload_text(job_info, "name", where, "job_info.")
    return Job(
        runner=runner_name(settings, gitlab_url, where),
        job_id=_payload_id(payload, "id", where, ""),
        project_id=_payload_id(job_info, "project_id", where, "job_info."),
        pipeline_id=_payload_id(job_info, "pipeline_id", where, "job_info."),
        gitlab_url=gitlab_url,
        project_path=project_path,
        job_name=name[:JOB_NAME_MAX] or None,
        timeout_seconds=timeout if _is_int(timeout) and 0 < timeout <= MAX_ID else None,
    )


def runner_name(settings: Settings, gitlab_url: str | None, where: str = RESPONSE_VARIABLE) -> str:
    """The runner part of the job key: `[Runner] ShortToken`, or else one derived from the GitLab instance
    (job ids are unique per instance, so the key stays unique without the runner's token)."""
    if settings.runner_short_token:
        return settings.runner_short_token
    if not gitlab_url:
        raise ConfigError(
            f"{settings.path}: set [Runner] ShortToken (or GitLabURL): the job payload ({where}) names no "
            "GitLab instance to derive the runner's identity from"
        )
    return "u" + hashlib.sha256(gitlab_url.encode()).hexdigest()[:11]


def gitlab_instance(git_info: object, project_path: str | None) -> str | None:
    """The GitLab instance's base URL from `git_info.repo_url`, without the credentials it carries
    (`https://gitlab-ci-token:<job token>@host/group/project.git`: the token never leaves this function).
    A relative URL root (`https://host/gitlab/group/project.git`) is kept."""
    repo_url = git_info.get("repo_url") if isinstance(git_info, dict) else None
    if not isinstance(repo_url, str) or not repo_url:
        return None
    try:
        parts = urlsplit(repo_url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not host:
        return None
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    path = parts.path.rstrip("/")
    suffix = f"/{project_path}.git" if project_path else None
    root = path[: -len(suffix)] if suffix and path.endswith(suffix) else ""
    return f"{parts.scheme}://{netloc}{root}"


def identity_warnings(job: Job, environ: Mapping[str, str], settings: Settings) -> list[str]:
    """One line for each `CUSTOM_ENV_` identity variable that disagrees with the trusted value (the job's
    `.gitlab-ci.yml` set it, or the runner is not the one configured): the trusted value is used."""
    checks = [
        ("CI_JOB_ID", job.job_id, "the job payload's id"),
        ("CI_PROJECT_ID", job.project_id, "the job payload's job_info.project_id"),
        ("CI_PIPELINE_ID", job.pipeline_id, "the job payload's job_info.pipeline_id"),
    ]
    if job.gitlab_url:
        source = "[Runner] GitLabURL" if settings.gitlab_url else "the job payload's git_info.repo_url"
        checks.append(("CI_SERVER_URL", job.gitlab_url, source))
    if settings.runner_short_token:
        checks.append(("CI_RUNNER_SHORT_TOKEN", settings.runner_short_token, "[Runner] ShortToken"))
    lines = []
    for name, trusted, source in checks:
        value = _var(environ, name)
        if value and value.rstrip("/") != trusted.rstrip("/"):
            shown = value if len(value) <= 80 else value[:80] + "..."
            lines.append(
                f"WARNING: job variable {name}={shown!r} disagrees with {source} ({trusted}): "
                f"using {trusted} (a job's variables may override predefined ones; its identity may not)"
            )
    return lines


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _payload_id(obj: Mapping, name: str, where: str, prefix: str) -> str:
    value = obj.get(name)
    if not _is_int(value) or not 1 <= value <= MAX_ID:
        shown = type(value).__name__ if not _is_int(value) else str(value)
        raise ConfigError(
            f"{where}: {prefix}{name} is not a GitLab id (a positive JSON integer), got {shown}"
        )
    return str(value)


def _payload_text(obj: Mapping, name: str, where: str, prefix: str) -> str:
    value = obj.get(name, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {prefix}{name} is not a string")
    return value.strip()


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


def job_images(environ: Mapping[str, str], payload: Mapping) -> tuple[dict | None, list[dict] | None]:
    """The job's `image:` and `services:` as GitLab Runner hands them to a Custom executor: the image's
    name in `CI_JOB_IMAGE` (set only when the job names one) with its `entrypoint` from the job payload, the
    services as the JSON array in `CI_JOB_SERVICES` (empty without services; gitlab-runner
    executors/custom/custom.go). Both are the job author's: only their shape is checked here, the
    orchestrator validates the rest (and its allowlist)."""
    name = _var(environ, "CI_JOB_IMAGE")
    image = None
    if name:
        image = {"name": name}
        entrypoint = (
            (payload.get("image") or {}).get("entrypoint") if isinstance(payload.get("image"), dict) else None
        )
        if entrypoint:
            if not isinstance(entrypoint, list) or not all(isinstance(a, str) for a in entrypoint):
                raise JobInputError("the job's image:entrypoint must be a list of strings")
            image["entrypoint"] = entrypoint
    raw = environ.get(PREFIX + "CI_JOB_SERVICES", "").strip()
    if not raw:
        return image, None
    try:
        services = json.loads(raw)
    except ValueError:
        raise JobInputError("job variable CI_JOB_SERVICES is not a JSON array of services") from None
    if not isinstance(services, list) or not all(isinstance(s, dict) for s in services):
        raise JobInputError("job variable CI_JOB_SERVICES is not a JSON array of services")
    keep = ("name", "alias", "entrypoint", "command", "variables")
    cleaned = [{k: s[k] for k in keep if s.get(k) not in (None, "", [])} for s in services]
    return image, cleaned or None


# What the orchestrator accepts per service (chalicelib.taskdefs): at most 64 variables of <= 4096 chars.
SERVICE_VARIABLES_MAX = 64
SERVICE_VALUE_MAX = 4096
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_REFERENCE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
# GitLab's predefined variables change with every job (and every commit): in a service's task definition they
# would register one per job. The job's own `variables:` are what services are configured with.
_PREDEFINED = ("CI_", "GITLAB_", "FF_", "RUNNER_")


def with_job_variables(services: list[dict], payload: Mapping) -> tuple[list[dict], list[str]]:
    """Each service with the job's public variables added, as GitLab's Docker executor gives them
    (gitlab-runner executors/docker: `GetAllVariables().PublicOrInternal()`, then the service's own,
    expanded): only variables the payload marks `public` and not masked or file-typed, so no project or
    group secret and not the job token. References expand against those public variables only (never
    against a secret, as with GitLab), unknown ones to nothing, in one pass over raw values (GitLab's
    os.Expand). GitLab's predefined `CI_*`/`GITLAB_*` variables are left out (see _PREDEFINED). A service's
    own variable wins over the job's. Returns the services and the names left out for size, for a warning
    in the job log."""
    public: dict[str, str] = {}
    for variable in payload.get("variables") or []:
        if not isinstance(variable, dict):
            continue
        key, value = variable.get("key"), variable.get("value")
        if (
            variable.get("public") is True
            and not variable.get("masked")
            and not variable.get("file")
            and isinstance(key, str)
            and isinstance(value, str)
            and _NAME.fullmatch(key)
        ):
            public[key] = value

    def expand(value: str) -> str:
        return _REFERENCE.sub(lambda m: public.get(m.group(1) or m.group(2), ""), value)

    shared = {key: expand(value) for key, value in public.items() if not key.startswith(_PREDEFINED)}
    dropped: set[str] = set()
    result = []
    for service in services:
        own = service.get("variables") or []
        if isinstance(own, dict):
            own = [{"key": k, "value": v} for k, v in own.items()]
        if not isinstance(own, list):
            result.append(service)  # the orchestrator names the bad shape
            continue
        names = {v.get("key") for v in own if isinstance(v, dict)}
        merged = list(own)
        for key, value in shared.items():
            if key in names:
                continue
            if len(merged) >= SERVICE_VARIABLES_MAX or len(value) > SERVICE_VALUE_MAX:
                dropped.add(key)
                continue
            merged.append({"key": key, "value": value})
        result.append({**service, "variables": merged} if merged else service)
    return result, sorted(dropped)


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
    "image": "CI_JOB_IMAGE",
    "services": "CI_JOB_SERVICES",
}


def create_body(job: Job, request: TaskRequest, ssh_public_key: str) -> dict:
    """POST /jobs body (design.md). Nothing secret: the client key's public half only."""
    body = {
        "runner": job.runner,
        "job_id": job.job_id,
        "gitlab_url": job.gitlab_url,
        "project_id": job.project_id,
        "pipeline_id": job.pipeline_id,
        "project_path": job.project_path,
        "job_name": job.job_name,
        "ssh_public_key": ssh_public_key,
        "timeout_seconds": job.timeout_seconds,
        "task_definition": request.task_definition,
        "cpu": request.cpu,
        "memory": request.memory,
        "platform_version": request.platform_version,
        "image": request.image,
        "services": request.services,
    }
    return {k: v for k, v in body.items() if v is not None}
