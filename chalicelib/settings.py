"""Orchestrator settings: read from the Lambda's environment once, validated, typed.

Every setting has its environment variable name next to it; a bad value is a ConfigurationError naming
that variable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from urllib.parse import urlsplit

from chalicelib.errors import ConfigurationError

_TASK_DEF = re.compile(
    r"(arn:aws[a-z-]*:ecs:[a-z0-9-]+:\d{12}:task-definition/)?[A-Za-z0-9_-]{1,255}(:\d+)?", re.ASCII
)

_ROLE_NAME = re.compile(r"[\w+=,.@-]{1,64}", re.ASCII)
MAX_WARM_POOL = 200  # a bound on what one reaper run starts and watches


@dataclass(frozen=True)
class CapacityShare:
    provider: str
    weight: int
    base: int = 0


@dataclass(frozen=True)
class Settings:
    cluster: str
    subnets: tuple[str, ...]
    security_groups: tuple[str, ...]
    table: str
    default_task_definition: str
    allowed_task_definitions: tuple[str, ...]
    container_name: str = "ci-coordinator"
    assign_public_ip: bool = False
    address: str = "private"  # which address the driver SSHes to: private or public
    platform_version: str = "LATEST"
    capacity_providers: tuple[CapacityShare, ...] = ()
    launch_type: str = "FARGATE"
    max_cpu: int = 4096
    max_memory: int = 16384
    default_timeout: int = 3600
    max_timeout: int = 86400
    grace_seconds: int = 600
    # The orphan backstop (design.md "Orphans"): the task's watchdog stops an orphan within minutes; this
    # catches what it cannot (an image without it). It must stay above an API outage we ride out (5 min)
    # plus the gap the driver's beats then leave (HeartbeatInterval 300 s: up to 600 s for a 5-min outage).
    heartbeat_timeout: int = 900
    retention_days: int = 7
    refresh_after: int = 10
    launch_lease: int = 30
    extra_tags: tuple[tuple[str, str], ...] = field(default=())
    region: str = ""  # the Lambda's own (AWS_REGION): a task definition ARN must name it
    # Per-job images (design.md "Per-job images"): registry/repository globs a job's image and services may
    # name (none: jobs cannot choose an image), the Secrets Manager secret for private registries (not ECR),
    # and how long an unused per-job task definition stays registered.
    allowed_images: tuple[str, ...] = ()
    repository_credentials: str = ""
    task_definition_idle_seconds: int = 7 * 86400
    # Registry hosts served elsewhere (host, base URL): the sandbox points docker.io at its own registry.
    # Only these may be plain HTTP or on loopback (chalicelib/registry.py).
    registry_endpoints: tuple[tuple[str, str], ...] = ()
    # The tasks' IAM role (its name): a task proves who it is by signing with its credentials, whose session
    # ECS names after the task id (design.md "The task's host key").
    task_role_name: str = ""
    # The SSH user CA: KMS key ids or ARNs, the first signs, all are trusted by new tasks (rotation).
    ca_key_ids: tuple[str, ...] = ()
    # This API's own URL: tasks publish their host key there (passed to them as FARGATE_CI_API_URL).
    orchestrator_url: str = ""
    # The warm pool: idle tasks of the default task definition and size (0: none).
    warm_pool_size: int = 0
    warm_pool_max_age: int = 3600  # seconds an idle pool task lives before it is recycled

    def is_allowed_task_definition(self, name: str) -> bool:
        """Allowlist entries are families (any revision), `family:rev`, or full ARNs."""
        wanted = _short_task_definition(name)
        family = wanted.split(":")[0]
        for entry in (self.default_task_definition, *self.allowed_task_definitions):
            allowed = _short_task_definition(entry)
            if wanted == allowed or (":" not in allowed and family == allowed):
                return True
        return False


def _short_task_definition(name: str) -> str:
    return name.rsplit("task-definition/", 1)[-1]


def _required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise ConfigurationError(f"orchestrator setting {name} is required")
    return value


def _list(env: Mapping[str, str], name: str, *, required: bool) -> tuple[str, ...]:
    raw = env.get(name, "")
    items = tuple(part.strip() for part in raw.split(",") if part.strip())
    if required and not items:
        raise ConfigurationError(f"orchestrator setting {name} needs at least one value (comma-separated)")
    return items


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int = 0) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigurationError(f"orchestrator setting {name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigurationError(f"orchestrator setting {name} must be at least {minimum}, got {value}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("true", "1", "yes", "enabled"):
        return True
    if raw in ("false", "0", "no", "disabled"):
        return False
    raise ConfigurationError(f"orchestrator setting {name} must be true or false, got {raw!r}")


def _capacity(env: Mapping[str, str]) -> tuple[CapacityShare, ...]:
    shares = []
    for item in _list(env, "FARGATE_CAPACITY_PROVIDERS", required=False):
        parts = item.split(":")
        provider = parts[0]
        if provider not in ("FARGATE", "FARGATE_SPOT"):
            raise ConfigurationError(
                f"orchestrator setting FARGATE_CAPACITY_PROVIDERS: unknown provider {provider!r} "
                "(FARGATE or FARGATE_SPOT)"
            )
        try:
            weight = int(parts[1]) if len(parts) > 1 else 1
            base = int(parts[2]) if len(parts) > 2 else 0
        except ValueError:
            raise ConfigurationError(
                f"orchestrator setting FARGATE_CAPACITY_PROVIDERS: {item!r} is not PROVIDER:WEIGHT[:BASE]"
            ) from None
        shares.append(CapacityShare(provider, weight, base))
    if shares and not any(s.weight > 0 for s in shares):
        raise ConfigurationError("orchestrator setting FARGATE_CAPACITY_PROVIDERS needs one weight above 0")
    return tuple(shares)


def _tags(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    tags = []
    for item in _list(env, "TASK_EXTRA_TAGS", required=False):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigurationError(f"orchestrator setting TASK_EXTRA_TAGS: {item!r} is not KEY=VALUE")
        tags.append((key.strip(), value.strip()))
    return tuple(tags)


_SECRET_ARN = re.compile(
    r"arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:\d{12}:secret:[A-Za-z0-9/_+=.@-]{1,512}", re.ASCII
)


def _secret_arn(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "").strip()
    if value and not _SECRET_ARN.fullmatch(value):
        raise ConfigurationError(
            f"orchestrator setting {name} must be a Secrets Manager secret ARN, got {value!r}"
        )
    return value


def _endpoints(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    endpoints = []
    for item in _list(env, "REGISTRY_ENDPOINTS", required=False):
        host, sep, url = item.partition("=")
        parts = urlsplit(url.strip())
        if not sep or not host.strip() or parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigurationError(
                f"orchestrator setting REGISTRY_ENDPOINTS: {item!r} is not REGISTRY=URL (an http(s) URL)"
            )
        endpoints.append((host.strip(), url.strip().rstrip("/")))
    return tuple(endpoints)


def load_settings(env: Mapping[str, str]) -> Settings:
    """Validate the whole configuration at once; the first problem is reported by its variable name."""
    default_td = _required(env, "FARGATE_TASK_DEFINITION")
    allowed = _list(env, "FARGATE_ALLOWED_TASK_DEFINITIONS", required=False)
    for name in (default_td, *allowed):
        if not _TASK_DEF.fullmatch(name):
            raise ConfigurationError(f"orchestrator setting: {name!r} is not a task definition name or ARN")
    address = env.get("FARGATE_ADDRESS", "private").strip().lower() or "private"
    if address not in ("private", "public"):
        raise ConfigurationError(
            f"orchestrator setting FARGATE_ADDRESS must be private or public, got {address!r}"
        )
    launch_type = env.get("FARGATE_LAUNCH_TYPE", "FARGATE").strip() or "FARGATE"
    if launch_type != "FARGATE":
        raise ConfigurationError(
            f"orchestrator setting FARGATE_LAUNCH_TYPE must be FARGATE, got {launch_type!r}"
        )
    settings = Settings(
        cluster=_required(env, "FARGATE_CLUSTER"),
        subnets=_list(env, "FARGATE_SUBNETS", required=True),
        security_groups=_list(env, "FARGATE_SECURITY_GROUPS", required=True),
        table=_required(env, "JOBS_TABLE"),
        default_task_definition=default_td,
        allowed_task_definitions=allowed,
        container_name=env.get("FARGATE_CONTAINER_NAME", "").strip() or "ci-coordinator",
        assign_public_ip=_bool(env, "FARGATE_ASSIGN_PUBLIC_IP", False),
        address=address,
        platform_version=env.get("FARGATE_PLATFORM_VERSION", "").strip() or "LATEST",
        capacity_providers=_capacity(env),
        launch_type=launch_type,
        max_cpu=_int(env, "FARGATE_MAX_CPU", 4096, minimum=256),
        max_memory=_int(env, "FARGATE_MAX_MEMORY", 16384, minimum=512),
        default_timeout=_int(env, "JOB_DEFAULT_TIMEOUT", 3600, minimum=60),
        max_timeout=_int(env, "JOB_MAX_TIMEOUT", 86400, minimum=60),
        grace_seconds=_int(env, "JOB_GRACE_SECONDS", 600),
        heartbeat_timeout=_int(env, "HEARTBEAT_TIMEOUT", 900, minimum=5),
        retention_days=_int(env, "JOB_RETENTION_DAYS", 7, minimum=1),
        refresh_after=_int(env, "JOB_REFRESH_AFTER", 10),
        extra_tags=_tags(env),
        region=(env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "").strip(),
        allowed_images=_list(env, "FARGATE_ALLOWED_IMAGES", required=False),
        repository_credentials=_secret_arn(env, "FARGATE_REPOSITORY_CREDENTIALS"),
        task_definition_idle_seconds=_int(env, "JOB_TASK_DEFINITION_IDLE", 7 * 86400, minimum=60),
        registry_endpoints=_endpoints(env),
        task_role_name=env.get("TASK_ROLE_NAME", "").strip(),
        ca_key_ids=_list(env, "SSH_CA_KMS_KEY_IDS", required=False),
        orchestrator_url=env.get("ORCHESTRATOR_URL", "").strip().rstrip("/"),
        warm_pool_size=_int(env, "WARM_POOL_SIZE", 0),
        warm_pool_max_age=_int(env, "WARM_POOL_MAX_AGE", 3600, minimum=300),
    )
    if settings.task_role_name and not _ROLE_NAME.fullmatch(settings.task_role_name):
        raise ConfigurationError(
            f"orchestrator setting TASK_ROLE_NAME must be an IAM role name, got {settings.task_role_name!r}"
        )
    if settings.warm_pool_size > MAX_WARM_POOL:
        raise ConfigurationError(f"orchestrator setting WARM_POOL_SIZE must be at most {MAX_WARM_POOL}")
    if settings.address == "public" and not settings.assign_public_ip:
        raise ConfigurationError(
            "orchestrator setting FARGATE_ADDRESS=public needs FARGATE_ASSIGN_PUBLIC_IP=true"
        )
    if settings.default_timeout > settings.max_timeout:
        raise ConfigurationError("orchestrator setting JOB_DEFAULT_TIMEOUT is above JOB_MAX_TIMEOUT")
    return settings


@cache
def current_settings() -> Settings:
    """The Lambda's settings, validated on first use (not at import time)."""
    return load_settings(os.environ)
