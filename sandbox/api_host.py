"""The sandbox's API process: the project's Chalice app as API Gateway + Lambda would run it.

- HTTP: chalice.local's LocalGateway behind the stage prefix (`/api`), with IAM authorisation enforced as
  API Gateway does it (SigV4, service execute-api) and the caller put into `requestContext.identity`.
- EventBridge → Lambda: polls the SQS queue the ECS rule targets and feeds each event to
  `on_task_state_change(event, context)`; a failing event comes back after the visibility timeout.
- Schedule → Lambda: calls `reaper(event, context)` every `--schedule-rate` seconds.

Started by `python -m sandbox start`; announces its port in DIR/run/api.json; runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import configparser
import json
import logging
import os
import signal
import sys
import threading
import uuid
import warnings
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any

from sandbox.layout import ACCOUNT_ID, IDENTITIES, REGION, REPO_ROOT, SandboxDir, user_arn
from sandbox.sigv4 import Identity, RoleSessions, SignatureRejected, verify

log = logging.getLogger("sandbox.api")

STAGE = "api"


def load_identities(credentials_file: str, users: dict[str, str]) -> dict[str, Identity]:
    """The sandbox's IAM users, keyed by access key, from the shared-credentials file `start` wrote."""
    parser = configparser.ConfigParser()
    parser.read(credentials_file)
    identities = {}
    for profile, user in users.items():
        section = parser[profile]
        key = section["aws_access_key_id"]
        identities[key] = Identity(
            profile=profile,
            user_arn=user_arn(user),
            user_id="AIDA" + uuid.uuid5(uuid.NAMESPACE_DNS, user).hex[:17].upper(),
            access_key=key,
            secret_key=section["aws_secret_access_key"],
        )
    return identities


def lambda_context(function_name: str, timeout_s: int = 60) -> Any:
    from chalice.local import LambdaContext

    return LambdaContext(function_name=function_name, memory_size=512, max_runtime_ms=timeout_s * 1000)


