"""fargate.toml: the Go driver's keys plus design.md's `[Orchestrator]`, `[Job]` and `[SSH] Shell`.

Validated once, at the start of every stage, into a frozen `Settings`. Every problem is a `ConfigError`
naming the file and the key. Keys the orchestrator owns now (Cluster, Subnets, ...) are accepted, type-checked
and turned into one note each, so an old file keeps working and its owner learns where the setting went.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from fargate_ci_driver.errors import ConfigError
from fargate_ci_driver.flags import LOG_FORMATS, LOG_LEVELS
from fargate_ci_driver.job_marker import valid_runner

TASK_DEFINITION_RE = re.compile(
    r"^(arn:aws[a-z-]*:ecs:[a-z0-9-]+:\d{12}:task-definition/)?[A-Za-z0-9_-]{1,255}(:[1-9]\d{0,9})?$"
)
PLATFORM_VERSION_RE = re.compile(r"^(LATEST|\d{1,3}\.\d{1,3}\.\d{1,3})$")
REGION_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d{1,2}$")
USERNAME_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
SHELL_RE = re.compile(r"^[A-Za-z0-9_./+-]{1,255}$")

# Where each setting that left the driver lives now (design.md "Orchestrator settings").
MOVED_TO_ORCHESTRATOR = {
    "Cluster": "FARGATE_CLUSTER",
    "Subnet": "FARGATE_SUBNETS",
    "Subnets": "FARGATE_SUBNETS",
    "SecurityGroup": "FARGATE_SECURITY_GROUPS",
    "SecurityGroups": "FARGATE_SECURITY_GROUPS",
    "EnablePublicIP": "FARGATE_ASSIGN_PUBLIC_IP",
    "UsePublicIP": "FARGATE_ADDRESS",
    "EnableExecuteCommand": None,
}


@dataclass(frozen=True)
class Settings:
    path: str
    orchestrator_url: str
    region: str
    metadata_dir: str
    profile: str | None = None
    credentials_file: str | None = None
    api_timeout: float = 10.0
    log_level: str | None = None
    log_format: str | None = None
    log_file: str | None = None
    task_definition: str | None = None
    platform_version: str | None = None
    ssh_user: str = "root"
    ssh_port: int = 22
    ssh_shell: str = "bash"
    builds_dir: str | None = None
    cache_dir: str | None = None
    prepare_timeout: float = 600.0
    # Well under the orchestrator's HEARTBEAT_TIMEOUT (900 s), or its reaper stops long stages' tasks.
    heartbeat_interval: float = 300.0
    # [Runner]: who this runner is, for job keys (design.md "Job identity"); derived from the job payload's
    # GitLab instance when unset.
    runner_short_token: str | None = None
    gitlab_url: str | None = None
    # One line per orchestrator-owned key found in the file; prepare prints them.
    notes: tuple[str, ...] = field(default_factory=tuple)


# --- value checkers: each returns the cleaned value or raises ValueError with what is wrong ---


def _string(value: Any) -> str | None:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_show(value)}")
    return value.strip() or None


def _choice(*choices: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        text = _string(value)
        if text is not None and text.lower() not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return text.lower() if text else None

    return check


def _matching(pattern: re.Pattern, what: str) -> Callable[[Any], str | None]:
    return _checked_by(lambda text: bool(pattern.match(text)), what)


def _checked_by(valid: Callable[[str], bool], what: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        text = _string(value)
        if text is not None and not valid(text):
            raise ValueError(f"{value!r} is not {what}")
        return text

    return check


def _absolute_path(value: Any) -> str | None:
    text = _string(value)
    if text is not None and not text.startswith("/"):
        raise ValueError(f"{value!r} is not an absolute path")
    return text


def _url(value: Any) -> str | None:
    text = _string(value)
    if text is None:
        return None
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"{value!r} is not an http(s) URL without query or fragment")
    if parts.username is not None or parts.password is not None:
        raise ValueError("the URL must not carry a user name or password")
    return text.rstrip("/")


def _orchestrator_url(value: Any) -> str | None:
    """Requests carry key material (the task's host key): plain http only to this machine itself."""
    text = _url(value)
    if text is not None and urlsplit(text).scheme == "http" and not is_loopback(urlsplit(text).hostname):
        raise ValueError(
            f"{value!r} is plain http:// to a host that is not this machine; use https:// "
            "(http:// is allowed only for a loopback address: 127.0.0.0/8, ::1, localhost)"
        )
    return text


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    import ipaddress  # here: most stages never check a URL

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_show(value)}")
    return value


