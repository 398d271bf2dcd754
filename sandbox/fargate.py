"""The emulated Fargate data plane, inside the moto process.

moto keeps the ECS control plane (task definitions, RunTask's validation, tags, DescribeTasks). The data
plane adopts every task RunTask creates (sandbox.task runs its life), gives it an address from the subnet
AWS would pick, honours RunTask's clientToken, and turns StopTask into a real stop. sandbox.moto_ecs routes
moto's ECS calls here.
"""

from __future__ import annotations

import contextlib
import ipaddress
import threading
import time
from dataclasses import dataclass
from typing import Any

from sandbox.container import ContainerLauncher
from sandbox.events import EventBus
from sandbox.faults import FaultRegistry
from sandbox.images import ImageStore
from sandbox.layout import AVAILABILITY_ZONES, SandboxDir
from sandbox.task import USER_REASON, FargateTask, TaskPlan, attachment_detail, job_id_tag

CLIENT_TOKEN_TTL = 24 * 3600


class AddressAllocator:
    """Task addresses: deterministic, round-robin per subnet, never .0/.255 or an address in use.

    Like AWS, the first four addresses of a subnet and its last one are reserved.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_use: set[str] = set()
        self._cursor: dict[str, int] = {}

    def allocate(self, cidr: str) -> str:
        network = ipaddress.IPv4Network(cidr)
        first, last = 4, network.num_addresses - 2
        with self._lock:
            start = self._cursor.get(cidr, first)
            for step in range(last - first + 1):
                offset = first + (start - first + step) % (last - first + 1)
                address = str(network.network_address + offset)
                if address not in self._in_use:
                    self._in_use.add(address)
                    self._cursor[cidr] = offset + 1
                    return address
        raise RuntimeError(f"subnet {cidr} has no free address")

    def release(self, address: str) -> None:
        with self._lock:
            self._in_use.discard(address)


class ClientTokenConflict(Exception):
    """Same RunTask clientToken, different parameters."""


@dataclass
class TokenEntry:
    fingerprint: str
    tasks: list[Any]
    at: float


@dataclass
class PlaneConfig:
    sandbox: SandboxDir
    region: str
    provision_delay: float


class DataPlane:
    """All emulated tasks of one sandbox: RunTask adopts them, StopTask stops them, close() kills them."""

    def __init__(self, config: PlaneConfig, faults: FaultRegistry, bus: EventBus) -> None:
        self.config = config
        self.faults = faults
        self.bus = bus
        self.lock = threading.RLock()
        self.images = ImageStore(config.sandbox.root / "images")
        self.images.build()
        self.launcher = ContainerLauncher()
        self.allocator = AddressAllocator()
        self.tasks: dict[str, FargateTask] = {}
        self._run_lock = threading.Lock()
        self._pending_cidr: str | None = None
        self._subnet_turn = 0
        self._tokens: dict[tuple[str, str, str], TokenEntry] = {}
        self._closing = False

    # --- hooks the moto patches call -------------------------------------------------------------------

    def next_address(self, *_: Any) -> str:
        """Stands in for moto's random_private_ip while run_task creates the task's ENI."""
        if self._pending_cidr is None:
            raise RuntimeError("task address requested outside RunTask")
        return self.allocator.allocate(self._pending_cidr)

    def run_task(self, original: Any, backend: Any, args: tuple, kwargs: dict) -> list[Any]:
        """moto's run_task, with the subnet chosen as AWS does (spread over the given ones), tasks adopted."""
        params = bind_run_task_args(args, kwargs)
        if self._closing:
            raise RuntimeError("the sandbox is shutting down")
        task_def = backend.describe_task_definition(params["task_definition_str"])
        network = params.get("networking_configuration")
        with self._run_lock:
            if network and network.get("awsvpcConfiguration", {}).get("subnets"):
                vpc = network["awsvpcConfiguration"]
                subnets = list(vpc["subnets"])
                chosen = subnets[self._subnet_turn % len(subnets)]
                self._subnet_turn += 1
                vpc["subnets"] = [chosen] + [s for s in subnets if s != chosen]
                self._pending_cidr = self._subnet(backend, chosen).cidr_block
            try:
                tasks = original(backend, *args, **kwargs)
            finally:
                self._pending_cidr = None
        for task in tasks:
            job_id = job_id_tag(task.tags)
            plan = TaskPlan.from_faults(self.faults.take(job_id), self.config.provision_delay)
            runtime = FargateTask(self, backend, task, task_def, plan, job_id)
            with self.lock:
                self.tasks[task.task_arn] = runtime
            runtime.start()
        return tasks

    def run_task_idempotent(self, key: tuple[str, str, str], fingerprint: str, run: Any) -> list[Any]:
        """RunTask's clientToken, as AWS honours it: the same token within 24 h gives the same tasks.

        The caller serialises calls (one RunTask with a token at a time)."""
        entry = self._tokens.get(key)
        if entry and time.time() - entry.at < CLIENT_TOKEN_TTL:
            if entry.fingerprint != fingerprint:
                raise ClientTokenConflict
            return entry.tasks
        tasks = run()
        self._tokens[key] = TokenEntry(fingerprint, tasks, time.time())
        return tasks

    def stop_task(self, backend: Any, cluster_str: str, task_str: str, reason: str | None) -> Any:
        from moto.ecs.exceptions import InvalidParameterException

        cluster = backend._get_cluster(cluster_str)
        task_id = task_str.split("/")[-1]
        for arn, task in backend.tasks.get(cluster.name, {}).items():
            if arn.endswith("/" + task_id):
                runtime = self.tasks.get(arn)
                if runtime is not None:
                    runtime.request_stop("UserInitiated", reason or USER_REASON)
                return task
        raise InvalidParameterException("The referenced task was not found.")

    # --- helpers -------------------------------------------------------------------------------------

    @staticmethod
    def _subnet(backend: Any, subnet_id: str) -> Any:
        from moto.ec2.models import ec2_backends

        return ec2_backends[backend.account_id][backend.region_name].get_subnet(subnet_id)

    def availability_zone(self, backend: Any, task: Any) -> str:
        try:
            return self._subnet(backend, attachment_detail(task, "subnetId")).availability_zone
        except Exception:  # noqa: BLE001 (a task without a known subnet still needs an AZ to show)
            return AVAILABILITY_ZONES[0]

    def release_network(self, runtime: FargateTask) -> None:
        from moto.ec2.models import ec2_backends

        ec2 = ec2_backends[runtime.backend.account_id][runtime.backend.region_name]
        with contextlib.suppress(Exception):
            ec2.delete_network_interface(attachment_detail(runtime.task, "networkInterfaceId"))
        self.allocator.release(runtime.address)

    def forget(self, runtime: FargateTask) -> None:
        with self.lock:
            if self.tasks.get(runtime.task.task_arn) is runtime:
                del self.tasks[runtime.task.task_arn]

    def close(self) -> None:
        """Kill every task's processes (the sandbox is stopping)."""
        self._closing = True
        with self.lock:
            runtimes = list(self.tasks.values())
        for runtime in runtimes:
            runtime.kill_now()
        for runtime in runtimes:
            runtime.join(5)
        self.launcher.close()


_RUN_TASK_PARAMS = (
    "cluster_str", "task_definition_str", "count", "overrides", "started_by", "tags", "launch_type",
    "networking_configuration", "group", "platform_version", "capacity_provider_strategy",
)  # fmt: skip


LIST_TASKS_PARAMS = (
    "cluster_str",
    "container_instance",
    "family",
    "started_by",
    "service_name",
    "desiredStatus",
)


def bind_run_task_args(args: tuple, kwargs: dict) -> dict[str, Any]:
    params = dict(zip(_RUN_TASK_PARAMS, args, strict=False))
    params.update(kwargs)
    return params
