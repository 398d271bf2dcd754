"""What the API is asked and answers: parsing and validating every request body (POST /jobs, DELETE's and
the heartbeat's), the job key, and the job view.

Pure: no AWS here. Every rejection is an InvalidInput naming the field.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from chalicelib.clock import iso
from chalicelib.errors import InvalidInput
from chalicelib.settings import Settings
from chalicelib.taskdefs import MAX_SERVICES, InvalidImage, JobImages, allowed, parse_container_image

MAX_BODY_BYTES = 16 * 1024
STARTED_BY_PREFIX = "gl-"
# A warm pool task's record key: `pool/<slot>` (never a job's: a job key ends in digits before its "/").
POOL_PREFIX = "pool/"

# Every pattern is used with `fullmatch`: `re.match` with `$` would accept a trailing "\n".
_RUNNER = re.compile(r"[A-Za-z0-9_-]{1,12}")
_DIGITS = re.compile(r"[0-9]{1,19}")
_JOB_KEY = re.compile(r"[A-Za-z0-9_-]{1,12}-[0-9]{1,19}")
# The table's key for a job: the job key and a digest of its owner (startedBy carries it, ECS allows 128).
_RECORD_KEY = re.compile(r"[A-Za-z0-9_-]{1,12}-[0-9]{1,19}/[0-9a-f]{32}|" + POOL_PREFIX + r"[0-9a-f]{32}")
_PUBLIC_KEY = re.compile(r"ssh-ed25519 [A-Za-z0-9+/]{68}(=){0,2}( [\x21-\x7e]{0,100})?")
# An ECS task id: 32 hex digits on AWS (the last part of its ARN); moto (the sandbox) uses a UUID.
TASK_ID = re.compile(r"[0-9a-f]{32}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_TASK_DEF = re.compile(
    r"(arn:aws[a-z-]*:ecs:[a-z0-9-]+:\d{12}:task-definition/)?[A-Za-z0-9_-]{1,255}(:\d+)?", re.ASCII
)
_TASK_DEF_ARN = re.compile(
    r"arn:aws[a-z-]*:ecs:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):task-definition/.*", re.ASCII
)
_PLATFORM = re.compile(r"LATEST|\d+\.\d+\.\d+", re.ASCII)
# No control characters and no lone surrogates (DynamoDB stores UTF-8, which has none).
_PRINTABLE = re.compile(r"[^\x00-\x1f\x7f\ud800-\udfff]*")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
MAX_ATTEMPT = 2**31 - 1

# Fargate's task sizes: cpu units → the memory values (MiB) it allows.
FARGATE_SIZES: dict[int, range] = {
    256: range(512, 2049, 512),
    512: range(1024, 4097, 1024),
    1024: range(2048, 8193, 1024),
    2048: range(4096, 16385, 1024),
    4096: range(8192, 30721, 1024),
    8192: range(16384, 61441, 4096),
    16384: range(32768, 122881, 8192),
}

_FIELDS = {
    "runner",
    "job_id",
    "gitlab_url",
    "project_id",
    "project_path",
    "pipeline_id",
    "job_name",
    "ssh_public_key",
    "timeout_seconds",
    "task_definition",
    "cpu",
    "memory",
    "platform_version",
    "image",
    "services",
}


@dataclass(frozen=True)
class JobRequest:
    """A validated POST /jobs."""

    job_key: str
    runner: str
    job_id: str
    gitlab_url: str
    project_id: str
    project_path: str
    pipeline_id: str
    job_name: str
    ssh_public_key: str  # the job's client key: the orchestrator's SSH CA certifies it for the job's task
    timeout_seconds: int
    task_definition: str
    cpu: int | None
    memory: int | None
    platform_version: str
    request_hash: str  # tells a repeat of this request from a different one
    # The job's own image and services; None: the task definition as it is (design.md "Per-job images")
    images: JobImages | None = None


def job_key(runner: str, job_id: str) -> str:
    return f"{runner}-{job_id}"


def owner_digest(owner: str) -> str:
    """The first 32 hex digits of sha256(owner): the record key's suffix and the owner index's key."""
    return hashlib.sha256(owner.encode()).hexdigest()[:32]


def record_key(owner: str, key: str) -> str:
    """The jobs table's key: callers are isolated, so the same job key of two owners is two records."""
    return f"{key}/{owner_digest(owner)}"


