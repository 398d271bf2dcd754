"""What ECS serves a task on 169.254.170.2, per task: its task role's credentials and its metadata (v4).

ECS's container agent gives each task a credentials id and sets AWS_CONTAINER_CREDENTIALS_RELATIVE_URI
(`/v2/credentials/<id>`) in its containers; `curl 169.254.170.2$AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`
answers `{"RoleArn", "AccessKeyId", "SecretAccessKey", "Token", "Expiration"}` (AWS, "Using IAM roles with
Amazon ECS tasks", ECS best practices guide). The role's session is named after the task id
(aws/amazon-ecs-agent#3498: "tasks assume the task role and the session ID is the task ID"), so a signed call
from a task names it: `arn:aws:sts::<acct>:assumed-role/<task role>/<task id>`. ECS_CONTAINER_METADATA_URI_V4
+ `/task` answers the task's metadata (`TaskARN`, `Cluster`, ...).

Here both are served from the AWS host on 127.0.0.1 (the tasks share the host's network namespace, where
169.254.170.2 cannot be ours): tasks get AWS_CONTAINER_CREDENTIALS_FULL_URI (which the SDKs and the
entrypoint accept for a loopback address) instead of the relative URI. Credentials come from the sandbox's
STS (`sigv4.RoleSessions`), so the API host verifies the task's signature as API Gateway would.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sandbox.layout import ACCOUNT_ID

log = logging.getLogger("sandbox.credentials")

TASK_ROLE = "fargate-ci-task"  # the task definitions' taskRoleArn (provision.py)
CREDENTIALS_LIFETIME = timedelta(hours=6)  # what ECS hands out lasts hours; it is refreshed before expiry


@dataclass(frozen=True)
class TaskIdentity:
    task_id: str
    task_arn: str
    cluster_arn: str
    family: str
    revision: str
    availability_zone: str


class TaskEndpoints:
    """The credentials and metadata endpoints of every running task, on one loopback HTTP server."""

    def __init__(self, sessions: Any) -> None:
        self._sessions = sessions  # sigv4.RoleSessions knowing TASK_ROLE
        self._lock = threading.Lock()
        self._by_credentials: dict[str, TaskIdentity] = {}
        self._by_metadata: dict[str, TaskIdentity] = {}
        handler = type("Handler", (_Handler,), {"endpoints": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, name="task-endpoints", daemon=True).start()

    def register(self, task: TaskIdentity) -> dict[str, str]:
        """The environment that points the task at its endpoints (unguessable paths, one set per task)."""
        credentials_id, metadata_id = secrets.token_hex(16), f"{task.task_id}-{secrets.token_hex(5)}"
        with self._lock:
            self._by_credentials[credentials_id] = task
            self._by_metadata[metadata_id] = task
        metadata = f"{self.base_url}/v4/{metadata_id}"
        return {
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": f"{self.base_url}/v2/credentials/{credentials_id}",
            "ECS_CONTAINER_METADATA_URI_V4": metadata,
            "ECS_CONTAINER_METADATA_URI": metadata.replace("/v4/", "/v3/"),
        }

    def forget(self, task_id: str) -> None:
        """The task is gone: its credentials and metadata no longer answer."""
        with self._lock:
            for table in (self._by_credentials, self._by_metadata):
                for key in [k for k, v in table.items() if v.task_id == task_id]:
                    del table[key]

    def credentials(self, credentials_id: str) -> dict[str, str] | None:
        with self._lock:
            task = self._by_credentials.get(credentials_id)
        if task is None:
            return None
        identity = self._sessions.mint(task.task_id, role=TASK_ROLE)
        expiry = datetime.now(UTC) + CREDENTIALS_LIFETIME
        return {
            "RoleArn": f"arn:aws:iam::{ACCOUNT_ID}:role/{TASK_ROLE}",
            "AccessKeyId": identity.access_key,
            "SecretAccessKey": identity.secret_key,
            "Token": identity.session_token or "",
            "Expiration": expiry.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    def task_metadata(self, metadata_id: str) -> dict[str, Any] | None:
        with self._lock:
            task = self._by_metadata.get(metadata_id)
        if task is None:
            return None
        return {
            "Cluster": task.cluster_arn,
            "TaskARN": task.task_arn,
            "Family": task.family,
            "Revision": task.revision,
            "DesiredStatus": "RUNNING",
            "KnownStatus": "RUNNING",
            "AvailabilityZone": task.availability_zone,
            "LaunchType": "FARGATE",
        }

    def close(self) -> None:
        self._server.shutdown()


class _Handler(BaseHTTPRequestHandler):
    endpoints: TaskEndpoints
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("task endpoint %s", format % args)

    def do_GET(self) -> None:
        parts = self.path.split("?")[0].strip("/").split("/")
        body: dict[str, Any] | None = None
        if len(parts) == 3 and parts[:2] == ["v2", "credentials"]:
            body = self.endpoints.credentials(parts[2])
        elif len(parts) == 3 and parts[0] == "v4" and parts[2] == "task":
            body = self.endpoints.task_metadata(parts[1])
        data = json.dumps(body if body is not None else {"message": "not found"}).encode()
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
