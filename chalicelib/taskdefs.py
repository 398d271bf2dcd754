"""Per-job images: image references, service aliases, the allowlist of image patterns.

Pure: no AWS here. Image references follow Docker's grammar (github.com/distribution/reference,
`reference.go`/`normalize.go`): an optional registry (a first component with a `.` or `:`, or `localhost`),
`docker.io` otherwise, where a one-component repository is `library/<name>`; an optional `:tag` and
`@digest`. Every reference comes from a job's `.gitlab-ci.yml` (untrusted), so anything outside the
grammar is refused.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

DOCKER_HUB = "docker.io"
_DOMAIN = re.compile(
    r"(?:localhost|[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+"
    r"|[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?=:))(?::[0-9]{1,5})?",
    re.ASCII,
)
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*", re.ASCII)
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", re.ASCII)
_DIGEST = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}", re.ASCII)
MAX_NAME = 255


class InvalidImage(ValueError):
    """Not an image reference."""


@dataclass(frozen=True)
class ImageRef:
    registry: str  # docker.io when none was given
    repository: str  # library/busybox for Docker Hub's official images
    tag: str  # "latest" when neither tag nor digest was given
    digest: str = ""

    @property
    def repository_name(self) -> str:
        """registry/repository: what the allowlist's patterns are matched against."""
        return f"{self.registry}/{self.repository}"

    @property
    def canonical(self) -> str:
        """The full reference, as it goes into a task definition."""
        name = self.repository_name
        if self.tag:
            name += f":{self.tag}"
        if self.digest:
            name += f"@{self.digest}"
        return name

    @property
    def is_ecr(self) -> bool:
        """Amazon ECR (private): pulled with the task execution role, no repositoryCredentials."""
        return bool(
            re.fullmatch(r"\d{12}\.dkr\.ecr(-fips)?\.[a-z0-9-]+\.amazonaws\.com(\.cn)?", self.registry)
        )


def parse_image(reference: str) -> ImageRef:
    """Parse an image reference as Docker does; InvalidImage names what is wrong."""
    if not isinstance(reference, str) or not reference:
        raise InvalidImage("an image name is required")
    if len(reference) > MAX_NAME + 200 or any(c.isspace() or ord(c) < 0x21 for c in reference):
        raise InvalidImage("an image name has no spaces or control characters and is at most 455 characters")
    rest, _, digest = reference.partition("@")
    if digest and not _DIGEST.fullmatch(digest):
        raise InvalidImage(f"{digest!r} is not an image digest (algorithm:hex)")
    head, slash, tail = rest.partition("/")
    if slash and _DOMAIN.fullmatch(head) and ("." in head or ":" in head or head == "localhost"):
        registry, path = head, tail
    else:
        registry, path = DOCKER_HUB, rest
    tag = ""
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, tag = path.rsplit(":", 1)
        if not _TAG.fullmatch(tag):
            raise InvalidImage(f"{tag!r} is not an image tag")
    components = path.split("/")
    if not path or not all(_COMPONENT.fullmatch(c) for c in components):
        raise InvalidImage(
            f"{reference!r} is not an image name "
            "(lowercase letters, digits and . _ - in each /-separated part)"
        )
    if registry == DOCKER_HUB and len(components) == 1:
        path = f"library/{path}"
    if len(f"{registry}/{path}") > MAX_NAME:
        raise InvalidImage(f"image name {reference!r} is longer than {MAX_NAME} characters")
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = DOCKER_HUB
    return ImageRef(
        registry=registry, repository=path, tag=tag or ("" if digest else "latest"), digest=digest
    )


def service_aliases(name: str) -> tuple[str, str]:
    """GitLab's default host names for a service, from its image name (docs/executors/docker.md
    "Accessing the services"): everything after `:` stripped (a registry port too), then `/` → `__` for the
    first and `/` → `-` for the second. `registry.example.com:4999/tutum/wordpress:1` →
    `registry.example.com__tutum__wordpress`, `registry.example.com-tutum-wordpress`."""
    without_digest = name.split("@", 1)[0]
    parts = without_digest.split("/")
    parts = [part.split(":", 1)[0] for part in parts]
    base = "/".join(parts)
    return base.replace("/", "__"), base.replace("/", "-")