def make_server(
    app: Any, config: Any, identities: dict[str, Identity], port: int, sessions: RoleSessions | None = None
) -> Any:
    from chalice.app import IAMAuthorizer
    from chalice.local import (
        ChaliceRequestHandler,
        CustomLocalChalice,
        LocalChalice,
        LocalGateway,
        ThreadedHTTPServer,
    )

    class SignedGateway(LocalGateway):
        """LocalGateway plus what API Gateway adds for an IAM-authorised caller."""

        identity: Identity | None = None

        def _generate_lambda_event(self, method: str, path: str, headers: Any, body: Any) -> Any:
            event = super()._generate_lambda_event(method, path, headers, body)
            context = event["requestContext"]
            context.update({"stage": STAGE, "accountId": ACCOUNT_ID, "requestId": str(uuid.uuid4())})
            if self.identity is not None:
                context["identity"].update(self.identity.request_context())
            context["identity"]["userAgent"] = headers.get("User-Agent") or headers.get("user-agent")
            return event

    class Handler(ChaliceRequestHandler):
        def __init__(self, request: Any, client_address: Any, server: Any) -> None:
            # ChaliceRequestHandler.__init__ would build a plain LocalGateway; the request is served
            # inside BaseHTTPRequestHandler.__init__, so the gateway must be ours before that.
            self._payload: tuple[Any, bytes | None] | None = None
            self.local_gateway = SignedGateway(app, config)
            BaseHTTPRequestHandler.__init__(self, request, client_address, server)

        def _parse_payload(self) -> tuple[Any, bytes | None]:
            # Read once: the signature check needs the body before the gateway does.
            if self._payload is None:
                self._payload = super()._parse_payload()
            return self._payload

        def log_message(self, format: str, *args: Any) -> None:
            log.info("http %s", format % args)

        def _forbidden(self, message: str) -> None:
            body = json.dumps({"error": "Forbidden", "message": message, "field": None}).encode()
            self.send_response(403)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("x-amzn-ErrorType", "ForbiddenException")
            self.end_headers()
            self.wfile.write(body)

        def _generic_handle(self) -> None:
            raw_path = self.path
            prefix = f"/{STAGE}"
            if raw_path != prefix and not raw_path.startswith(prefix + "/"):
                self._drain()
                return self._forbidden("Missing Authentication Token")
            self._payload = None
            headers, body = self._parse_payload()
            route_path = raw_path[len(prefix) :] or "/"
            self.local_gateway.identity = None
            if self._needs_iam(route_path):
                url = f"http://{headers.get('Host') or headers.get('host') or ''}{raw_path}"
                try:
                    self.local_gateway.identity = verify(
                        identities, REGION, self.command, url, headers, body or b"", sessions=sessions
                    )
                except SignatureRejected as exc:
                    log.info("403 %s %s: %s", self.command, raw_path.split("?")[0], exc)
                    return self._forbidden(str(exc))
            self.path = route_path
            super()._generic_handle()

        def _drain(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            if length:
                self.rfile.read(length)

        def _needs_iam(self, route_path: str) -> bool:
            """API Gateway checks IAM on routes with an IAM authoriser; unknown routes are refused anyway."""
            try:
                view = self.local_gateway.event_converter.create_lambda_event(
                    self.command, route_path, {}, None
                )
            except ValueError:
                return True  # no such route: API Gateway answers 403 too
            entry = app.routes.get(view["requestContext"]["resourcePath"], {}).get(self.command)
            return entry is None or isinstance(entry.authorizer, IAMAuthorizer)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = do_PATCH = do_OPTIONS = _generic_handle

    # chalice's thread-local current_request, as `chalice local` sets it up (create_local_server).
    CustomLocalChalice.__bases__ = (LocalChalice, app.__class__)
    app.__class__ = CustomLocalChalice
    return ThreadedHTTPServer(("127.0.0.1", port), Handler)


class EventPump:
    """SQS → on_task_state_change, one batch at a time, as Lambda's event source mapping would."""

    def __init__(self, handler: Any, sqs: Any, queue_url: str, stop: threading.Event) -> None:
        self._handler = handler
        self._sqs = sqs
        self._queue_url = queue_url
        self._stop = stop

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                messages = self._sqs.receive_message(
                    QueueUrl=self._queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1
                ).get("Messages", [])
            except Exception:  # noqa: BLE001 (moto going away at shutdown, or a hiccup: try again)
                if self._stop.wait(0.5):
                    return
                continue
            for message in messages:
                self._deliver(message)

    def _deliver(self, message: dict[str, Any]) -> None:
        try:
            event = json.loads(message["Body"])
            detail = event.get("detail", {})
            self._handler(event, lambda_context("on_task_state_change"))
        except Exception:  # a Lambda failure: the message comes back later
            log.exception("on_task_state_change failed; the event will be redelivered")
            return
        log.info(
            "event delivered task=%s lastStatus=%s version=%s",
            str(detail.get("taskArn", "")).rsplit("/", 1)[-1],
            detail.get("lastStatus"),
            detail.get("version"),
        )
        self._sqs.delete_message(QueueUrl=self._queue_url, ReceiptHandle=message["ReceiptHandle"])


def run_schedule(handler: Any, rate: float, stop: threading.Event, *, at_once: bool = False) -> None:
    """The reaper's schedule: a scheduled event every `rate` seconds (`at_once`: the first one now, which
    fills a warm pool without waiting a whole period)."""
    if at_once:
        _scheduled(handler)
    while not stop.wait(rate):
        _scheduled(handler)


def _scheduled(handler: Any) -> None:
    event = {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": ACCOUNT_ID,
        "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": REGION,
        "resources": [f"arn:aws:events:{REGION}:{ACCOUNT_ID}:rule/fargate-ci-dev-reaper"],
        "detail": {},
    }
    try:
        handler(event, lambda_context("reaper"))
    except Exception:  # retried at the next tick, like a schedule
        log.exception("reaper failed")


def app_environment(aws: dict[str, Any], config_env: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    """The Lambda's environment: the stage's variables, pointed at the sandbox (design.md settings)."""
    from sandbox.credentials import TASK_ROLE
    from sandbox.layout import CONTAINER, IMAGE, LARGE_TASK_FAMILY, TASK_FAMILY

    env = dict(config_env)
    env.update(
        {
            "FARGATE_CLUSTER": aws["cluster"],
            "FARGATE_SUBNETS": ",".join(aws["subnets"]),
            "FARGATE_SECURITY_GROUPS": aws["security_group"],
            "FARGATE_TASK_DEFINITION": TASK_FAMILY,
            "FARGATE_ALLOWED_TASK_DEFINITIONS": f"{TASK_FAMILY},{LARGE_TASK_FAMILY}",
            "FARGATE_CONTAINER_NAME": CONTAINER,
            # Per-job images: the sandbox's own (sandbox/images.py; derived ones are named sandbox/...), and
            # `nosuch*` to show a pull failure.
            "FARGATE_ALLOWED_IMAGES": f"busybox,sandbox/*,nosuch*,{IMAGE.split('/')[0]}/fargate-ci/*",
            # Its image store served as registries (sandbox/registry.py): service images' EXPOSEd ports.
            "REGISTRY_ENDPOINTS": ",".join(f"{h}={u}" for h, u in aws.get("registry_endpoints", {}).items()),
            "FARGATE_ASSIGN_PUBLIC_IP": "false",
            "FARGATE_ADDRESS": "private",
            "JOBS_TABLE": aws["table"],
            "TASK_ROLE_NAME": TASK_ROLE,
            "SSH_CA_KMS_KEY_IDS": aws["ca_key_id"],
            "AWS_ENDPOINT_URL": aws["aws_endpoint_url"],
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            # The Lambda's own role, in moto: any key works there, and nothing real can be reached.
            "AWS_ACCESS_KEY_ID": "sandbox-lambda",
            "AWS_SECRET_ACCESS_KEY": "sandbox-lambda",
            "AWS_LAMBDA_FUNCTION_NAME": "fargate-ci-dev",
        }
    )
    env.update(extra)
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox.api_host")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--schedule-rate", type=float, required=True)
    parser.add_argument("--app-dir", default=str(REPO_ROOT))
    parser.add_argument("--app-env", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args(argv)
    sandbox = SandboxDir.at(args.dir)
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    for noisy in ("botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # API Gateway does the IAM check here, not chalice.local (which would only warn and let it through).
    warnings.filterwarnings("ignore", message=".*is not a supported in local mode.*")

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    aws = json.loads(sandbox.ready_file("aws").read_text())
    extra = dict(item.split("=", 1) for item in args.app_env)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(name, None)

    from chalice.cli.factory import CLIFactory

    factory = CLIFactory(project_dir=args.app_dir)
    config = factory.create_config_obj(chalice_stage_name="dev")
    os.environ.update(app_environment(aws, config.environment_variables, extra))
    app = factory.load_chalice_app()
    app_module = sys.modules["app"]

    identities = load_identities(str(sandbox.credentials), dict(IDENTITIES))
    from sandbox.control import role_sessions

    server = make_server(app, config, identities, 0, role_sessions(sandbox.role_secret))
    port = server.server_address[1]
    # Where tasks publish their host keys: this API (settings are read on first use, after this).
    os.environ.setdefault("ORCHESTRATOR_URL", f"http://127.0.0.1:{port}/{STAGE}")
    threading.Thread(target=server.serve_forever, name="api", daemon=True).start()

    import boto3

    sqs = boto3.client("sqs", region_name=REGION, endpoint_url=aws["aws_endpoint_url"])
    pump = EventPump(app_module.on_task_state_change, sqs, aws["queue_url"], stop)
    threading.Thread(target=pump.run, name="event-pump", daemon=True).start()
    threading.Thread(
        target=run_schedule,
        args=(app_module.reaper, args.schedule_rate, stop),
        kwargs={"at_once": os.environ.get("WARM_POOL_SIZE", "0").strip() not in ("", "0")},
        name="reaper",
        daemon=True,
    ).start()

    tmp = sandbox.ready_file("api").with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "api_url": f"http://127.0.0.1:{port}/{STAGE}"}))
    os.replace(tmp, sandbox.ready_file("api"))
    log.info("API on http://127.0.0.1:%s/%s", port, STAGE)

    while not stop.wait(0.2):
        pass
    log.info("stopping")
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