def _string_list(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of strings, got {_show(value)}")
    return value


def _number(low: float, high: float, integer: bool = False) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not ok_type:
            raise ValueError(f"expected {'an integer' if integer else 'a number'}, got {_show(value)}")
        if not low <= value <= high:
            raise ValueError(f"{value} is not between {low:g} and {high:g}")
        return value

    return check


def _show(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}
    return kind.get(type(value), "a table" if isinstance(value, dict) else type(value).__name__)


# section (None = top level) → key → (checker, Settings field or None when only noted)
SCHEMA: dict[str | None, dict[str, tuple[Callable[[Any], Any], str | None]]] = {
    None: {
        "LogLevel": (_choice(*LOG_LEVELS), "log_level"),
        "LogFormat": (_choice(*LOG_FORMATS), "log_format"),
        "LogFile": (_string, "log_file"),
    },
    "Fargate": {
        "Region": (_matching(REGION_RE, "an AWS region such as eu-west-1"), "fargate_region"),
        "TaskDefinition": (
            _matching(TASK_DEFINITION_RE, "a task definition family[:revision] or ARN"),
            "task_definition",
        ),
        "PlatformVersion": (
            _matching(PLATFORM_VERSION_RE, "LATEST or a version like 1.4.0"),
            "platform_version",
        ),
        "Cluster": (_string, None),
        "Subnet": (_string, None),
        "Subnets": (_string_list, None),
        "SecurityGroup": (_string, None),
        "SecurityGroups": (_string_list, None),
        "EnablePublicIP": (_bool, None),
        "UsePublicIP": (_bool, None),
        "EnableExecuteCommand": (_bool, None),
    },
    "TaskMetadata": {"Directory": (_absolute_path, "metadata_dir")},
    "SSH": {
        "Username": (_matching(USERNAME_RE, "a user name"), "ssh_user"),
        "Port": (_number(1, 65535, integer=True), "ssh_port"),
        "Shell": (_matching(SHELL_RE, "a shell name or path such as bash"), "ssh_shell"),
    },
    "Orchestrator": {
        "URL": (_orchestrator_url, "orchestrator_url"),
        "Region": (_matching(REGION_RE, "an AWS region such as eu-west-1"), "orchestrator_region"),
        "Profile": (_string, "profile"),
        "SharedCredentialsFile": (_string, "credentials_file"),
        "Timeout": (_number(0.1, 300), "api_timeout"),
    },
    "Runner": {
        "ShortToken": (
            _checked_by(valid_runner, "1-12 of A-Z a-z 0-9 _ - (the runner's short token)"),
            "runner_short_token",
        ),
        "GitLabURL": (_url, "gitlab_url"),
    },
    "Job": {
        "BuildsDir": (_absolute_path, "builds_dir"),
        "CacheDir": (_absolute_path, "cache_dir"),
        "PrepareTimeout": (_number(1, 86400), "prepare_timeout"),
        "HeartbeatInterval": (_number(1, 3600), "heartbeat_interval"),
    },
}

# Keys that once existed and now mean something else: a pointed error beats "unknown key".
RETIRED = {
    ("SSH", "PrivateKeyPath"): "keys are generated per job now; remove it",
}


def _label(section: str | None, key: str) -> str:
    return key if section is None else f"[{section}] {key}"


def _canonical(name: str, known: list[str]) -> str | None:
    """The Go driver's TOML library matches keys case-insensitively; so do we, for drop-in files."""
    for candidate in known:
        if candidate.lower() == name.lower():
            return candidate
    return None


def load(path: str) -> Settings:
    """Read and validate fargate.toml. Raises ConfigError naming the file and the key."""
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (pass the driver's config with --config)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse(document, path)


def parse_text(raw: bytes, path: str) -> Settings:
    """fargate.toml from bytes already read (the session agent digests exactly what it parses)."""
    try:
        document = tomllib.loads(raw.decode())
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse(document, path)


def parse(document: dict, path: str = "fargate.toml") -> Settings:
    values: dict[str, Any] = {}
    notes: list[str] = []
    sections = [s for s in SCHEMA if s is not None]
    for name, value in document.items():
        if isinstance(value, dict):
            section = _canonical(name, sections)
            if section is None:
                raise ConfigError(f"{path}: unknown section [{name}]")
            _parse_section(section, value, path, values, notes)
        else:
            _parse_key(None, name, value, path, values, notes)

    url = values.pop("orchestrator_url", None)
    if not url:
        raise ConfigError(f"{path}: [Orchestrator] URL is required (the orchestrator API's base URL)")
    fargate_region = values.pop("fargate_region", None)
    region = values.pop("orchestrator_region", None) or fargate_region
    if not region:
        raise ConfigError(
            f"{path}: [Orchestrator] Region (or [Fargate] Region) is required: the API's signing region"
        )
    if not values.get("metadata_dir"):
        raise ConfigError(f"{path}: [TaskMetadata] Directory is required (where per-job state is kept)")
    return Settings(path=path, orchestrator_url=url, region=region, notes=tuple(notes), **values)


def _parse_section(section: str, table: dict, path: str, values: dict, notes: list[str]) -> None:
    for key, value in table.items():
        _parse_key(section, key, value, path, values, notes)


def _parse_key(section: str | None, name: str, value: Any, path: str, values: dict, notes: list[str]) -> None:
    keys = SCHEMA[section]
    key = _canonical(name, list(keys))
    if key is None:
        retired = next(
            (why for (s, k), why in RETIRED.items() if s == section and k.lower() == name.lower()), None
        )
        if retired:
            raise ConfigError(f"{path}: {_label(section, name)} is no longer supported: {retired}")
        where = "at the top level" if section is None else f"in [{section}]"
        raise ConfigError(f"{path}: unknown key {_label(section, name)} {where}")
    checker, target = keys[key]
    try:
        cleaned = checker(value)
    except ValueError as exc:
        raise ConfigError(f"{path}: {_label(section, key)}: {exc}") from None
    if target is None:
        notes.append(_moved_note(section, key, path))
    elif cleaned is not None:
        if target in values:
            raise ConfigError(f"{path}: {_label(section, key)} is set twice (keys are case-insensitive)")
        values[target] = cleaned


def _moved_note(section: str | None, key: str, path: str) -> str:
    setting = MOVED_TO_ORCHESTRATOR.get(key)
    if setting is None:
        return f"{path}: {_label(section, key)} is decided on the orchestrator now; ignored here"
    return f"{path}: {_label(section, key)} is set on the orchestrator now ({setting}); ignored here"