def allowed(ref: ImageRef, patterns: tuple[str, ...]) -> bool:
    """Whether the image's registry/repository matches one of the operator's globs (`*` spans `/` too).
    A pattern without a registry is a Docker Hub name, as in `.gitlab-ci.yml`: `busybox`, `library/*`."""
    name = ref.repository_name
    return any(fnmatch.fnmatchcase(name, _pattern_name(pattern)) for pattern in patterns)


def _pattern_name(pattern: str) -> str:
    head, slash, _ = pattern.partition("/")
    if slash and ("." in head or ":" in head or head == "localhost" or head == "*"):
        return pattern
    return f"{DOCKER_HUB}/{pattern if slash else 'library/' + pattern}"


# --- what a job asks for, and the task definition that runs it ------------------------------------------

JOB_CONTAINER = "job"
SERVICE_CONTAINER = "service-{n}"
FAMILY_SUFFIX = "-job-"  # a per-job family: the base task definition's family, this, a content hash
MAX_SERVICES = 8
# The job container only waits, so that the sidecar's sshd can run each session inside it (job-shell.sh):
# its last argument is the marker job-shell.sh looks for.
JOB_WAIT_COMMAND = (
    "/bin/sh",
    "-c",
    'trap "exit 0" TERM INT; while :; do sleep 3600 & wait $!; done',
    "fargate-ci-job",
)
# GitLab's builds and cache directories (the operator's guide's `builds_dir`/`cache_dir`), mounted in the job
# container as GitLab's Docker executor mounts volumes there: an image's own / is root's, so a job image whose
# USER is not root could not create them. Each is an empty task volume (Fargate: root's, 0755), unless the
# base task definition's container already mounts one there; job-shell.sh gives them to the job's user.
JOB_DIRS = (("/builds", "fargate-ci-builds"), ("/cache", "fargate-ci-cache"))


@dataclass(frozen=True)
class ContainerImage:
    """`image:` or one `services:` entry of a job, validated."""

    name: str  # the reference as the job gave it
    ref: ImageRef
    entrypoint: tuple[str, ...] | None = None  # None: the image's own
    command: tuple[str, ...] | None = None  # services only
    alias: str = ""  # services only: the job's own alias (GitLab allows several, space-separated)
    variables: tuple[tuple[str, str], ...] = ()  # services only

    def aliases(self) -> tuple[str, ...]:
        """The names the job reaches a service by: its own aliases, then GitLab's two defaults."""
        names = [*self.alias.split(), *service_aliases(self.name)]
        return tuple(dict.fromkeys(names))

    def as_dict(self) -> dict:
        return {
            "name": self.ref.canonical,
            "entrypoint": list(self.entrypoint) if self.entrypoint is not None else None,
            "command": list(self.command) if self.command is not None else None,
            "alias": self.alias,
            "variables": [list(v) for v in self.variables],
        }


_ALIAS = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,62})", re.ASCII)
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}", re.ASCII)
HEALTHCHECK_PORT = "HEALTHCHECK_TCP_PORT"  # GitLab's service variable naming the port to wait for


def parse_container_image(value: object, field: str, *, service: bool) -> ContainerImage:
    """`{"name": ..., "entrypoint": [...]}` (and for services `command`, `alias`, `variables`); a bare string
    is a name. InvalidImage names what is wrong."""
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise InvalidImage(f"{field} must be an image name or an object with a name")
    allowed_keys = (
        {"name", "entrypoint", "command", "alias", "variables"} if service else {"name", "entrypoint"}
    )
    unknown = sorted(set(value) - allowed_keys)
    if unknown:
        raise InvalidImage(f"{field} has an unknown key {unknown[0]!r}")
    name = value.get("name")
    ref = parse_image(name)  # type: ignore[arg-type]
    alias = value.get("alias") or ""
    if not isinstance(alias, str) or not all(_ALIAS.fullmatch(a) for a in alias.split()) or len(alias) > 255:
        raise InvalidImage(f"{field}.alias must be host names (letters, digits, . _ -) separated by spaces")
    variables = value.get("variables") or []
    if isinstance(variables, dict):
        variables = [{"key": k, "value": v} for k, v in variables.items()]
    pairs = []
    if not isinstance(variables, list) or len(variables) > 64:
        raise InvalidImage(f"{field}.variables must be a list of at most 64 {{key, value}}")
    for item in variables:
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("key"), str)
            or not isinstance(item.get("value"), str)
        ):
            raise InvalidImage(f"{field}.variables must be a list of {{key, value}} strings")
        if not _VARIABLE.fullmatch(item["key"]) or len(item["value"]) > 4096 or "\x00" in item["value"]:
            raise InvalidImage(
                f"{field}.variables: {item['key']!r} is not a variable name, or its value is too long"
            )
        pairs.append((item["key"], item["value"]))
    return ContainerImage(
        name=name,  # type: ignore[arg-type]
        ref=ref,
        entrypoint=_argv(value.get("entrypoint"), f"{field}.entrypoint"),
        command=_argv(value.get("command"), f"{field}.command"),
        alias=alias,
        variables=tuple(pairs),
    )


