"""The one adapter for container registries: an image's config (its EXPOSEd ports, user, working directory)
read over the OCI Distribution API (Docker Registry HTTP API v2), for the platform a task runs on.

The protocol (distribution-spec `spec.md`; Docker's "Registry authentication" / distribution
`spec/auth/token.md`): `GET /v2/`; a 401 names how to authenticate in `WWW-Authenticate`: `Bearer
realm=...,service=...` (a token from the realm for `scope=repository:<repo>:pull`, anonymous unless
credentials are configured; Docker Hub: auth.docker.io, service registry.docker.io) or `Basic` (ECR: the
`AWS:<password>` pair from ecr:GetAuthorizationToken). Then the manifest, asking for an OCI index, a Docker
manifest list, an OCI or a Docker v2 manifest; from an index the manifest of the task's platform; then the
config blob, whose URL may redirect (Docker Hub sends blobs from a CDN). Each document is checked against its
digest.

Everything here is named by a job's author (the image, so the registry host, and whatever that registry
answers), so: HTTPS only (plain HTTP only for an endpoint the operator configured, REGISTRY_ENDPOINTS), no
loopback, link-local or otherwise special address unless configured, credentials only to HTTPS and never to a
redirect's other host, every answer size-limited, every lookup bounded by one deadline. Any failure is a
RegistryLookupFailed naming why; the caller treats the image's ports as unknown.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import ipaddress
import json
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from chalicelib.errors import RegistryLookupFailed
from chalicelib.taskdefs import DOCKER_HUB, ImageRef

DOCKER_HUB_API = "https://registry-1.docker.io"  # where docker.io's API is served
REQUEST_TIMEOUT = 3.0  # seconds one connection may stay silent
LOOKUP_BUDGET = 4.0  # seconds one image's whole lookup may take (it runs inside POST /jobs)
MAX_REDIRECTS = 3
MAX_MANIFEST = 4 * 1024 * 1024  # Docker's own limit for a manifest
MAX_CONFIG = 4 * 1024 * 1024
MAX_TOKEN = 256 * 1024

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))
_DIGEST = re.compile(r"(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})", re.ASCII)
_CHALLENGE_PARAM = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]*))')


@dataclass(frozen=True)
class Platform:
    os: str = "linux"
    architecture: str = "amd64"
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def platform_of(runtime_platform: Mapping[str, Any] | None) -> Platform:
    """A task definition's runtimePlatform as an OCI platform (ECS: X86_64 or ARM64, LINUX by default)."""
    cpu = str((runtime_platform or {}).get("cpuArchitecture") or "X86_64").upper()
    if cpu == "ARM64":
        return Platform("linux", "arm64", "v8")
    return Platform("linux", "amd64")


@dataclass(frozen=True)
class ImageConfig:
    """What the orchestrator reads of an image's config (OCI image-spec `config.md`, `config` object)."""

    exposed_ports: tuple[str, ...] = ()  # as written: "8080/tcp", "53/udp", "8000-8010/tcp", "80"
    user: str = ""
    workdir: str = ""
    architecture: str = ""  # the config's own word for its platform

    def first_exposed_port(self) -> int | None:
        """The port GitLab's Docker executor waits for: the lowest-numbered TCP port (a range counts by its
        first port; a port without a protocol is TCP). gitlab-runner `executors/docker/services.go`
        `getContainerExposedPorts`: `port.Range()` start where `port.Proto() == "tcp"`, `sort.Ints`, then
        `ports[0]`."""
        ports = []
        for spec in self.exposed_ports:
            number, _, proto = spec.partition("/")
            start = number.split("-", 1)[0]
            if (proto or "tcp").lower() == "tcp" and start.isdigit() and 0 < int(start) < 65536:
                ports.append(int(start))
        return min(ports) if ports else None


class Credentials(Protocol):
    """Where registry logins come from (AwsRegistryCredentials; tests give their own)."""

    def ecr(self, registry: str) -> tuple[str, str]: ...

    def private(self) -> tuple[str, str] | None: ...


