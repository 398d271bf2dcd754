"""One emulated Fargate task's life, on its own thread.

moto's Task object is the state DescribeTasks shows; this module moves it through PROVISIONING → PENDING →
RUNNING → DEACTIVATING → STOPPING → DEPROVISIONING → STOPPED with AWS's timestamps, stop codes and
`version`, runs its container, and publishes every change as an "ECS Task State Change" event.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandbox.container import Container, ContainerSpec
from sandbox.credentials import TaskIdentity
from sandbox.events import EventFaults, drop_empty, iso
from sandbox.faults import Fault
from sandbox.images import Image

if TYPE_CHECKING:
    from sandbox.fargate import DataPlane

log = logging.getLogger("sandbox.task")

PLATFORM_VERSION = "1.4.0"
PULL_ERROR = (
    "CannotPullContainerError: pull image manifest has been retried 7 time(s): "
    "failed to resolve ref {image}: not found"
)
SPOT_REASON = "Your Spot Task was interrupted."
EXITED_REASON = "Essential container in task exited"
USER_REASON = "Task stopped by user"
# What a container definition may add to Docker's default capabilities on Fargate (AWS: only SYS_PTRACE).
EXTRA_CAPABILITIES = ("SYS_PTRACE",)


def now() -> datetime:
    return datetime.now(UTC)


@dataclass
class TaskPlan:
    """What the faults armed for a task change about its life."""

    provision_delay: float
    fail_to_start: bool = False
    sshd_delay: float = 0.0
    exit_after: float | None = None
    exit_code: int = 0
    spot_after: float | None = None
    spot_notice: float = 0.0
    events: EventFaults = field(default_factory=EventFaults)

    @classmethod
    def from_faults(cls, faults: list[Fault], provision_delay: float) -> TaskPlan:
        plan = cls(provision_delay=provision_delay)
        drop: set[str] = set()
        for fault in faults:
            p = fault.params
            if fault.kind == "fail-to-start":
                plan.fail_to_start = True
            elif fault.kind == "slow-provisioning":
                plan.provision_delay = p["seconds"]
            elif fault.kind == "sshd-delay":
                plan.sshd_delay = p["seconds"]
            elif fault.kind == "exit":
                plan.exit_after, plan.exit_code = p["after"], p["code"]
            elif fault.kind == "spot":
                plan.spot_after, plan.spot_notice = p["after"], p["notice"]
                plan.events.versionless_notice |= p.get("versionless", False)
            elif fault.kind == "events":
                drop |= set(p.get("drop", []))
                plan.events.duplicate |= p.get("duplicate", False)
                plan.events.reorder |= p.get("reorder", False)
        plan.events.drop = drop
        return plan


class FargateTask:
    """One task's life, on its own thread. moto's Task object is the state DescribeTasks shows."""

    def __init__(
        self, plane: DataPlane, backend: Any, task: Any, task_def: Any, plan: TaskPlan, job_id: str | None
    ):
        self.plane = plane
        self.backend = backend
        self.task = task
        self.task_def = task_def
        self.plan = plan
        self.job_id = job_id
        self.id = task.id
        self.address = attachment_detail(task, "privateIPv4Address")
        # The running containers, in the order they started (the first holds the task's namespaces).
        self.containers: dict[str, Container] = {}
        self._stop_requested = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"task-{self.id[:8]}", daemon=True)
        self._prepare_model()

    # --- what DescribeTasks and the events show -------------------------------------------------------

    def _prepare_model(self) -> None:
        t, td = self.task, self.task_def
        overrides = t.overrides or {}
        t.status = "PROVISIONING"  # moto starts tasks RUNNING
        t.desired_status = "RUNNING"
        t.version = 1
        t.created_at = now()
        t.updated_at = t.created_at
        t.cpu = str(overrides.get("cpu") or td.cpu or "256")
        t.memory = str(overrides.get("memory") or td.memory or "512")
        t.launch_type = t.launch_type or "FARGATE"  # AWS shows it next to capacityProviderName too
        t.platform_version = (
            PLATFORM_VERSION if t.platform_version in (None, "", "LATEST") else t.platform_version
        )
        t.platform_family = "Linux"
        t.availability_zone = self.plane.availability_zone(self.backend, t)
        t.connectivity = None  # CONNECTED once the ENI is up (botocore: CONNECTED|DISCONNECTED)
        t.enable_execute_command = False
        t.ephemeral_storage = {"sizeInGiB": 20}
        t.attributes = [{"name": "ecs.cpu-architecture", "value": "x86_64"}]
        t.stop_code = None
        t.stopped_reason = None
        for attachment in t.attachments:
            attachment["status"] = "PRECREATED"
        # moto makes one container, from the first definition; ECS shows one per container definition.
        template = t.containers[0]
        containers = []
        for definition in td.container_definitions:
            container = copy.copy(template)
            container.container_arn = (
                f"{t.cluster_arn.replace(':cluster/', ':container/')}/{self.id}/{uuid.uuid4()}"
            )
            container.name = definition.get("name")
            container.image = definition.get("image")
            container.cpu = definition.get("cpu", 0)
            container.memory = definition.get("memory")
            container.environment = definition.get("environment")
            container.command = definition.get("command")
            container.essential = definition.get("essential", True)
            container.last_status = "PENDING"
            container.exitCode = None
            container.reason = None
            digest = hashlib.sha256(f"{self.id}/{container.name}".encode()).hexdigest()[:10]
            container.runtime_id = f"{self.id}-{digest}"
            container.task_arn = t.task_arn
            container.network_interfaces = [
                {"attachmentId": a["id"], "privateIpv4Address": self.address} for a in t.attachments
            ]
            containers.append(container)
        t.containers = containers

    def detail(self) -> dict[str, Any]:
        """The event detail, as AWS sends it (taken under the plane's lock)."""
        t = self.task
        containers = [
            drop_empty(
                {
                    "containerArn": c.container_arn,
                    "lastStatus": c.last_status,
                    "name": c.name,
                    "image": c.image,
                    "runtimeId": c.runtime_id if c.last_status != "PENDING" else None,
                    "taskArn": t.task_arn,
                    "networkInterfaces": c.network_interfaces,
                    "cpu": str(c.cpu or 0),
                    "memory": str(c.memory) if c.memory else None,
                    "exitCode": c.exitCode,
                    "reason": c.reason,
                }
            )
            for c in t.containers
        ]
        detail = {
            "attachments": json.loads(json.dumps(t.attachments)),
            "attributes": t.attributes,
            "availabilityZone": t.availability_zone,
            "clusterArn": t.cluster_arn,
            "connectivity": t.connectivity,
            "connectivityAt": iso(getattr(t, "connectivity_at", None)),
            "containers": containers,
            "cpu": t.cpu,
            "createdAt": iso(t.created_at),
            "desiredStatus": t.desired_status,
            "enableExecuteCommand": False,
            "ephemeralStorage": t.ephemeral_storage,
            "executionStoppedAt": iso(getattr(t, "execution_stopped_at", None)),
            "group": t.group,
            "launchType": t.launch_type or None,
            "capacityProviderName": t.capacity_provider_name,
            "lastStatus": t.status,
            "memory": t.memory,
            "overrides": t.overrides or {"containerOverrides": []},
            "platformVersion": t.platform_version,
            "platformFamily": "Linux",
            "pullStartedAt": iso(getattr(t, "pull_started_at", None)),
            "pullStoppedAt": iso(getattr(t, "pull_stopped_at", None)),
            "startedAt": iso(getattr(t, "started_at", None)),
            "startedBy": t.started_by or None,
            "stopCode": t.stop_code,
            "stoppedAt": iso(getattr(t, "stopped_at", None)),
            "stoppedReason": t.stopped_reason,
            "stoppingAt": iso(getattr(t, "stopping_at", None)),
            "taskArn": t.task_arn,
            "taskDefinitionArn": t.task_definition_arn,
            "updatedAt": iso(t.updated_at),
            "version": t.version,
        }
        return drop_empty(detail)

    def _change(self, last_status: str | None = None, **attrs: Any) -> None:
        """Apply one state change, bump `version`, publish its event."""
        with self.plane.lock:
            stamp = now()
            for name, value in attrs.items():
                setattr(self.task, name, stamp if value is now else value)
            if last_status:
                self.task.status = last_status
            self.task.version += 1
            self.task.updated_at = stamp
            final = self.task.status == "STOPPED"
            detail = self.detail()
        log.info(
            "task %s job=%s lastStatus=%s desiredStatus=%s stopCode=%s version=%s",
            self.id, self.job_id, detail["lastStatus"], detail["desiredStatus"], detail.get("stopCode"),
            detail["version"],
        )  # fmt: skip
        for event in self.plan.events.apply(detail, final):
            self.plane.bus.publish(event)

    def _container_state(
        self,
        last_status: str,
        exit_code: int | None = None,
        reason: str | None = None,
        *,
        name: str | None = None,
    ) -> None:
        """Set the named container's status (every container's, without a name)."""
        with self.plane.lock:
            for c in self.task.containers:
                if name is not None and c.name != name:
                    continue
                if c.last_status == "STOPPED" and last_status != "STOPPED":
                    continue
                c.last_status = last_status
                if exit_code is not None:
                    c.exitCode = exit_code
                if reason is not None and c.reason is None:
                    c.reason = reason

    # --- the life ------------------------------------------------------------------------------------

    def start(self) -> None:
        with self.plane.lock:
            detail = self.detail()
        for event in self.plan.events.apply(detail, False):
            self.plane.bus.publish(event)
        log.info("task %s job=%s lastStatus=PROVISIONING address=%s", self.id, self.job_id, self.address)
        self._thread.start()

    def request_stop(self, stop_code: str, reason: str) -> bool:
        """StopTask: returns False when the task is already on its way down."""
        with self.plane.lock:
            if self.task.desired_status == "STOPPED":
                return False
            self.task.desired_status = "STOPPED"
            self.task.stop_code = stop_code
            self.task.stopped_reason = reason
        self._change(stopping_at=now)
        self._stop_requested.set()
        return True

    def kill_now(self) -> None:
        """The sandbox is shutting down: no events, just make sure nothing of the task survives."""
        self._stop_requested.set()
        self._kill_all()

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _sleep(self, seconds: float) -> bool:
        """Wait; True when a stop was requested meanwhile."""
        return self._stop_requested.wait(max(0.0, seconds))

    def _run(self) -> None:
        try:
            self._life()
        except Exception:
            log.exception("task %s: emulation failed; stopping it", self.id)
            self._kill_all()
            with contextlib.suppress(Exception):
                self._finish()
        finally:
            self.plane.forget(self)

    def _life(self) -> None:
        half = self.plan.provision_delay / 2
        if self._sleep(half):
            return self._stop_unstarted()
        self._change("PENDING", connectivity="CONNECTED", connectivity_at=now, pull_started_at=now)
        for attachment in self.task.attachments:
            attachment["status"] = "ATTACHED"
        if self._sleep(half):
            return self._stop_unstarted()
        definitions = self.task_def.container_definitions
        if self.plan.fail_to_start:
            return self._fail_to_start(PULL_ERROR.format(image=definitions[0]["image"]))
        images: dict[str, Image] = {}
        for definition in definitions:
            image = self.plane.images.resolve(definition["image"])
            if image is None:  # as AWS: the task stops before any container ran
                reason = PULL_ERROR.format(image=definition["image"])
                return self._fail_to_start(reason, container=definition["name"])
            images[definition["name"]] = image
        with self.plane.lock:
            self.task.pull_stopped_at = now()
        try:
            for index, definition in enumerate(definitions):
                spec = self._container_spec(definition, images[definition["name"]], first=index == 0)
                self.containers[definition["name"]] = self.plane.launcher.start(spec)
        except Exception as exc:
            log.exception("task %s: container did not start", self.id)
            self._kill_all()
            return self._fail_to_start(f"CannotStartContainerError: {exc}")
        self._container_state("RUNNING")
        self._change("RUNNING", started_at=now)
        self._run_until_stopped()
        self._stop_running()

    def _essential(self) -> list[str]:
        return [d["name"] for d in self.task_def.container_definitions if d.get("essential", True)] or list(
            self.containers
        )

    def _run_until_stopped(self) -> None:
        spot_at = None if self.plan.spot_after is None else time.monotonic() + self.plan.spot_after
        essential = self._essential()
        while not self._stop_requested.is_set():
            for name, container in self.containers.items():
                exit_code = container.poll()
                if exit_code is None:
                    continue
                self._container_state("STOPPED", exit_code=exit_code, name=name)
                if name not in essential:
                    continue
                with self.plane.lock:
                    if self.task.desired_status == "STOPPED":
                        return
                    self.task.desired_status = "STOPPED"
                    self.task.stop_code = "EssentialContainerExited"
                    self.task.stopped_reason = EXITED_REASON
                self._change(stopping_at=now, execution_stopped_at=now)
                return
            if spot_at is not None and time.monotonic() >= spot_at:
                return self._spot_interruption()
            self._stop_requested.wait(0.05)

    def _spot_interruption(self) -> None:
        """Two-minute warning (here: the `--notice` window): an event and SIGTERM, then the task stops."""
        with self.plane.lock:
            self.task.desired_status = "STOPPED"
            self.task.stop_code = "TerminationNotice"
            self.task.stopped_reason = SPOT_REASON
        self._change(stopping_at=now)
        for container in self.containers.values():
            container.terminate()
        self._stop_requested.wait(self.plan.spot_notice)  # cut short only when the sandbox stops
        self._kill_all()  # the capacity is gone at the end of the notice
        with self.plane.lock:
            self.task.stop_code = "SpotInterruption"

    def _stop_running(self) -> None:
        self._change("DEACTIVATING")
        self._change("STOPPING")
        # ECS stops the containers in reverse start order: the first holds the task's namespaces.
        timeouts = {d["name"]: d.get("stopTimeout") or 30 for d in self.task_def.container_definitions}
        for name, container in reversed(self.containers.items()):
            if container.poll() is None:
                container.terminate()
                if container.wait(timeouts.get(name, 30)) is None:
                    container.kill()
                    container.wait(10)
        for name, container in self.containers.items():
            self._container_state("STOPPED", exit_code=container.poll(), name=name)
        with self.plane.lock:
            if getattr(self.task, "execution_stopped_at", None) is None:
                self.task.execution_stopped_at = now()
        self._finish()

    def _stop_unstarted(self) -> None:
        """Stopped before the container ran (StopTask while PROVISIONING or PENDING)."""
        self._container_state("STOPPED")
        self._finish()

    def _fail_to_start(self, reason: str, container: str | None = None) -> None:
        """The task never ran; `container` is the one whose image failed (the reason shows on it and, as
        on AWS, on the task), the others just stop."""
        with self.plane.lock:
            self.task.desired_status = "STOPPED"
            self.task.stop_code = "TaskFailedToStart"
            self.task.stopped_reason = reason
        self._container_state("STOPPED", reason=reason, name=container)
        self._container_state("STOPPED")
        self._change(stopping_at=now, execution_stopped_at=now)
        self._finish()

    def _finish(self) -> None:
        for attachment in self.task.attachments:
            attachment["status"] = "DETACHED"
        self._change("DEPROVISIONING")
        self.plane.release_network(self)
        if getattr(self.plane, "task_endpoints", None) is not None:
            self.plane.task_endpoints.forget(self.id)
        shutil.rmtree(self.plane.config.sandbox.tasks / self.id, ignore_errors=True)
        for attachment in self.task.attachments:
            attachment["status"] = "DELETED"
        self._change("STOPPED", stopped_at=now, connectivity=None)

    def _kill_all(self) -> None:
        for container in reversed(self.containers.values()):
            container.kill()
        for container in self.containers.values():
            container.wait(10)

    def _container_spec(self, definition: dict, image: Image, *, first: bool) -> ContainerSpec:
        """A container definition as Docker runs it: the definition's entryPoint/command/workingDirectory
        over the image's (a definition's entryPoint drops the image's Cmd, as Docker does)."""
        config = self.plane.config
        entrypoint = definition.get("entryPoint")
        if entrypoint is not None and all(part == "" for part in entrypoint):
            entrypoint = []  # Docker: an empty entrypoint resets the image's
        command = definition.get("command")
        if entrypoint is None:
            argv = (*image.entrypoint, *(command if command is not None else image.cmd))
        else:
            argv = (*entrypoint, *(command or ()))
        if not argv:
            raise RuntimeError(f"container {definition['name']}: no command specified")
        argv = tuple(argv)
        # Faults that change the container itself wrap the first container's command in a tiny shell.
        if first and self.plan.sshd_delay:
            argv = (
                "/bin/sh",
                "-c",
                'sleep "$1"; shift; exec "$@"',
                "sshd-delay",
                str(self.plan.sshd_delay),
                *argv,
            )
        if first and self.plan.exit_after is not None:
            script = (
                'after=$1 code=$2; shift 2; "$@" & sleep "$after"; kill -KILL $! 2>/dev/null; exit "$code"'
            )
            argv = (
                "/bin/sh",
                "-c",
                script,
                "exit",
                str(self.plan.exit_after),
                str(self.plan.exit_code),
                *argv,
            )
        task_dir = config.sandbox.tasks / self.id
        volumes = {v["name"] for v in self.task_def.volumes or []}
        mounts = tuple(
            (str(task_dir / "volumes" / m["sourceVolume"]), m["containerPath"])
            for m in definition.get("mountPoints") or []
            if m.get("sourceVolume") in volumes
        )
        # A read-only image (the task image) gets its own /etc/hosts only, over the image's: a job container
        # of it needs the service aliases there too.
        only = ("hosts",) if image.read_only_root else ("hosts", "hostname", "resolv.conf")
        mounts += self._etc_files(task_dir / "etc" / definition["name"], only)
        added = ((definition.get("linuxParameters") or {}).get("capabilities") or {}).get("add") or []
        first_pid = None if first else next(iter(self.containers.values())).init_pid()
        suffix = "" if first else f".{definition['name']}"
        return ContainerSpec(
            task_id=self.id,
            name=definition["name"],
            hostname=f"ip-{self.address.replace('.', '-')}.{config.region}.compute.internal",
            image=image,
            host_dir=task_dir,
            command=argv,
            env=self._container_env(definition, image),
            log_path=config.sandbox.task_logs / f"{self.id}{suffix}.log",
            workdir=definition.get("workingDirectory") or image.workdir,
            mounts=mounts,
            extra_capabilities=tuple(cap for cap in added if cap in EXTRA_CAPABILITIES),
            join_pid=first_pid,
        )

    def _etc_files(self, directory: Path, only: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
        """/etc/hosts, /etc/hostname and /etc/resolv.conf, as a container runtime writes them for each
        container (writable: the job's own sessions add the service aliases to /etc/hosts)."""
        directory.mkdir(parents=True, exist_ok=True)
        hostname = f"ip-{self.address.replace('.', '-')}.{self.plane.config.region}.compute.internal"
        files = {
            "hosts": (
                "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                f"{self.address}\t{hostname}\n"
            ),
            "hostname": f"{hostname}\n",
            "resolv.conf": "nameserver 127.0.0.53\n",
        }
        for name in only:
            (directory / name).write_text(files[name])
        return tuple((str(directory / name), f"/etc/{name}") for name in only)

    def _container_env(self, definition: dict, image: Image) -> dict[str, str]:
        """Like Fargate: the image's environment, the task definition's, the RunTask overrides, then the ECS
        variables."""
        config = self.plane.config
        env = dict(image.env)
        env.update({"HOME": "/root", "HOSTNAME": f"ip-{self.address.replace('.', '-')}"})
        for item in definition.get("environment") or []:
            env[item["name"]] = item["value"]
        for override in (self.task.overrides or {}).get("containerOverrides") or []:
            if override.get("name") == definition["name"]:
                for item in override.get("environment") or []:
                    env[item["name"]] = item["value"]
        # The task role's credentials and the task metadata, per task (sandbox/credentials.py).
        registry = getattr(self.plane, "task_endpoints", None)
        endpoints = (
            registry.register(
                TaskIdentity(
                    task_id=self.id,
                    task_arn=self.task.task_arn,
                    cluster_arn=self.task.cluster_arn,
                    family=self.task_def.family,
                    revision=str(self.task_def.revision),
                    availability_zone=self.task.availability_zone or "",
                )
            )
            if registry is not None
            else {}
        )
        env.update(
            {
                **endpoints,
                "ECS_AGENT_URI": endpoints.get("ECS_CONTAINER_METADATA_URI_V4", "").replace("/v4/", "/api/"),
                "AWS_REGION": config.region,
                "AWS_DEFAULT_REGION": config.region,
                "AWS_EXECUTION_ENV": "AWS_ECS_FARGATE",
                "SSHD_LISTEN_ADDRESS": self.address,  # tasks share the host's network namespace here
            }
        )
        return env


def attachment_detail(task: Any, name: str) -> str:
    for attachment in task.attachments:
        for detail in attachment["details"]:
            if detail["name"] == name:
                return detail["value"]
    raise RuntimeError(f"task {task.id} has no {name}")


def job_id_tag(tags: list[dict[str, str]] | None) -> str | None:
    for tag in tags or []:
        if tag.get("key") == "gitlab-ci:job-id":
            return tag.get("value")
    return None
