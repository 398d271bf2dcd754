"""The sandbox's AWS process: moto as an HTTP server, the emulated Fargate data plane, the fault control API.

Started by `python -m sandbox start`; it announces its ports in DIR/run/aws.json once everything answers
and runs until SIGTERM, when it kills every task and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from sandbox.errors import SandboxError
from sandbox.faults import FaultRegistry, parse_fault
from sandbox.layout import REGION, SandboxDir

log = logging.getLogger("sandbox.aws")

NETWORK_OCTETS = range(42, 250)  # 127.<octet>.0.0/16, one per running sandbox on the machine


def claim_network(lock_dir: Path) -> tuple[int, Any]:
    """Take the first free 127.x network; the flock is held (and so the network ours) while we live."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    for octet in NETWORK_OCTETS:
        # Read-only, and created writable by all: sandboxes of different users share the machine's 127.x
        # networks, and flock needs no write access.
        path = lock_dir / f"fargate-ci-sandbox-net-{octet}.lock"
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
        with contextlib.suppress(OSError):  # someone else's file: theirs to keep as it is
            os.fchmod(fd, 0o666)
        handle = os.fdopen(fd, "r")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        return octet, handle
    raise SandboxError("no free 127.x network for the sandbox's tasks")


def write_json_atomically(path: Path, data: dict[str, Any], mode: int = 0o644) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2)
    os.replace(tmp, path)


class ControlHandler(BaseHTTPRequestHandler):
    """POST/GET/DELETE /faults, POST /images, GET /tasks, GET /health on the control URL."""

    faults: FaultRegistry
    plane: Any
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("control %s", format % args)

    def _reply(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._reply(200, {"status": "ok"})
        elif self.path == "/faults":
            self._reply(200, {"faults": [f.as_dict() for f in self.faults.armed()]})
        elif self.path == "/tasks":
            with self.plane.lock:
                tasks = [
                    {
                        "task_arn": arn,
                        "job_id": rt.job_id,
                        "address": rt.address,
                        "last_status": rt.task.status,
                    }
                    for arn, rt in self.plane.tasks.items()
                ]
            self._reply(200, {"tasks": tasks})
        else:
            self._reply(404, {"error": "NotFound", "message": f"no route {self.path}"})

    def do_POST(self) -> None:
        if self.path == "/images":
            return self._derive_image()
        if self.path != "/faults":
            return self._reply(404, {"error": "NotFound", "message": f"no route {self.path}"})
        length = int(self.headers.get("Content-Length") or 0)
        try:
            fault = parse_fault(json.loads(self.rfile.read(length) or b"null"))
        except json.JSONDecodeError:
            return self._reply(400, {"error": "InvalidInput", "message": "the body is not JSON"})
        except SandboxError as exc:
            return self._reply(400, {"error": "InvalidInput", "message": str(exc)})
        self.faults.arm(fault)
        log.info("fault armed: %s", fault.as_dict())
        self._reply(201, {"fault": fault.as_dict()})

    def _derive_image(self) -> None:
        """`{"name": "sandbox/web:1", "base": "busybox", "config": {"ExposedPorts": ..., "Cmd": ...}}`: an
        image the sandbox's registry serves and its tasks run from now on (sandbox/images.py `derive`)."""
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(min(length, 1 << 20)) or b"null")
        except json.JSONDecodeError:
            return self._reply(400, {"error": "InvalidInput", "message": "the body is not JSON"})
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            return self._reply(400, {"error": "InvalidInput", "message": "name (an image name) is required"})
        try:
            image = self.plane.images.derive(
                body["name"], body.get("base") or "busybox", body.get("config") or {}
            )
        except ValueError as exc:
            return self._reply(400, {"error": "InvalidInput", "message": str(exc)})
        log.info("image derived: %s from %s", body["name"], body.get("base") or "busybox")
        self._reply(
            201, {"image": body["name"], "repository": image.name, "exposed_ports": list(image.exposed_ports)}
        )

    def do_DELETE(self) -> None:
        if self.path != "/faults":
            return self._reply(404, {"error": "NotFound", "message": f"no route {self.path}"})
        self._reply(200, {"cleared": self.faults.clear()})