def _argv(value: object, field: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, list)
        or len(value) > 64
        or not all(isinstance(a, str) and len(a) <= 4096 and "\x00" not in a for a in value)
    ):
        raise InvalidImage(f"{field} must be a list of at most 64 strings")
    return tuple(value)


def _job_dir_volumes(base: dict, sidecar: dict) -> tuple[list[dict], list[dict]]:
    """The task's volumes (the base's, then an empty one per job directory the base does not already mount)
    and the job container's mountPoints for JOB_DIRS. Where the base's container mounts a volume at one of
    them (an operator's EFS cache, say), the job container mounts that same volume there."""
    volumes = list(base.get("volumes") or [])
    names = {v["name"] for v in volumes}
    mounted = {m["containerPath"].rstrip("/"): m for m in sidecar.get("mountPoints") or []}
    mounts = []
    for path, name in JOB_DIRS:
        if path in mounted and mounted[path].get("sourceVolume") in names:
            mounts.append({**mounted[path], "containerPath": path})
            continue
        while name in names:  # the base's own volume of that name is something else
            name += "-job"
        volumes.append({"name": name})  # no host: Fargate's task storage, gone with the task
        names.add(name)
        mounts.append({"sourceVolume": name, "containerPath": path, "readOnly": False})
    return volumes, mounts


def _no_entrypoint(entrypoint: tuple[str, ...]) -> bool:
    return all(part == "" for part in entrypoint)


def healthcheck_port(service: ContainerImage) -> int | None:
    """The port named by the service's HEALTHCHECK_TCP_PORT variable (GitLab's), if any."""
    for key, value in service.variables:
        if key == HEALTHCHECK_PORT and value.isdigit() and 0 < int(value) < 65536:
            return int(value)
    return None


def service_waits(
    services: tuple[ContainerImage, ...], exposed: Mapping[int, int | None] | None = None
) -> str:
    """`alias:port ...` for job-shell.sh to wait for (CI_SERVICE_WAIT): each service's HEALTHCHECK_TCP_PORT
    (GitLab's variable wins), else its image's first exposed TCP port, `exposed[n]` for service n, as read
    from its registry at registration (chalicelib/registry.py); None or absent: unknown, not waited for."""
    waits = []
    for n, service in enumerate(services):
        port = healthcheck_port(service)
        if port is None:
            port = (exposed or {}).get(n)
        if port is not None:
            waits.append(f"{service.aliases()[0]}:{port}")
    return " ".join(waits)


def with_service_waits(params: dict, waits: str, container_name: str) -> dict:
    """RegisterTaskDefinition's parameters with the main container's CI_SERVICE_WAIT set to `waits` (the
    family stays: it is the hash of the job's inputs, and the waits are looked up once, at registration)."""
    containers = []
    for container in params["containerDefinitions"]:
        if container["name"] == container_name:
            environment = [e for e in container.get("environment") or [] if e["name"] != "CI_SERVICE_WAIT"]
            if waits:
                environment.append({"name": "CI_SERVICE_WAIT", "value": waits})
            container = {**container, "environment": environment}
        containers.append(container)
    return {**params, "containerDefinitions": containers}


@dataclass(frozen=True)
class JobImages:
    """What a job asks to run in: its image and its services."""

    image: ContainerImage | None  # None: services beside a job container of the task definition's image
    services: tuple[ContainerImage, ...] = ()

    def all(self) -> tuple[ContainerImage, ...]:
        return tuple(i for i in (self.image, *self.services) if i is not None)


