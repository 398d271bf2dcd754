"""Chalice wiring only: routes, the ECS event handler, the reaper schedule. Decisions live in chalicelib."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable

from chalice import Chalice, IAMAuthorizer, Rate, Response
from chalice.app import CloudWatchEvent

from chalicelib import factory
from chalicelib.callers import owner_of
from chalicelib.errors import OrchestratorError
from chalicelib.jobs import (
    job_view,
    parse_heartbeat_request,
    parse_host_key_request,
    parse_stop_request,
    read_job_request,
    validate_job_key,
    validate_task_id,
)
from chalicelib.observability import begin_invocation, count, logger, metrics

app = Chalice(app_name="fargate-ci")
iam = IAMAuthorizer()

JSON = {"Content-Type": "application/json"}


def _context() -> dict:
    return app.current_request.context or {}


def _caller() -> str:
    """The IAM identity API Gateway verified (the job's owner; an assumed role is its role), or 403."""
    return owner_of(_context().get("identity"))


def _raw() -> bytes | None:
    return app.current_request.raw_body


def _account() -> str | None:
    """requestContext.accountId: the API owner's account, ours (a task definition ARN must name it)."""
    return _context().get("accountId")


def api(view: Callable[..., tuple[int, dict]]) -> Callable[..., Response]:
    """Map the error hierarchy to HTTP at the edge; flush logs' keys and metrics per request."""

    @functools.wraps(view)
    def handler(*args: str, **kwargs: str) -> Response:
        begin_invocation(getattr(app, "lambda_context", None), request_id=_context().get("requestId"))
        try:
            status, body = view(*args, **kwargs)
            return Response(body=json.dumps(body), status_code=status, headers=JSON)
        except OrchestratorError as exc:
            count("ApiErrors", code=exc.code)
            log = logger.warning if exc.status < 500 else logger.error
            log("request refused", status=exc.status, error=exc.code, detail=exc.message)
            headers = dict(JSON)
            if exc.retry_after:
                headers["Retry-After"] = str(exc.retry_after)
            return Response(body=json.dumps(exc.body()), status_code=exc.status, headers=headers)
        except Exception:  # noqa: BLE001 (the edge: nothing unexpected may leak a stack trace to the caller)
            count("ApiErrors", code="InternalError")
            logger.exception("unexpected error")
            body = {
                "error": "InternalError",
                "message": "internal error; see the orchestrator's logs",
                "field": None,
            }
            return Response(body=json.dumps(body), status_code=500, headers=JSON)
        finally:
            metrics.flush_metrics()

    return handler


@app.route("/health", methods=["GET"], authorizer=iam)
@api
def health() -> tuple[int, dict]:
    _caller()  # nothing answers an anonymous request
    return 200, {"status": "ok"}


@app.route("/jobs", methods=["POST"], authorizer=iam, content_types=["application/json"])
@api
def create_job() -> tuple[int, dict]:
    owner, request = _caller(), read_job_request(_raw(), factory.current_settings(), account=_account())
    job, created = factory.job_service().start(request, owner)
    return (201 if created else 200), job_view(job)


# -- GET /jobs: the caller's own jobs, newest first, a page at a time (design.md "HTTP API") -------------
@app.route("/jobs", methods=["GET"], authorizer=iam)
@api
def list_jobs() -> tuple[int, dict]:
    from chalicelib.listing import encode_cursor, parse_list_query

    query = parse_list_query(app.current_request.query_params, _caller())
    items, next_key = factory.job_service().list(query)
    return 200, {
        "jobs": [job_view(item) for item in items],
        "next_cursor": encode_cursor(next_key) if next_key else None,
    }


# -----------------------------------------------------------------------------------------------------------


@app.route("/jobs/{job_key}", methods=["GET"], authorizer=iam)
@api
def get_job(job_key: str) -> tuple[int, dict]:
    owner, key = _caller(), validate_job_key(job_key)
    return 200, job_view(factory.job_service().get(key, owner))


@app.route("/jobs/{job_key}", methods=["DELETE"], authorizer=iam)
@api
def stop_job(job_key: str) -> tuple[int, dict]:
    owner, key = _caller(), validate_job_key(job_key)  # the caller (403) first, then the key and body (400)
    attempt, reason = parse_stop_request(_raw())
    return 200, job_view(factory.job_service().stop(key, owner, attempt, reason))


@app.route("/jobs/{job_key}/heartbeat", methods=["POST"], authorizer=iam)
@api
def heartbeat(job_key: str) -> tuple[int, dict]:
    owner, key = _caller(), validate_job_key(job_key)
    attempt, ready = parse_heartbeat_request(_raw())
    return 200, job_view(factory.job_service().heartbeat(key, owner, attempt, ssh_ready_seconds=ready))


@app.route("/tasks/{task_id}/host-key", methods=["PUT"], authorizer=iam, content_types=["application/json"])
@api
def publish_host_key(task_id: str) -> tuple[int, dict]:
    """The task itself (signed with its task role: the session is its task id) publishes its host key."""
    identity = _context().get("identity") or {}
    _caller()  # nothing answers an anonymous request
    task, host_key = validate_task_id(task_id), parse_host_key_request(_raw())
    return 200, factory.job_service().publish_host_key(identity.get("userArn"), _account(), task, host_key)


@app.on_cw_event(
    {"source": ["aws.ecs"], "detail-type": ["ECS Task State Change"]}, name="on_task_state_change"
)
def on_task_state_change(event: CloudWatchEvent) -> None:
    from chalicelib.events import handle_task_event

    begin_invocation(event.context)
    handle_task_event(event.to_dict(), factory.job_service(), factory.current_settings())
    metrics.flush_metrics()


# The rate is a deploy-time choice (Chalice needs it when it builds the schedule).
@app.schedule(Rate(int(os.environ.get("REAPER_RATE_MINUTES", "5")), unit=Rate.MINUTES), name="reaper")
def reaper(event: CloudWatchEvent) -> None:
    from chalicelib.reaper import run_reaper

    begin_invocation(event.context)
    run_reaper(factory.job_service(), factory.current_settings())
    metrics.flush_metrics()