class AwsRegistryCredentials:
    """ECR's login from ecr:GetAuthorizationToken (in the registry's own region and account), and private
    registries' from the FARGATE_REPOSITORY_CREDENTIALS secret, `{"username", "password"}` as ECS
    repositoryCredentials reads it. boto3 clients are made by `client(service, region)`."""

    def __init__(self, client: Callable[[str, str | None], Any], secret_arn: str = ""):
        self._client = client
        self._secret_arn = secret_arn

    def ecr(self, registry: str) -> tuple[str, str]:
        from botocore.exceptions import BotoCoreError, ClientError

        account, region = registry.split(".")[0], registry.split(".")[3]
        try:
            answer = self._client("ecr", region).get_authorization_token(registryIds=[account])
            token = answer["authorizationData"][0]["authorizationToken"]
            user, _, password = base64.b64decode(token).decode().partition(":")
        except (BotoCoreError, ClientError) as exc:
            raise RegistryLookupFailed(f"ecr:GetAuthorizationToken failed: {_aws_reason(exc)}") from None
        except (KeyError, IndexError, ValueError):
            raise RegistryLookupFailed("ecr:GetAuthorizationToken gave no usable token") from None
        return user, password

    def private(self) -> tuple[str, str] | None:
        if not self._secret_arn:
            return None
        from botocore.exceptions import BotoCoreError, ClientError

        region = self._secret_arn.split(":")[3]
        try:
            secret = self._client("secretsmanager", region).get_secret_value(SecretId=self._secret_arn)
            value = json.loads(secret["SecretString"])
            return str(value["username"]), str(value["password"])
        except (BotoCoreError, ClientError) as exc:
            raise RegistryLookupFailed(
                f"the registry credentials secret could not be read: {_aws_reason(exc)}"
            ) from None
        except (KeyError, TypeError, ValueError):
            raise RegistryLookupFailed(
                'the registry credentials secret is not {"username": ..., "password": ...}'
            ) from None


def _aws_reason(exc: Exception) -> str:
    error = getattr(exc, "response", {}).get("Error", {}) if hasattr(exc, "response") else {}
    return error.get("Code") or type(exc).__name__


@dataclass
class _Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    url: str