def task_definition(
    images: JobImages,
    base: dict,
    *,
    container_name: str,
    cpu: int | None,
    memory: int | None,
    credentials_arn: str = "",
) -> dict:
    """RegisterTaskDefinition's parameters for a job's image and services, built on the default task
    definition (`base`, as DescribeTaskDefinition gives it): its roles and sizes, and its container (named
    `container_name`, the project's image with sshd), which stays the task's main container. The family is a
    content hash (after the base's family), so the same inputs always name the same task definition."""
    sidecar = next((c for c in base["containerDefinitions"] if c["name"] == container_name), None)
    if sidecar is None:
        raise ValueError(f"the default task definition has no container named {container_name!r}")
    ours = (
        "CI_JOB_CONTAINER",
        "CI_SERVICE_HOSTS",
        "CI_SERVICE_WAIT",
    )  # set below; the base may tune the rest
    environment = [e for e in sidecar.get("environment") or [] if e["name"] not in ours]
    hosts = " ".join(dict.fromkeys(a for s in images.services for a in s.aliases()))
    environment += [{"name": "CI_JOB_CONTAINER", "value": JOB_CONTAINER}]
    if hosts:
        environment += [{"name": "CI_SERVICE_HOSTS", "value": hosts}]
    waits = service_waits(images.services)
    if waits:
        environment += [{"name": "CI_SERVICE_WAIT", "value": waits}]
    main = {
        **{
            k: v
            for k, v in sidecar.items()
            if k not in ("dependsOn", "environment", "linuxParameters", "memory", "memoryReservation")
        },
        "essential": True,
        # The job's processes run under sshd, so in this container's cgroup: no limit below the task's.
        "memoryReservation": 128,
        "environment": environment,
        # job-shell.sh reads the job container's /proc/PID/root, environ and cwd: Fargate allows this one
        # capability beyond Docker's defaults (a job image whose user is not root needs it).
        "linuxParameters": {"capabilities": {"add": ["SYS_PTRACE"]}},
        "dependsOn": [{"containerName": JOB_CONTAINER, "condition": "START"}],
    }
    volumes, mounts = _job_dir_volumes(base, sidecar)
    job = {
        "name": JOB_CONTAINER,
        "image": images.image.ref.canonical if images.image else sidecar["image"],
        "essential": True,
        "command": list(JOB_WAIT_COMMAND),
        "stopTimeout": 2,
        "mountPoints": mounts,
    }
    if images.image is None:
        # Services beside the task image: not its entrypoint (that starts sshd, and wants the job's keys).
        job["entryPoint"], job["command"] = list(JOB_WAIT_COMMAND[:2]), list(JOB_WAIT_COMMAND[2:])
    elif images.image.entrypoint is not None:
        if _no_entrypoint(images.image.entrypoint):
            # `entrypoint: [""]` (GitLab's advice for images whose entrypoint is not a shell): none at all,
            # which ECS can only say by naming the command's program as the entrypoint.
            job["entryPoint"], job["command"] = list(JOB_WAIT_COMMAND[:2]), list(JOB_WAIT_COMMAND[2:])
        else:
            job["entryPoint"] = list(images.image.entrypoint)
    containers = [main, job]
    for n, service in enumerate(images.services):
        container: dict = {
            "name": SERVICE_CONTAINER.format(n=n),
            "image": service.ref.canonical,
            "essential": False,
        }
        entrypoint, command = service.entrypoint, service.command
        if entrypoint is not None and _no_entrypoint(entrypoint) and command:
            entrypoint, command = command[:1], command[1:]  # no entrypoint: the command's program runs
        if entrypoint is not None:
            container["entryPoint"] = list(entrypoint)
        if command is not None:
            container["command"] = list(command)
        if service.variables:
            container["environment"] = [{"name": k, "value": v} for k, v in service.variables]
        containers.append(container)
    for container in containers[1:]:
        if credentials_arn and not parse_image(container["image"]).is_ecr:
            container["repositoryCredentials"] = {"credentialsParameter": credentials_arn}
        container.setdefault("memoryReservation", 64)  # a soft share: the task's memory is the limit
    params = {
        "networkMode": "awsvpc",
        "requiresCompatibilities": ["FARGATE"],
        "pidMode": "task",
        "cpu": str(cpu or base.get("cpu") or "256"),
        "memory": str(memory or base.get("memory") or "512"),
        "containerDefinitions": containers,
    }
    # The base's volumes too (its container's mountPoints name them), and the job's directories.
    for key in ("taskRoleArn", "executionRoleArn", "runtimePlatform", "ephemeralStorage"):
        if base.get(key):
            params[key] = base[key]
    params["volumes"] = volumes
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:32]
    # Named after its base, so the operator's RunTask permission for `<family>-*` covers it.
    return {"family": f"{base['family'][:200]}{FAMILY_SUFFIX}{digest}", **params}