def pool_key(slot: str) -> str:
    return POOL_PREFIX + slot


def is_pool_key(key: str) -> bool:
    return key.startswith(POOL_PREFIX)


def started_by(record: str) -> str:
    """RunTask's `startedBy`: the record key, so an event or the reaper finds the record by a consistent read
    (a launch in flight claims its task before it has recorded its ARN)."""
    return STARTED_BY_PREFIX + record


def record_key_from_started_by(value: str | None) -> str | None:
    """The record key our `startedBy` carries, or None for a task we did not start."""
    if not isinstance(value, str) or not value.startswith(STARTED_BY_PREFIX):
        return None
    key = value[len(STARTED_BY_PREFIX) :]
    return key if is_record_key(key) else None


def is_record_key(value: object) -> bool:
    return isinstance(value, str) and _RECORD_KEY.fullmatch(value) is not None


def task_id(task_arn: str) -> str:
    """The task id: the last part of its ARN (`arn:aws:ecs:<region>:<acct>:task/<cluster>/<id>`)."""
    return task_arn.rsplit("/", 1)[-1]


def validate_task_id(value: str) -> str:
    if not isinstance(value, str) or not TASK_ID.fullmatch(value):
        raise InvalidInput("task id must be an ECS task id (32 hex digits)", field="task_id")
    return value


def parse_host_key_request(raw: bytes | None) -> str:
    """PUT /tasks/{task_id}/host-key body: {"host_key": "ssh-ed25519 AAAA..."}, the task's own public key."""
    body = decode_body(raw)
    _only(body, {"host_key"})
    return _text(body, "host_key", _PUBLIC_KEY, required=True, what="one 'ssh-ed25519 AAAA...' key line")


def validate_job_key(key: str) -> str:
    if not isinstance(key, str) or not _JOB_KEY.fullmatch(key):
        raise InvalidInput("job key must look like <runner>-<job id>", field="job_key")
    return key


def decode_body(raw: bytes | None) -> dict:
    """Parse a request body into a JSON object, refusing what is too big or not an object."""
    if raw is None or raw == b"":
        raise InvalidInput("request body is required (a JSON object)", field=None)
    if len(raw) > MAX_BODY_BYTES:
        raise InvalidInput(f"request body is larger than {MAX_BODY_BYTES} bytes", field=None)
    try:
        body = json.loads(raw)
    except RecursionError:
        raise InvalidInput("request body is nested too deeply", field=None) from None
    except (UnicodeDecodeError, ValueError) as exc:
        # ValueError also covers integers beyond Python's int conversion limit (4300 digits).
        raise InvalidInput(f"request body is not valid JSON: {exc}", field=None) from None
    if not isinstance(body, dict):
        raise InvalidInput("request body must be a JSON object", field=None)
    return body


def _text(
    body: dict, name: str, pattern: re.Pattern[str], *, required: bool, what: str, default: str = ""
) -> str:
    value = body.get(name)
    if value is None:
        if required:
            raise InvalidInput(f"{name} is required", field=name)
        return default
    if not isinstance(value, str):
        raise InvalidInput(f"{name} must be a string", field=name)
    if not pattern.fullmatch(value):
        raise InvalidInput(f"{name} must be {what}", field=name)
    return value


def _free_text(body: dict, name: str, limit: int) -> str:
    value = body.get(name, "")
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > limit or not _PRINTABLE.fullmatch(value):
        raise InvalidInput(f"{name} must be a printable string of at most {limit} characters", field=name)
    return value


