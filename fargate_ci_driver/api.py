"""The orchestrator's HTTP API, SigV4-signed (service `execute-api`) with the runner manager's credentials.

Only http.client and botocore's signer: no requests, no boto3. Each method makes one call; `with_retries`
wraps a call that may be repeated (every route is idempotent per job, design.md).
"""

from __future__ import annotations

import http.client
import json
import random
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import quote, urlencode, urlsplit

from fargate_ci_driver.errors import ApiError, ApiUnreachable, ConfigError

if TYPE_CHECKING:
    from botocore.credentials import ReadOnlyCredentials

T = TypeVar("T")

USER_AGENT = "fargate-driver"
# An answer bigger than this is not the orchestrator's.
MAX_RESPONSE_BYTES = 1 << 20


# Signs (method, path, body) elsewhere and returns the request's headers, or None when it cannot.
RemoteSigner = Callable[[str, str, bytes], "dict[str, str] | None"]


class ApiClient:
    """One orchestrator endpoint. Credentials are resolved on the first call, not at construction.

    `remote_signer`: the session agent, which has botocore loaded and the credentials resolved already,
    signs for us when it can (saving a stage ~100 ms); otherwise we sign here."""

    def __init__(
        self,
        base_url: str,
        region: str,
        profile: str | None = None,
        credentials_file: str | None = None,
        timeout: float = 10.0,
        remote_signer: RemoteSigner | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"orchestrator URL {base_url!r} is not an http(s) URL")
        if parts.query or parts.fragment:
            raise ConfigError(f"orchestrator URL {base_url!r} must not have a query or fragment")
        if not region:
            raise ConfigError("the orchestrator's signing region is not set")
        self.base_url = base_url.rstrip("/")
        self.region = region
        self.profile = profile or None
        self.credentials_file = credentials_file or None
        self.timeout = timeout
        self._scheme = parts.scheme
        self._netloc = parts.netloc
        self._prefix = parts.path.rstrip("/")
        self._credentials = None
        self._remote_signer = remote_signer

    @property
    def prefix(self) -> str:
        """The URL's path prefix (e.g. an API Gateway stage, `/api`), without a trailing slash."""
        return self._prefix

    # --- the routes (design.md "HTTP API") ---

    def create_job(self, body: dict) -> dict:
        return self._call("POST", "/jobs", body)

    def list_jobs(
        self,
        *,
        live: bool | None = None,
        states: tuple[str, ...] = (),
        since: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> dict:
        """One page of the caller's jobs, newest first: {"jobs": [...], "next_cursor": str | None}."""
        params: dict[str, str] = {}
        if live is not None:
            params["live"] = "true" if live else "false"
        if states:
            params["state"] = ",".join(states)
        if since:
            params["since"] = since
        if limit is not None:
            params["limit"] = str(limit)
        if cursor:
            params["cursor"] = cursor
        return self._call("GET", "/jobs" + (f"?{urlencode(params)}" if params else ""))

    def get_job(self, job_key: str) -> dict:
        return self._call("GET", f"/jobs/{quote(job_key, safe='')}")

    # DELETE and heartbeats name the attempt the driver's state holds (the one its POST /jobs returned), so a
    # late or replayed call cannot stop or keep alive a newer attempt: 409 AttemptMismatch then (design.md
    # "HTTP API"). The driver always names it; `None` (leaving it out) is for tools that predate it.

    def stop_job(self, job_key: str, reason: str, *, attempt: int | None = None) -> dict:
        body: dict = {} if attempt is None else {"attempt": _attempt(attempt)}
        body["reason"] = reason
        return self._call("DELETE", f"/jobs/{quote(job_key, safe='')}", body)

    def heartbeat(
        self, job_key: str, ssh_ready_seconds: float | None = None, *, attempt: int | None = None
    ) -> dict:
        body: dict = {} if attempt is None else {"attempt": _attempt(attempt)}
        if ssh_ready_seconds is not None:
            body["ssh_ready_seconds"] = round(ssh_ready_seconds, 3)
        return self._call("POST", f"/jobs/{quote(job_key, safe='')}/heartbeat", body)

    def health(self) -> dict:
        return self._call("GET", "/health")

    # --- plumbing ---

    def _frozen_credentials(self) -> ReadOnlyCredentials:
        import botocore.exceptions
        import botocore.session

        if self._credentials is None:
            session = botocore.session.Session(profile=self.profile)
            if self.credentials_file:
                session.set_config_variable("credentials_file", self.credentials_file)
            try:
                credentials = session.get_credentials()
            except botocore.exceptions.ProfileNotFound as exc:
                raise ApiError(0, "NoCredentials", f"AWS profile {self.profile!r} not found") from exc
            except botocore.exceptions.BotoCoreError as exc:
                raise ApiError(0, "NoCredentials", f"cannot load AWS credentials: {exc}") from exc
            if credentials is None:
                where = f"profile {self.profile!r}" if self.profile else "botocore's default chain"
                raise ApiError(0, "NoCredentials", f"no AWS credentials found ({where})")
            self._credentials = credentials
        # Frozen per call: refreshable credentials (SSO, instance role) may rotate between calls.
        return self._credentials.get_frozen_credentials()

    def signed_headers(self, method: str, path: str, data: bytes) -> dict[str, str]:
        """All headers of a request to `path` (the full path, prefix included), SigV4-signed."""
        if self._remote_signer is not None:
            headers = self._remote_signer(method, path, data)
            if headers is not None:
                return headers
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest

        headers = {
            "Host": self._netloc,
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
        }
        url = f"{self._scheme}://{self._netloc}{path}"
        request = AWSRequest(method=method, url=url, data=data, headers=headers)
        SigV4Auth(self._frozen_credentials(), "execute-api", self.region).add_auth(request)
        return dict(request.headers.items())

    def _connection(self) -> http.client.HTTPConnection:
        if self._scheme == "https":
            return http.client.HTTPSConnection(
                self._netloc, timeout=self.timeout, context=ssl.create_default_context()
            )
        return http.client.HTTPConnection(self._netloc, timeout=self.timeout)

    def _call(self, method: str, route: str, body: dict | None = None) -> dict:
        path = self._prefix + route
        data = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        headers = self.signed_headers(method, path, data)
        conn = self._connection()
        try:
            conn.request(method, path, body=data or None, headers=headers)
            response = conn.getresponse()
            status = response.status
            retry_after = _retry_after(response.getheader("Retry-After"))
            raw = response.read(MAX_RESPONSE_BYTES + 1)
        except (OSError, http.client.HTTPException) as exc:
            reason = _describe(exc)
            raise ApiUnreachable(f"cannot reach the orchestrator at {self.base_url}: {reason}") from exc
        finally:
            conn.close()
        if len(raw) > MAX_RESPONSE_BYTES:
            raise ApiError(status, "BadResponse", f"{method} {route}: answer over {MAX_RESPONSE_BYTES} bytes")
        try:
            payload = json.loads(raw) if raw.strip() else {}
        except ValueError:
            payload = None
        if status >= 400:
            raise _error_from(status, payload, retry_after, raw)
        if not isinstance(payload, dict):
            raise ApiError(status, "BadResponse", f"{method} {route}: the answer is not a JSON object")
        return payload


def _attempt(attempt: int) -> int:
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise ValueError(f"an attempt is a positive integer, not {attempt!r}")
    return attempt


def _error_from(status: int, payload: object, retry_after: float | None, raw: bytes) -> ApiError:
    """The design's error shape, or API Gateway's own `{"message": ...}`, or whatever came back."""
    code = message = field = None
    if isinstance(payload, dict):
        code = payload.get("error") or payload.get("code") or payload.get("__type")
        message = payload.get("message") or payload.get("Message")
        field = payload.get("field") if isinstance(payload.get("field"), str) else None
    if not code:
        try:
            code = http.HTTPStatus(status).phrase.replace(" ", "")
        except ValueError:
            code = f"HTTP{status}"
    if not message:
        message = raw[:200].decode("utf-8", "replace").strip() or "no details"
    return ApiError(status, str(code), str(message), retry_after, field)


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header; the HTTP-date form is rare enough here to ignore."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


def with_retries(
    call: Callable[[], T],
    *,
    attempts: int = 5,
    base_delay: float = 1.0,
    max_delay: float = 15.0,
    deadline: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
    on_retry: Callable[[ApiError, float], None] | None = None,
) -> T:
    """Call until it succeeds, gives a non-retryable error, runs out of attempts or would pass `deadline`.

    The delay is the server's Retry-After when it sent one, else exponential backoff with jitter; both
    are capped at `max_delay`. `deadline` is a time.monotonic() value.
    """
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except ApiError as exc:
            if not exc.retryable or attempt == attempts:
                raise
            if exc.retry_after is not None:
                delay = min(exc.retry_after, max_delay)
            else:
                delay = min(base_delay * 2 ** (attempt - 1), max_delay) * random.uniform(0.8, 1.0)  # noqa: S311
            if deadline is not None and time.monotonic() + delay > deadline:
                raise
            if on_retry is not None:
                on_retry(exc, delay)
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover
