"""The sandbox's registry: its image store served over the OCI Distribution API (registry v2), so that the
orchestrator reads service images' EXPOSEd ports the way it does on AWS (chalicelib/registry.py).

What it serves, per the distribution spec and Docker's token authentication:
- `GET /v2/`: 401 with a challenge (`Bearer realm="<this>/token",service="sandbox-registry"`, as Docker Hub
  does; or `Basic`, as ECR does), 200 once authenticated;
- `GET /token?service=...&scope=repository:<name>:pull`: an anonymous token for that repository;
- `GET /v2/<name>/manifests/<tag or digest>`: an OCI image index (linux/amd64 and linux/arm64/v8) for a
  tag, the platform's OCI manifest for its digest, with `Docker-Content-Digest`;
- `GET /v2/<name>/blobs/<digest>`: a 307 redirect to `/cdn/<digest>` (as Docker Hub sends blobs from a CDN),
  which serves the config blob without authentication; when it plays another host (`cdn_base`), it refuses a
  request that carries an Authorization header, as S3's signed URLs do.

The image configs are the ones the sandbox runs its images with (`sandbox.images.Image`): Entrypoint, Cmd,
Env, WorkingDir, User and ExposedPorts. Images have no layers here (nothing pulls them).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import secrets
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("sandbox.registry")

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
SERVICE = "sandbox-registry"
PLATFORMS = (("linux", "amd64", ""), ("linux", "arm64", "v8"))
_NAME = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*")
_PATH = re.compile(rf"/v2/({_NAME.pattern})/(manifests|blobs)/([A-Za-z0-9_.:-]+)")

# An image's config document (OCI image-spec config.md) for (repository, tag), or None: no such image.
Resolve = Callable[[str, str], "dict | None"]


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(document: dict) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


@dataclass
class Content:
    """Content-addressed documents handed out so far (manifests and configs), by digest."""

    documents: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def put(self, media_type: str, data: bytes) -> dict:
        digest = digest_of(data)
        with self.lock:
            self.documents[digest] = (media_type, data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def get(self, digest: str) -> tuple[str, bytes] | None:
        with self.lock:
            return self.documents.get(digest)

    def index(self, config: dict) -> bytes:
        """An OCI index with one manifest per platform, each naming the config for its architecture."""
        manifests = []
        for os_name, architecture, variant in PLATFORMS:
            platform = {"os": os_name, "architecture": architecture}
            if variant:
                platform["variant"] = variant
            config_blob = canonical({**config, "os": os_name, "architecture": architecture})
            manifest = {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": self.put(OCI_CONFIG, config_blob),
                "layers": [],
            }
            descriptor = self.put(OCI_MANIFEST, canonical(manifest))
            manifests.append({**descriptor, "platform": platform})
        return canonical({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests})


class RegistryHandler(BaseHTTPRequestHandler):
    """One registry host. Class attributes are set per server (`serve`)."""

    resolve: Resolve
    content: Content
    auth: str = "bearer"  # bearer | basic | none
    basic_login: tuple[str, str] = ("", "")
    cdn_base: str = ""  # where blob redirects point ("" : this server)
    tokens: dict[str, str]  # token -> repository it grants pull on
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("registry %s", format % args)

    # --- answers --------------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
        self._send(status, body, {"Content-Type": "application/json", **(headers or {})})

    def _challenge(self, scope: str = "") -> dict[str, str]:
        if self.auth == "basic":
            return {"WWW-Authenticate": f'Basic realm="{self._base()}/v2/",service="{SERVICE}"'}
        value = f'Bearer realm="{self._base()}/token",service="{SERVICE}"'
        if scope:
            value += f',scope="{scope}"'
        return {"WWW-Authenticate": value}

    def _base(self) -> str:
        return f"http://{self.headers.get('Host') or '127.0.0.1'}"

    def _authorised(self, repository: str | None) -> bool:
        header = self.headers.get("Authorization") or ""
        if self.auth == "none":
            return True
        if self.auth == "basic":
            expected = base64.b64encode(":".join(self.basic_login).encode()).decode()
            return secrets.compare_digest(header, f"Basic {expected}")
        scheme, _, token = header.partition(" ")
        granted = self.tokens.get(token) if scheme == "Bearer" else None
        return granted is not None and (repository is None or granted == repository)

    # --- routes ---------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/v2/" or url.path == "/v2":
            if not self._authorised(None):
                return self._error(401, "UNAUTHORIZED", "authentication required", self._challenge())
            return self._send(200, b"{}", {"Content-Type": "application/json"})
        if url.path == "/token" and self.auth == "bearer":
            return self._token(urllib.parse.parse_qs(url.query))
        if url.path.startswith("/cdn/"):
            return self._cdn(url.path[len("/cdn/") :])
        match = _PATH.fullmatch(url.path)
        if match is None:
            return self._error(404, "NAME_UNKNOWN", "no such route")
        repository, kind, reference = match.groups()
        if not self._authorised(repository):
            scope = f"repository:{repository}:pull"
            return self._error(401, "UNAUTHORIZED", "authentication required", self._challenge(scope))
        if kind == "manifests":
            return self._manifest(repository, reference)
        return self._blob(reference)

    def _token(self, query: dict[str, list[str]]) -> None:
        scope = (query.get("scope") or [""])[0]
        parts = scope.split(":")
        if len(parts) != 3 or parts[0] != "repository" or "pull" not in parts[2].split(","):
            return self._error(400, "INVALID_SCOPE", f"unsupported scope {scope!r}")
        token = secrets.token_urlsafe(24)
        self.tokens[token] = parts[1]
        body = json.dumps({"token": token, "access_token": token, "expires_in": 300}).encode()
        self._send(200, body, {"Content-Type": "application/json"})

    def _manifest(self, repository: str, reference: str) -> None:
        if reference.startswith("sha256:"):
            found = self.content.get(reference)
            if found is None or found[0] not in (OCI_INDEX, OCI_MANIFEST):
                return self._error(404, "MANIFEST_UNKNOWN", f"no manifest {reference}")
            media_type, data = found
        else:
            config = self.resolve(repository, reference)
            if config is None:
                return self._error(404, "MANIFEST_UNKNOWN", f"no image {repository}:{reference}")
            data = self.content.index(config)
            self.content.put(OCI_INDEX, data)
            media_type = OCI_INDEX
        self._send(200, data, {"Content-Type": media_type, "Docker-Content-Digest": digest_of(data)})

    def _blob(self, digest: str) -> None:
        if self.content.get(digest) is None:
            return self._error(404, "BLOB_UNKNOWN", f"no blob {digest}")
        expires = secrets.token_hex(8)
        self._send(307, b"", {"Location": f"{self.cdn_base}/cdn/{digest}?expires={expires}"})

    def _cdn(self, digest: str) -> None:
        if self.cdn_base and self.headers.get("Authorization"):
            # Playing another host: S3's answer to a signed URL that also carries an Authorization header.
            return self._send(400, b"Only one auth mechanism allowed", {"Content-Type": "text/plain"})
        found = self.content.get(digest)
        if found is None:
            return self._send(404, b"not found", {"Content-Type": "text/plain"})
        self._send(200, found[1], {"Content-Type": "application/octet-stream"})


def serve(
    resolve: Resolve,
    *,
    auth: str = "bearer",
    basic_login: tuple[str, str] = ("", ""),
    handler: type[RegistryHandler] = RegistryHandler,
    host: str = "127.0.0.1",
) -> ThreadingHTTPServer:
    """A registry on `host`, a free port, serving in a daemon thread; `.shutdown()` stops it."""
    attributes = {
        "resolve": staticmethod(resolve),
        "content": Content(),
        "auth": auth,
        "basic_login": basic_login,
        "tokens": {},
    }
    server = ThreadingHTTPServer((host, 0), type("Registry", (handler,), attributes))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="registry", daemon=True).start()
    return server


def image_config(image: Any) -> dict:
    """A sandbox image's config document (OCI image-spec config.md): what its containers run with."""
    config: dict[str, Any] = {
        "Env": [f"{name}={value}" for name, value in image.env],
        "WorkingDir": "" if image.workdir == "/" else image.workdir,
        "User": image.user,
    }
    if image.entrypoint:
        config["Entrypoint"] = list(image.entrypoint)
    if image.cmd:
        config["Cmd"] = list(image.cmd)
    if image.exposed_ports:
        config["ExposedPorts"] = {port: {} for port in image.exposed_ports}
    return {"config": config, "rootfs": {"type": "layers", "diff_ids": []}}