def _integer(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    # bool is an int in Python; JSON true is not a size.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{name} must be an integer", field=name)
    return value


def read_job_request(raw: bytes | None, settings: Settings, account: str | None) -> JobRequest:
    """POST /jobs body: the JSON object, then `parse_job_request`."""
    return parse_job_request(decode_body(raw), settings, account)


def parse_job_request(body: dict[str, Any], settings: Settings, account: str | None) -> JobRequest:
    """`account`: the account this orchestrator runs in (API Gateway's `requestContext.accountId`, the API
    owner's); with `settings.region` it is where a task definition named by ARN must live."""
    _only(body, _FIELDS)
    runner = _text(body, "runner", _RUNNER, required=True, what="1-12 characters of A-Z a-z 0-9 _ -")
    job_id = _text(body, "job_id", _DIGITS, required=True, what="a decimal GitLab job id")
    project_id = _text(body, "project_id", _DIGITS, required=True, what="a decimal project id")
    pipeline_id = _text(body, "pipeline_id", _DIGITS, required=True, what="a decimal pipeline id")
    public_key = _text(
        body, "ssh_public_key", _PUBLIC_KEY, required=True, what="one 'ssh-ed25519 AAAA...' key line"
    )
    task_definition = _text(
        body,
        "task_definition",
        _TASK_DEF,
        required=False,
        what="a task definition family, family:revision or ARN",
    )
    if not task_definition:
        task_definition = settings.default_task_definition
    elif not settings.is_allowed_task_definition(task_definition):
        raise InvalidInput(
            f"task_definition {task_definition!r} is not in this orchestrator's allowlist",
            field="task_definition",
        )
    else:
        _check_home(task_definition, settings.region, account)
    platform = _text(
        body, "platform_version", _PLATFORM, required=False, what="LATEST or a version such as 1.4.0"
    )
    cpu, memory = _size(body, settings)
    images = _images(body, settings)
    timeout = _integer(body, "timeout_seconds")
    if timeout is None:
        timeout = settings.default_timeout
    if timeout <= 0:
        raise InvalidInput("timeout_seconds must be positive", field="timeout_seconds")
    request = {
        "runner": runner,
        "job_id": job_id,
        "gitlab_url": _free_text(body, "gitlab_url", 2048),
        "project_id": project_id,
        "project_path": _free_text(body, "project_path", 1024),
        "pipeline_id": pipeline_id,
        "job_name": _free_text(body, "job_name", 255),
        "ssh_public_key": public_key,
        "timeout_seconds": min(timeout, settings.max_timeout),
        "task_definition": task_definition,
        "cpu": cpu,
        "memory": memory,
        "platform_version": platform or settings.platform_version,
    }
    hashed = dict(request)
    if images is not None:
        hashed["images"] = [i.as_dict() for i in images.all()]
    digest = hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()
    return JobRequest(job_key=job_key(runner, job_id), request_hash=digest, images=images, **request)


def _images(body: dict, settings: Settings) -> JobImages | None:
    """`image` and `services`: each image must match the operator's allowlist (FARGATE_ALLOWED_IMAGES).
    Services without an image run beside a job container of the task definition's own image."""
    raw_image, raw_services = body.get("image"), body.get("services")
    if raw_image is None and not raw_services:
        return None
    if raw_services is not None and (not isinstance(raw_services, list) or len(raw_services) > MAX_SERVICES):
        raise InvalidInput(f"services must be a list of at most {MAX_SERVICES} services", field="services")
    try:
        image = parse_container_image(raw_image, "image", service=False) if raw_image is not None else None
    except InvalidImage as exc:
        raise InvalidInput(str(exc), field="image") from None
    try:
        services = tuple(
            parse_container_image(s, f"services[{n}]", service=True) for n, s in enumerate(raw_services or [])
        )
    except InvalidImage as exc:
        raise InvalidInput(str(exc), field="services") from None
    for name, item in (("image", image), *(("services", s) for s in services)):
        if item is not None and not allowed(item.ref, settings.allowed_images):
            patterns = ", ".join(settings.allowed_images) or "none: this orchestrator runs no per-job images"
            raise InvalidInput(
                f"image {item.name!r} is not allowed here; "
                f"allowed images (FARGATE_ALLOWED_IMAGES): {patterns}",
                field=name,
            )
    return JobImages(image=image, services=services)


def _check_home(task_definition: str, region: str, account: str | None) -> None:
    """An allowed family is not enough: an ARN must also name this account and region."""
    arn = _TASK_DEF_ARN.fullmatch(task_definition)
    if arn is None:
        return  # a family or family:revision resolves in our own account and region
    if not account or not region:
        raise InvalidInput(
            "task_definition may not be an ARN here (this orchestrator cannot tell its own account and "
            "region); give the family or family:revision",
            field="task_definition",
        )
    if (arn["account"], arn["region"]) != (account, region):
        raise InvalidInput(
            f"task_definition {task_definition!r} is not in this orchestrator's account and region "
            f"({account}, {region})",
            field="task_definition",
        )


def _attempt(body: dict) -> int:
    value = body.get("attempt")
    if value is None:
        raise InvalidInput("attempt is required (the job's attempt POST /jobs answered)", field="attempt")
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ATTEMPT:
        raise InvalidInput(f"attempt must be an integer from 1 to {MAX_ATTEMPT}", field="attempt")
    return value


def _only(body: dict, fields: set[str]) -> None:
    unknown = sorted(set(body) - fields)
    if unknown:
        raise InvalidInput(f"unknown field {unknown[0]!r}", field=unknown[0])


def _optional_body(raw: bytes | None) -> dict:
    return decode_body(raw) if raw else {}


def parse_stop_request(raw: bytes | None) -> tuple[int, str]:
    """DELETE /jobs/{job_key} body: (attempt, reason), the reason defaulting to "CI job cleanup"."""
    body = _optional_body(raw)
    _only(body, {"attempt", "reason"})
    attempt = _attempt(body)
    reason = body.get("reason", "")
    if reason is None:
        reason = ""
    if not isinstance(reason, str) or len(reason) > 255 or _SURROGATE.search(reason):
        raise InvalidInput("reason must be a string of at most 255 characters", field="reason")
    return attempt, reason or "CI job cleanup"


def parse_heartbeat_request(raw: bytes | None) -> tuple[int, float | None]:
    """POST /jobs/{job_key}/heartbeat body: (attempt, seconds until SSH answered, on the first one)."""
    body = _optional_body(raw)
    _only(body, {"attempt", "ssh_ready_seconds"})
    attempt = _attempt(body)
    ready = body.get("ssh_ready_seconds")
    if ready is not None and (
        isinstance(ready, bool) or not isinstance(ready, int | float) or not 0 <= ready < 86400
    ):
        raise InvalidInput("ssh_ready_seconds must be a number of seconds", field="ssh_ready_seconds")
    return attempt, ready


def _size(body: dict, settings: Settings) -> tuple[int | None, int | None]:
    cpu = _integer(body, "cpu")
    memory = _integer(body, "memory")
    if cpu is None and memory is None:
        return None, None
    if cpu is None or memory is None:
        missing = "cpu" if cpu is None else "memory"
        raise InvalidInput("cpu and memory must be given together", field=missing)
    if cpu not in FARGATE_SIZES:
        raise InvalidInput(
            f"cpu {cpu} is not a Fargate size ({', '.join(map(str, FARGATE_SIZES))})", field="cpu"
        )
    allowed = FARGATE_SIZES[cpu]
    if memory not in allowed:
        raise InvalidInput(
            f"memory {memory} MiB does not go with cpu {cpu} on Fargate "
            f"({allowed.start}-{allowed.stop - 1} in steps of {allowed.step})",
            field="memory",
        )
    if cpu > settings.max_cpu:
        raise InvalidInput(f"cpu {cpu} is above this orchestrator's maximum {settings.max_cpu}", field="cpu")
    if memory > settings.max_memory:
        raise InvalidInput(
            f"memory {memory} is above this orchestrator's maximum {settings.max_memory}", field="memory"
        )
    return cpu, memory


VIEW_FIELDS = (
    "job_key",
    "runner",
    "job_id",
    "project_id",
    "project_path",
    "pipeline_id",
    "job_name",
    "attempt",
    "state",
    "last_status",
    "task_arn",
    "task_definition",
    "cpu",
    "memory",
    "capacity_provider",
    "capacity_note",  # set when Fargate Spot had no capacity and the task was started on FARGATE instead
    "service_notes",  # services the job does not wait for, and why (their image's ports are unknown)
    "address",
    "stop_code",
    "stopped_reason",
    "exit_code",
    "container_reason",
    "created_at",
    "started_at",
    "stopping_at",
    "stopped_at",
    "updated_at",
    "heartbeat_at",
    "deadline",
    "host_key",  # the task's own ed25519 public key, as the task published it (the driver pins it)
    "ssh_certificate",  # the job's client key certified by the SSH CA for this task only (public)
    "warm",  # True when the job claimed an idle task of the warm pool
)


def job_view(item: dict) -> dict:
    """What the API shows of a job record: never the owner, hashes, leases or the GitLab URL."""
    view = {name: _plain(item.get(name)) for name in VIEW_FIELDS}
    if view["deadline"] is not None:
        view["deadline"] = iso(view["deadline"])
    return view


def _plain(value: Any) -> Any:
    # DynamoDB hands numbers back as Decimal.
    if isinstance(value, Decimal):
        return int(value)
    return value