class RegistryClient:
    """Reads image configs. `endpoints` maps a registry host (as in an image reference: `docker.io`,
    `registry.example.com:5000`) to the base URL to use instead (the sandbox's registry); those may be plain
    HTTP on loopback."""

    def __init__(
        self,
        credentials: Credentials | None = None,
        endpoints: Mapping[str, str] | None = None,
        *,
        timeout: float = REQUEST_TIMEOUT,
        budget: float = LOOKUP_BUDGET,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._credentials = credentials
        self._endpoints = {host: url.rstrip("/") for host, url in (endpoints or {}).items()}
        self._trusted = {urllib.parse.urlsplit(url).netloc for url in self._endpoints.values()}
        self._timeout = timeout
        self._budget = budget
        self._clock = clock

    def image_config(self, ref: ImageRef, runtime_platform: Mapping[str, Any] | None = None) -> ImageConfig:
        """The image's config for the platform of a task definition's `runtimePlatform` (linux/amd64 when
        none is given); RegistryLookupFailed says why not."""
        lookup = _Lookup(self, ref, self._clock() + self._budget)
        return lookup.run(platform_of(runtime_platform))

    def base_url(self, registry: str) -> str:
        if registry in self._endpoints:
            return self._endpoints[registry]
        if registry == DOCKER_HUB:
            return DOCKER_HUB_API
        return f"https://{registry}"

    # --- HTTP, with the limits ----------------------------------------------------------------------

    def get(
        self, url: str, headers: Mapping[str, str], limit: int, deadline: float, *, auth: str = ""
    ) -> _Response:
        """GET `url`, following redirects (the Authorization header only to the same host), reading at most
        `limit` bytes of a 200's body (none when `limit` is 0); other statuses come back with no body."""
        for _ in range(MAX_REDIRECTS + 1):
            sent = {**headers, "Authorization": auth} if auth else dict(headers)
            response = self._once(url, sent, limit, deadline)
            location = response.headers.get("Location")
            if response.status not in (301, 302, 303, 307, 308) or not location:
                return response
            target = urllib.parse.urljoin(url, location)
            if urllib.parse.urlsplit(target).netloc != urllib.parse.urlsplit(url).netloc:
                auth = ""  # a CDN's signed URL: our registry token is not theirs to see
            url = target
        raise RegistryLookupFailed(f"more than {MAX_REDIRECTS} redirects from {_host(url)}")

    def _once(self, url: str, headers: Mapping[str, str], limit: int, deadline: float) -> _Response:
        parts = urllib.parse.urlsplit(url)
        trusted = parts.netloc in self._trusted
        if parts.scheme not in ("https", "http") or (parts.scheme == "http" and not trusted):
            raise RegistryLookupFailed(f"refusing {parts.scheme or 'a'} URL {_host(url)!r}: HTTPS only")
        host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
        remaining = deadline - self._clock()
        if remaining <= 0:
            raise RegistryLookupFailed(f"no answer from {host} within {self._budget:g} s")
        address = _address(host, port, allow_special=trusted)
        timeout = min(self._timeout, remaining)
        connection: http.client.HTTPConnection
        if parts.scheme == "https":
            connection = http.client.HTTPSConnection(host, port, timeout=timeout)
        else:
            connection = http.client.HTTPConnection(host, port, timeout=timeout)
        # Connect to the address checked above, not to whatever a second DNS answer would say.
        connection._create_connection = lambda _addr, t=timeout, source=None: socket.create_connection(  # type: ignore[attr-defined]
            (address, port), t, source
        )
        # A hard deadline: a server that drips bytes cannot hold the lookup past it.
        watchdog = threading.Timer(remaining, _shutdown, args=(connection,))
        watchdog.daemon = True
        watchdog.start()
        try:
            path = parts.path or "/"
            connection.request("GET", f"{path}?{parts.query}" if parts.query else path, headers=dict(headers))
            response = connection.getresponse()
            body = b""
            if response.status == 200 and limit:
                body = _read_limited(response, limit, host)
            return _Response(response.status, response.headers, body, url)
        except RegistryLookupFailed:
            raise
        except (OSError, http.client.HTTPException) as exc:
            if self._clock() >= deadline:
                raise RegistryLookupFailed(f"no answer from {host} within {self._budget:g} s") from None
            raise RegistryLookupFailed(f"{host}: {_network_reason(exc)}") from None
        finally:
            watchdog.cancel()
            connection.close()


def _shutdown(connection: http.client.HTTPConnection) -> None:
    sock = connection.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _read_limited(response: http.client.HTTPResponse, limit: int, host: str) -> bytes:
    declared = response.getheader("Content-Length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RegistryLookupFailed(f"{host} sent a document larger than {limit} bytes")
    chunks, size = [], 0
    while True:
        chunk = response.read1(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise RegistryLookupFailed(f"{host} sent a document larger than {limit} bytes")
        chunks.append(chunk)


def _address(host: str, port: int, *, allow_special: bool) -> str:
    """The host's first address, refused when it is loopback, link-local (instance metadata), multicast or
    otherwise special (the Lambda's own runtime API listens on loopback), unless the operator configured
    this endpoint. Private addresses stay allowed: a registry inside the VPC is one."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise RegistryLookupFailed(f"cannot resolve {host}") from None
    if not infos:
        raise RegistryLookupFailed(f"cannot resolve {host}")
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        special = ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved
        if special and not allow_special:
            raise RegistryLookupFailed(f"{host} resolves to {ip}, which is not a registry's address")
    # IPv4 first: a Lambda in a VPC often has no IPv6 route, and only this one address is tried.
    ipv4 = [info for info in infos if info[0] == socket.AF_INET]
    return str((ipv4 or infos)[0][4][0])


def _network_reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return type(exc).__name__ if not str(exc) else f"{type(exc).__name__}: {str(exc)[:120]}"


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc or url[:80]


def _verify(body: bytes, digest: str, what: str) -> None:
    if not _DIGEST.fullmatch(digest):
        raise RegistryLookupFailed(f"{what}: unsupported digest {digest[:80]!r}")
    algorithm, _, expected = digest.partition(":")
    if hashlib.new(algorithm, body).hexdigest() != expected:
        raise RegistryLookupFailed(f"{what} does not match its digest {digest}")


def _json(body: bytes, what: str) -> dict:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise RegistryLookupFailed(f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise RegistryLookupFailed(f"{what} is not a JSON object")
    return value


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="...",service="..."` → ("bearer", {realm, service, ...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3)).replace('\\"', '"')
        for m in _CHALLENGE_PARAM.finditer(rest)
    }
    return scheme.lower(), params


class _Lookup:
    """One image's lookup: its registry's authentication, then manifest, platform manifest, config."""

    def __init__(self, client: RegistryClient, ref: ImageRef, deadline: float):
        self.client = client
        self.ref = ref
        self.deadline = deadline
        self.base = client.base_url(ref.registry)
        self.auth = ""

    def run(self, platform: Platform) -> ImageConfig:
        self._authenticate()
        reference = self.ref.digest or self.ref.tag
        media_type, manifest = self._manifest(reference, self.ref.digest)
        if media_type in (OCI_INDEX, DOCKER_LIST):
            digest = _pick(manifest, platform)
            media_type, manifest = self._manifest(digest, digest)
        if media_type not in (OCI_MANIFEST, DOCKER_MANIFEST):
            raise RegistryLookupFailed(f"unsupported manifest type {media_type[:100]!r}")
        descriptor = manifest.get("config")
        if not isinstance(descriptor, dict) or not isinstance(descriptor.get("digest"), str):
            raise RegistryLookupFailed("the manifest names no config")
        size = descriptor.get("size")
        if isinstance(size, int) and size > MAX_CONFIG:
            raise RegistryLookupFailed(f"the image config is larger than {MAX_CONFIG} bytes")
        digest = descriptor["digest"]
        if not _DIGEST.fullmatch(digest):
            raise RegistryLookupFailed(f"the config has an unsupported digest {digest[:80]!r}")
        response = self._get(f"/v2/{self.ref.repository}/blobs/{digest}", {}, MAX_CONFIG)
        _verify(response.body, digest, "the image config")
        return _config(_json(response.body, "the image config"))

    def _get(self, path: str, headers: Mapping[str, str], limit: int) -> _Response:
        response = self.client.get(self.base + path, headers, limit, self.deadline, auth=self.auth)
        if response.status == 200:
            return response
        if response.status in (401, 403):
            raise RegistryLookupFailed(f"{_host(self.base)} refused access ({response.status})")
        if response.status == 404:
            raise RegistryLookupFailed(f"{_host(self.base)} has no {self.ref.canonical}")
        raise RegistryLookupFailed(f"{_host(response.url)} answered {response.status}")

    def _authenticate(self) -> None:
        """`GET /v2/`: 200 needs nothing; 401's challenge says how (Bearer token or Basic)."""
        response = self.client.get(self.base + "/v2/", {}, 0, self.deadline)
        if response.status == 200:
            return
        if response.status != 401:
            raise RegistryLookupFailed(
                f"{_host(self.base)} is not a registry (GET /v2/ answered {response.status})"
            )
        challenges = [parse_challenge(h) for h in response.headers.get_all("WWW-Authenticate") or []]
        for scheme, params in challenges:
            if scheme == "bearer" and params.get("realm"):
                self.auth = "Bearer " + self._token(params)
                return
        if any(scheme == "basic" for scheme, _ in challenges):
            login = self._login()
            if login is None:
                raise RegistryLookupFailed(f"{_host(self.base)} wants a login and none is configured")
            self.auth = _basic(login)
            return
        raise RegistryLookupFailed(f"{_host(self.base)} asks for an authentication scheme this client lacks")

    def _token(self, challenge: dict[str, str]) -> str:
        realm = challenge["realm"]
        query = {"scope": f"repository:{self.ref.repository}:pull"}
        if challenge.get("service"):
            query["service"] = challenge["service"]
        split = urllib.parse.urlsplit(realm)
        separator = "&" if split.query else "?"
        url = realm + separator + urllib.parse.urlencode(query)
        login = self._login()
        # A login goes only to an HTTPS realm (or the operator's own endpoint): never in clear text.
        secure = split.scheme == "https" or split.netloc in self.client._trusted
        auth = _basic(login) if login is not None and secure else ""
        response = self.client.get(url, {}, MAX_TOKEN, self.deadline, auth=auth)
        if auth and response.status in (401, 403):
            # The one secret is for the operator's private registry; a public image elsewhere (Docker Hub's)
            # takes an anonymous token.
            response = self.client.get(url, {}, MAX_TOKEN, self.deadline)
        if response.status != 200:
            raise RegistryLookupFailed(f"the token service {_host(url)} answered {response.status}")
        answer = _json(response.body, "the token answer")
        token = answer.get("token") or answer.get("access_token")
        if not isinstance(token, str) or not token or any(c.isspace() for c in token):
            raise RegistryLookupFailed(f"the token service {_host(url)} gave no token")
        return token

    def _login(self) -> tuple[str, str] | None:
        credentials = self.client._credentials
        if credentials is None:
            return None
        if self.ref.is_ecr:
            return credentials.ecr(self.ref.registry)
        return credentials.private()

    def _manifest(self, reference: str, digest: str) -> tuple[str, dict]:
        response = self._get(
            f"/v2/{self.ref.repository}/manifests/{reference}", {"Accept": MANIFEST_ACCEPT}, MAX_MANIFEST
        )
        if digest:
            _verify(response.body, digest, "the manifest")
        elif response.headers.get("Docker-Content-Digest"):
            _verify(response.body, response.headers["Docker-Content-Digest"].strip(), "the manifest")
        manifest = _json(response.body, "the manifest")
        content_type = (response.headers.get("Content-Type") or "").split(";")[0].strip()
        media_type = manifest.get("mediaType") if isinstance(manifest.get("mediaType"), str) else ""
        if content_type in (OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST):
            media_type = content_type
        if not media_type and isinstance(manifest.get("manifests"), list):
            media_type = OCI_INDEX  # an OCI index may leave mediaType out
        elif not media_type and isinstance(manifest.get("config"), dict):
            media_type = OCI_MANIFEST
        return media_type, manifest


def _pick(index: dict, platform: Platform) -> str:
    """The digest of the index's manifest for `platform`: os and architecture must match; a matching
    variant is preferred, then one without a variant (containerd's platform matcher does the same)."""
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise RegistryLookupFailed("the image index has no manifests")
    candidates = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("platform"), dict):
            continue
        p = entry["platform"]
        if p.get("os") != platform.os or p.get("architecture") != platform.architecture:
            continue
        variant = p.get("variant") or ""
        if variant and platform.variant and variant != platform.variant:
            continue
        if isinstance(entry.get("digest"), str) and _DIGEST.fullmatch(entry["digest"]):
            candidates.append((0 if variant == platform.variant else 1, entry["digest"]))
    if not candidates:
        raise RegistryLookupFailed(f"the image has no {platform} variant")
    return min(candidates)[1]


def _config(document: dict) -> ImageConfig:
    architecture = document.get("architecture")
    architecture = architecture[:32] if isinstance(architecture, str) else ""
    config = document.get("config")
    if not isinstance(config, dict):
        return ImageConfig(architecture=architecture)  # no config object: nothing exposed
    ports = config.get("ExposedPorts") or {}
    user = config.get("User") or ""
    workdir = config.get("WorkingDir") or ""
    return ImageConfig(
        exposed_ports=tuple(sorted(str(p)[:32] for p in ports)[:256]) if isinstance(ports, dict) else (),
        user=user[:256] if isinstance(user, str) else "",
        workdir=workdir[:4096] if isinstance(workdir, str) else "",
        architecture=architecture,
    )


def _basic(login: tuple[str, str]) -> str:
    return "Basic " + base64.b64encode(f"{login[0]}:{login[1]}".encode()).decode()
