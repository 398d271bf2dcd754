"""The driver's API client over real HTTP: SigV4 that API Gateway-style verification accepts, the error shape,
Retry-After and bounded retries."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fargate_ci_driver.api import ApiClient, with_retries
from fargate_ci_driver.errors import ApiError, ApiUnreachable, ConfigError
from sandbox.sigv4 import Identity, SignatureRejected, verify
from tests.conftest import wait_until

IDENTITY = Identity(
    "runner", "arn:aws:iam::123456789012:user/runner", "AIDARUNNER", "AKIDRUNNER", "s3cr3t-key"
)
REGION = "eu-west-1"


class FakeOrchestrator(BaseHTTPRequestHandler):
    """Verifies signatures as API Gateway would; answers from `script`: (status, body, headers) tuples."""

    script: list[tuple[int, object, dict]]
    seen: list[dict]

    def _handle(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        url = f"http://{self.headers['Host']}{self.path}"
        try:
            who = verify({IDENTITY.access_key: IDENTITY}, REGION, self.command, url, dict(self.headers), body)
        except SignatureRejected as exc:
            self._answer(403, {"message": str(exc)}, {})
            return
        self.seen.append({"method": self.command, "path": self.path, "body": body, "who": who.user_arn})
        status, answer, headers = self.script.pop(0) if self.script else (200, {"job_key": "k"}, {})
        self._answer(status, answer, headers)

    def _answer(self, status: int, answer: object, headers: dict) -> None:
        raw = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    do_GET = do_POST = do_DELETE = _handle

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def orchestrator(monkeypatch) -> Iterator[tuple[str, type[FakeOrchestrator]]]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", IDENTITY.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", IDENTITY.secret_key)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    handler = type("Handler", (FakeOrchestrator,), {"script": [], "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/api", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_every_route_is_signed_and_shaped_as_the_design_says(orchestrator):
    url, handler = orchestrator
    api = ApiClient(url, REGION)
    api.create_job({"runner": "t3sT1234", "job_id": "1"})
    api.get_job("t3sT1234-1")
    api.stop_job("t3sT1234-1", "cleanup", attempt=2)
    api.heartbeat("t3sT1234-1", attempt=2)
    api.heartbeat("t3sT1234-1", ssh_ready_seconds=1.23456, attempt=2)
    api.health()
    calls = [(c["method"], c["path"], json.loads(c["body"]) if c["body"] else None) for c in handler.seen]
    assert calls == [
        ("POST", "/api/jobs", {"runner": "t3sT1234", "job_id": "1"}),
        ("GET", "/api/jobs/t3sT1234-1", None),
        ("DELETE", "/api/jobs/t3sT1234-1", {"attempt": 2, "reason": "cleanup"}),
        ("POST", "/api/jobs/t3sT1234-1/heartbeat", {"attempt": 2}),
        ("POST", "/api/jobs/t3sT1234-1/heartbeat", {"attempt": 2, "ssh_ready_seconds": 1.235}),
        ("GET", "/api/health", None),
    ]
    assert {c["who"] for c in handler.seen} == {IDENTITY.user_arn}


@pytest.mark.parametrize("attempt", [0, -1, True, "1", 1.0])
def test_an_attempt_that_is_not_a_positive_integer_is_never_sent(orchestrator, attempt):
    url, handler = orchestrator
    with pytest.raises(ValueError, match="an attempt is a positive integer"):
        ApiClient(url, REGION).stop_job("t3sT1234-1", "cleanup", attempt=attempt)
    with pytest.raises(ValueError, match="an attempt is a positive integer"):
        ApiClient(url, REGION).heartbeat("t3sT1234-1", attempt=attempt)
    assert handler.seen == []


def test_a_wrong_secret_is_refused_by_the_verifier(orchestrator, monkeypatch):
    url, _ = orchestrator
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(ApiError) as caught:
        ApiClient(url, REGION).get_job("t3sT1234-1")
    assert (caught.value.status, caught.value.code) == (403, "Forbidden")
    assert "signature" in caught.value.message.lower()


def test_the_design_error_shape_becomes_api_error_fields(orchestrator):
    url, handler = orchestrator
    handler.script.append(
        (400, {"error": "InvalidInput", "message": "cpu 300 is not a Fargate size", "field": "cpu"}, {})
    )
    with pytest.raises(ApiError) as caught:
        ApiClient(url, REGION).create_job({})
    error = caught.value
    assert (error.status, error.code, error.message, error.field) == (
        400,
        "InvalidInput",
        "cpu 300 is not a Fargate size",
        "cpu",
    )
    assert not error.retryable


def test_503_with_retry_after_is_retried_after_that_long(orchestrator):
    url, handler = orchestrator
    handler.script += [
        (503, {"error": "Throttled", "message": "slow down"}, {"Retry-After": "2"}),
        (503, {"error": "NoCapacity", "message": "none"}, {"Retry-After": "1"}),
        (201, {"job_key": "t3sT1234-1", "state": "PROVISIONING"}, {}),
    ]
    delays: list[float] = []
    api = ApiClient(url, REGION)
    job = with_retries(lambda: api.create_job({"runner": "x"}), sleep=delays.append)
    assert job["state"] == "PROVISIONING"
    assert delays == [2.0, 1.0]
    assert len(handler.seen) == 3


def test_retries_are_bounded(orchestrator):
    url, handler = orchestrator
    handler.script += [(503, {"error": "Throttled", "message": "no"}, {"Retry-After": "100"})] * 5
    delays: list[float] = []
    api = ApiClient(url, REGION)
    with pytest.raises(ApiError) as caught:
        with_retries(lambda: api.create_job({}), attempts=3, max_delay=4.0, sleep=delays.append)
    assert caught.value.status == 503
    assert delays == [4.0, 4.0]  # Retry-After honoured up to the cap
    assert len(handler.seen) == 3


def test_non_retryable_errors_are_not_retried(orchestrator):
    url, handler = orchestrator
    handler.script += [(502, {"error": "TaskStartFailed", "message": "RESOURCE:ENI"}, {})]
    delays: list[float] = []
    with pytest.raises(ApiError, match="RESOURCE:ENI"):
        with_retries(lambda: ApiClient(url, REGION).create_job({}), sleep=delays.append)
    assert delays == []


def test_a_non_json_gateway_error_still_reads_clearly(orchestrator):
    url, handler = orchestrator
    handler.script.append((504, b"<html>Gateway Timeout</html>", {}))
    with pytest.raises(ApiError) as caught:
        ApiClient(url, REGION).get_job("k")
    assert (caught.value.status, caught.value.code) == (504, "GatewayTimeout")
    assert caught.value.retryable


def test_an_unreachable_api_is_a_retryable_one_line_error():
    api = ApiClient("http://127.0.0.1:9/api", REGION, timeout=1)
    api._credentials = _StaticCredentials()
    with pytest.raises(ApiUnreachable) as caught:
        api.get_job("k")
    assert caught.value.retryable
    assert "cannot reach the orchestrator at http://127.0.0.1:9/api" in str(caught.value)


def test_a_missing_profile_is_named(tmp_path):
    credentials = tmp_path / "credentials"
    credentials.write_text("[other]\naws_access_key_id = a\naws_secret_access_key = b\n")
    api = ApiClient("http://127.0.0.1:9", REGION, profile="runner", credentials_file=str(credentials))
    with pytest.raises(ApiError, match="AWS profile 'runner' not found"):
        api.get_job("k")


@pytest.mark.parametrize("url", ["abc.execute-api.amazonaws.com", "ftp://x/api", "https://x/api?stage=1"])
def test_a_bad_base_url_is_a_config_error(url):
    with pytest.raises(ConfigError, match="orchestrator URL"):
        ApiClient(url, REGION)


class _StaticCredentials:
    def get_frozen_credentials(self):
        from botocore.credentials import Credentials

        return Credentials("AKID", "secret").get_frozen_credentials()


def test_a_remote_signers_headers_are_sent_as_they_are(orchestrator, monkeypatch):
    """The session agent signs for prepare and cleanup: its headers go out unchanged (here the local secret
    is wrong, so only the remote signature can pass)."""
    url, handler = orchestrator
    agent_side = ApiClient(url, REGION)
    agent_side.signed_headers("GET", "/api/health", b"")  # resolve its credentials while they are right
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    asked = []

    def signer(method: str, path: str, data: bytes) -> dict[str, str]:
        asked.append((method, path, data))
        return agent_side.signed_headers(method, path, data)

    ApiClient(url, REGION, remote_signer=signer).create_job({"runner": "t3sT1234", "job_id": "2"})
    assert asked == [("POST", "/api/jobs", b'{"runner":"t3sT1234","job_id":"2"}')]
    assert [c["who"] for c in handler.seen] == [IDENTITY.user_arn]


def test_without_a_remote_signature_the_client_signs_itself(orchestrator):
    url, handler = orchestrator
    ApiClient(url, REGION, remote_signer=lambda *_: None).get_job("t3sT1234-1")
    assert [c["who"] for c in handler.seen] == [IDENTITY.user_arn]


@pytest.mark.parametrize(
    ("status", "code"), [(409, "AttemptMismatch"), (404, "JobNotFound")], ids=["newer-attempt", "not-ours"]
)
def test_heartbeats_stop_for_good_when_the_attempt_is_over(orchestrator, status, code):
    from fargate_ci_driver.heartbeat import Heartbeat

    url, handler = orchestrator
    handler.script += [(200, {"job_key": "k"}, {}), (status, {"error": code, "message": "over"}, {})]
    over: list[str] = []
    beat = Heartbeat(lambda: ApiClient(url, REGION), "t3sT1234-1", 3, 0.01, on_over=over.append).start()
    beat._thread.join(10)
    assert not beat._thread.is_alive() and beat.stopped
    assert over and code in over[0]
    bodies = [json.loads(c["body"]) for c in handler.seen]
    assert bodies == [{"attempt": 3}, {"attempt": 3}]  # no beat after the answer


def test_other_heartbeat_failures_do_not_stop_the_beats(orchestrator):
    from fargate_ci_driver.heartbeat import Heartbeat

    url, handler = orchestrator
    handler.script += [(503, {"error": "Throttled", "message": "no"}, {}), (409, {"error": "Conflict"}, {})]
    beat = Heartbeat(lambda: ApiClient(url, REGION), "t3sT1234-1", 1, 0.01).start()
    try:
        wait_until(lambda: len(handler.seen) >= 4, 10, 0.01, "beats after the failures")
    finally:
        beat.stop()
    assert not beat._thread.join(5) and not beat._thread.is_alive()
