"""One emulated Fargate task's life, on its own thread.

moto's Task object is the state DescribeTasks shows; this module moves it through PROVISIONING → PENDING →
RUNNING → DEACTIVATING → STOPPING → DEPROVISIONING → STOPPED with AWS's timestamps, stop codes and
`version`, runs its container, and publishes every change as an "ECS Task State Change" event.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sandbox.container import PATH, Container, ContainerSpec
from sandbox.credentials import TaskIdentity
from sandbox.events import EventFaults, drop_empty, iso
from sandbox.faults import Fault
from sandbox.layout import TASK_ENTRYPOINT

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
        self.container: Container | None = None
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
        container = t.containers[0]
        container.last_status = "PENDING"
        container.exitCode = None
        container.reason = None
        container.runtime_id = f"{self.id}-{hashlib.sha256(self.id.encode()).hexdigest()[:10]}"
        container.task_arn = t.task_arn
        container.network_interfaces = [
            {"attachmentId": a["id"], "privateIpv4Address": self.address} for a in t.attachments
        ]

    def detail(self) -> dict[str, Any]:
        """The event detail, as AWS sends it (taken under the plane's lock)."""
        t = self.task
        c = t.containers[0]
        container = drop_empty(
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
        detail = {
            "attachments": json.loads(json.dumps(t.attachments)),
            "attributes": t.attributes,
            "availabilityZone": t.availability_zone,
            "clusterArn": t.cluster_arn,
            "connectivity": t.connectivity,
            "connectivityAt": iso(getattr(t, "connectivity_at", None)),
            "containers": [container],
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
        self, last_status: str, exit_code: int | None = None, reason: str | None = None
    ) -> None:
        with self.plane.lock:
            c = self.task.containers[0]
            c.last_status = last_status
            if exit_code is not None:
                c.exitCode = exit_code
            if reason is not None:
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
        if self.container is not None:
            self.container.kill()

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
            if self.container is not None:
                self.container.kill()
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
        if self.plan.fail_to_start:
            return self._fail_to_start(
                PULL_ERROR.format(image=self.task_def.container_definitions[0]["image"])
            )
        with self.plane.lock:
            self.task.pull_stopped_at = now()
        try:
            self.container = self.plane.launcher.start(self._container_spec())
        except Exception as exc:
            log.exception("task %s: container did not start", self.id)
            return self._fail_to_start(f"CannotStartContainerError: {exc}")
        self._container_state("RUNNING")
        self._change("RUNNING", started_at=now)
        self._run_until_stopped()
        self._stop_running()

    def _run_until_stopped(self) -> None:
        assert self.container is not None
        spot_at = None if self.plan.spot_after is None else time.monotonic() + self.plan.spot_after
        while not self._stop_requested.is_set():
            exit_code = self.container.poll()
            if exit_code is not None:
                with self.plane.lock:
                    if self.task.desired_status == "STOPPED":
                        break
                    self.task.desired_status = "STOPPED"
                    self.task.stop_code = "EssentialContainerExited"
                    self.task.stopped_reason = EXITED_REASON
                self._container_state("STOPPED", exit_code=exit_code)
                self._change(stopping_at=now, execution_stopped_at=now)
                return
            if spot_at is not None and time.monotonic() >= spot_at:
                return self._spot_interruption()
            self._stop_requested.wait(0.05)

    def _spot_interruption(self) -> None:
        """Two-minute warning (here: the `--notice` window): an event and SIGTERM, then the task stops."""
        assert self.container is not None
        with self.plane.lock:
            self.task.desired_status = "STOPPED"
            self.task.stop_code = "TerminationNotice"
            self.task.stopped_reason = SPOT_REASON
        self._change(stopping_at=now)
        self.container.terminate()
        self._stop_requested.wait(self.plan.spot_notice)  # cut short only when the sandbox stops
        if self.container.poll() is None:  # the capacity is gone at the end of the notice
            self.container.kill()
            self.container.wait(10)
        with self.plane.lock:
            self.task.stop_code = "SpotInterruption"

    def _stop_running(self) -> None:
        assert self.container is not None
        self._change("DEACTIVATING")
        self._change("STOPPING")
        if self.container.poll() is None:
            self.container.terminate()
            stop_timeout = self.task_def.container_definitions[0].get("stopTimeout") or 30
            exit_code = self.container.wait(stop_timeout)
            if exit_code is None:
                self.container.kill()
                exit_code = self.container.wait(10)
        exit_code = self.container.poll()
        with self.plane.lock:
            if self.task.containers[0].last_status != "STOPPED":
                self.task.containers[0].last_status = "STOPPED"
                self.task.containers[0].exitCode = exit_code
            if getattr(self.task, "execution_stopped_at", None) is None:
                self.task.execution_stopped_at = now()
        self._finish()

    def _stop_unstarted(self) -> None:
        """Stopped before the container ran (StopTask while PROVISIONING or PENDING)."""
        self._container_state("STOPPED")
        self._finish()

    def _fail_to_start(self, reason: str) -> None:
        with self.plane.lock:
            self.task.desired_status = "STOPPED"
            self.task.stop_code = "TaskFailedToStart"
            self.task.stopped_reason = reason
        self._container_state("STOPPED", reason=reason)
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

    def _container_spec(self) -> ContainerSpec:
        config = self.plane.config
        command: tuple[str, ...] = ("/bin/sh", TASK_ENTRYPOINT)  # as the image runs it, minus tini
        # Faults that change the container itself wrap the real entrypoint in a tiny shell.
        if self.plan.sshd_delay:
            command = (
                "/bin/sh",
                "-c",
                'sleep "$1"; shift; exec "$@"',
                "sshd-delay",
                str(self.plan.sshd_delay),
                *command,
            )
        if self.plan.exit_after is not None:
            script = (
                'after=$1 code=$2; shift 2; "$@" & sleep "$after"; kill -KILL $! 2>/dev/null; exit "$code"'
            )
            command = (
                "/bin/sh",
                "-c",
                script,
                "exit",
                str(self.plan.exit_after),
                str(self.plan.exit_code),
                *command,
            )
        return ContainerSpec(
            task_id=self.id,
            hostname=f"ip-{self.address.replace('.', '-')}.{config.region}.compute.internal",
            host_dir=config.sandbox.tasks / self.id,
            hidden=(config.sandbox.root,),
            command=command,
            env=self._container_env(),
            log_path=config.sandbox.task_logs / f"{self.id}.log",
        )

    def _container_env(self) -> dict[str, str]:
        """Like Fargate: the task definition's environment, the RunTask overrides, then the ECS variables."""
        config = self.plane.config
        definition = self.task_def.container_definitions[0]
        env = {"PATH": PATH, "HOME": "/root", "HOSTNAME": f"ip-{self.address.replace('.', '-')}"}
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