def serve_registries(images: Any) -> dict[str, Any]:
    """The image store as two registries: Docker Hub's (busybox and derived images; an anonymous Bearer
    token, as Docker Hub hands out) and the sandbox's ECR (the task image; Basic with the login moto's
    ecr:GetAuthorizationToken gives, `AWS:<account>-auth-token`)."""
    from sandbox.layout import ACCOUNT_ID, IMAGE
    from sandbox.registry import image_config, serve

    def resolver(registry: str) -> Any:
        def resolve(repository: str, tag: str) -> dict | None:
            image = images.resolve(f"{registry}/{repository}:{tag}")
            return image_config(image) if image is not None else None

        return resolve

    ecr = IMAGE.split("/", 1)[0]
    return {
        "docker.io": serve(resolver("docker.io")),
        ecr: serve(resolver(ecr), auth="basic", basic_login=("AWS", f"{ACCOUNT_ID}-auth-token")),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox.aws_host")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--provision-delay", type=float, required=True)
    parser.add_argument("--ssh-port", type=int, required=True)
    parser.add_argument("--task-env", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args(argv)
    sandbox = SandboxDir.at(args.dir)
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    for noisy in ("werkzeug", "botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    # moto and our own boto3 calls only: nothing real may be reached with these.
    os.environ.update(
        {"AWS_ACCESS_KEY_ID": "sandbox", "AWS_SECRET_ACCESS_KEY": "sandbox", "AWS_DEFAULT_REGION": REGION}
    )
    os.environ.pop("AWS_PROFILE", None)
    os.environ.pop("AWS_SESSION_TOKEN", None)

    import boto3
    from moto.server import ThreadedMotoServer

    from sandbox import moto_dynamodb
    from sandbox.control import role_sessions
    from sandbox.credentials import TaskEndpoints
    from sandbox.events import EventBus, moto_put_events
    from sandbox.fargate import DataPlane, PlaneConfig
    from sandbox.moto_ecs import install
    from sandbox.provision import provision

    octet, network_lock = claim_network(Path("/run/lock") if Path("/run/lock").is_dir() else Path("/tmp"))
    moto_dynamodb.install()  # before the server's threads serve any request
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    endpoint = f"http://{host}:{port}"

    faults = FaultRegistry()
    bus = EventBus(moto_put_events())
    plane = DataPlane(PlaneConfig(sandbox, REGION, args.provision_delay), faults, bus)
    # Each task's credentials (its task role, the session named after the task id) and metadata endpoints.
    plane.task_endpoints = TaskEndpoints(role_sessions(sandbox.role_secret))
    install(plane)
    task_env = dict(item.partition("=")[::2] for item in args.task_env)
    resources = provision(boto3.Session(region_name=REGION), endpoint, octet, args.ssh_port, task_env)

    registries = serve_registries(plane.images)
    handler = type("Handler", (ControlHandler,), {"faults": faults, "plane": plane})
    control = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    control.daemon_threads = True
    threading.Thread(target=control.serve_forever, name="control", daemon=True).start()

    write_json_atomically(
        sandbox.ready_file("aws"),
        {
            "pid": os.getpid(),
            "aws_endpoint_url": endpoint,
            "control_url": f"http://127.0.0.1:{control.server_address[1]}",
            "network_octet": octet,
            "task_endpoints_url": plane.task_endpoints.base_url,
            # The image store as registries (sandbox/registry.py), for the orchestrator's REGISTRY_ENDPOINTS.
            "registry_endpoints": {
                host: f"http://127.0.0.1:{server.server_address[1]}" for host, server in registries.items()
            },
            **resources.as_dict(),
        },
    )
    log.info("moto on %s, control on %s, tasks on 127.%s.0.0/16", endpoint, control.server_address, octet)

    while not stop.wait(0.2):
        pass
    log.info("stopping: killing every task")
    plane.close()
    plane.task_endpoints.close()
    bus.close()
    control.shutdown()
    for server in registries.values():
        server.shutdown()
    moto.stop()
    network_lock.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
