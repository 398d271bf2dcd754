"""Faults an operator or a test arms for the task of one GitLab job (or every later task).

A fault is matched at RunTask time by the task's `gitlab-ci:job-id` tag. Faults for one job apply to the
next task started for that job and are then used up (so the runner's prepare retry gets a healthy task);
faults for `*` apply to every later task until cleared.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Any

from sandbox.errors import UsageError

ANY_JOB = "*"
TASK_STATUSES = (
    "PROVISIONING",
    "PENDING",
    "RUNNING",
    "DEACTIVATING",
    "STOPPING",
    "DEPROVISIONING",
    "STOPPED",
)

# kind -> {parameter: (type, required)}
KINDS: dict[str, dict[str, tuple[type, bool]]] = {
    "fail-to-start": {},
    "slow-provisioning": {"seconds": (float, True)},
    "sshd-delay": {"seconds": (float, True)},
    "exit": {"after": (float, True), "code": (int, True)},
    "spot": {"after": (float, True), "notice": (float, True), "versionless": (bool, False)},
    "spot-no-capacity": {},
    "events": {"drop": (list, False), "duplicate": (bool, False), "reorder": (bool, False)},
}


@dataclass(frozen=True)
class Fault:
    job_id: str
    kind: str
    params: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "kind": self.kind, **self.params}


def parse_fault(body: Any) -> Fault:
    """Validate a fault as given to POST /faults: {"job_id": "42", "kind": "exit", "after": 1, "code": 3}."""
    if not isinstance(body, dict):
        raise UsageError("a fault must be a JSON object")
    job_id = str(body.get("job_id", "")).strip()
    if job_id != ANY_JOB and not re.fullmatch(r"\d{1,19}", job_id):
        raise UsageError(f"job_id must be a GitLab job id (digits) or '*', got {body.get('job_id')!r}")
    kind = body.get("kind")
    if kind not in KINDS:
        raise UsageError(f"unknown fault kind {kind!r}; one of: {', '.join(KINDS)}")
    spec = KINDS[kind]
    unknown = set(body) - {"job_id", "kind"} - set(spec)
    if unknown:
        raise UsageError(f"fault {kind} takes no parameter {', '.join(sorted(unknown))}")
    params: dict[str, Any] = {}
    for name, (kind_type, required) in spec.items():
        if name not in body or body[name] is None:
            if required:
                raise UsageError(f"fault {kind} needs --{name}")
            continue
        params[name] = _coerce(kind, name, body[name], kind_type)
    if kind == "events" and not (params.get("drop") or params.get("duplicate") or params.get("reorder")):
        raise UsageError("fault events needs --drop STATUS,..., --duplicate or --reorder")
    return Fault(job_id=job_id, kind=kind, params=params)


def _coerce(kind: str, name: str, value: Any, wanted: type) -> Any:
    if wanted is float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UsageError(f"fault {kind}: --{name} must be a number of seconds, got {value!r}") from None
        if not 0 <= number <= 86400:
            raise UsageError(f"fault {kind}: --{name} must be between 0 and 86400 seconds")
        return number
    if wanted is int:
        if isinstance(value, bool) or not re.fullmatch(r"-?\d+", str(value)):
            raise UsageError(f"fault {kind}: --{name} must be an integer, got {value!r}")
        number = int(value)
        if not 0 <= number <= 255:
            raise UsageError(f"fault {kind}: --{name} must be an exit code 0-255")
        return number
    if wanted is bool:
        if not isinstance(value, bool):
            raise UsageError(f"fault {kind}: {name} must be true or false")
        return value
    # the list of statuses to drop: "RUNNING,STOPPED" or ["RUNNING", "STOPPED"]
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise UsageError(f"fault {kind}: --{name} must list task statuses")
    statuses = [str(item).strip().upper() for item in items if str(item).strip()]
    bad = [status for status in statuses if status not in TASK_STATUSES]
    if bad:
        raise UsageError(
            f"fault {kind}: unknown task status {', '.join(bad)}; one of: {', '.join(TASK_STATUSES)}"
        )
    return statuses


class FaultRegistry:
    """Armed faults, thread-safe (the control server arms, RunTask takes)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: list[Fault] = []

    def arm(self, fault: Fault) -> None:
        with self._lock:
            self._armed.append(fault)

    def clear(self) -> int:
        with self._lock:
            count = len(self._armed)
            self._armed.clear()
            return count

    def armed(self) -> list[Fault]:
        with self._lock:
            return list(self._armed)

    def take_kind(self, job_id: str | None, kind: str) -> Fault | None:
        """One fault of `kind` for `job_id` (its own, used up; else a `*` one, kept), leaving the others."""
        with self._lock:
            for fault in self._armed:
                if fault.kind == kind and job_id is not None and fault.job_id == job_id:
                    self._armed.remove(fault)
                    return fault
            return next((f for f in self._armed if f.kind == kind and f.job_id == ANY_JOB), None)

    def take(self, job_id: str | None) -> list[Fault]:
        """The faults for a new task of `job_id`: its own (used up) and the `*` ones (kept)."""
        with self._lock:
            # RunTask consults spot-no-capacity itself (take_kind), before any task exists.
            own = [
                f
                for f in self._armed
                if job_id is not None and f.job_id == job_id and f.kind != "spot-no-capacity"
            ]
            self._armed = [f for f in self._armed if f not in own]
            return own + [f for f in self._armed if f.job_id == ANY_JOB and f.kind != "spot-no-capacity"]
