"""How a job view (design.md "The job view") reads in the job log when its task did not run as planned."""

from __future__ import annotations

LIVE_STATES = ("PROVISIONING", "PENDING", "RUNNING")
ENDING_STATES = ("STOPPING", "STOPPED", "FAILED")
# Stop codes that mean AWS took the task away, whatever state the job record shows yet.
INTERRUPTION_CODES = ("TerminationNotice", "SpotInterruption")


def task_gone(view: dict) -> bool:
    """True when the task is stopping or stopped, or AWS announced it will be."""
    return view.get("state") in ENDING_STATES or bool(view.get("stop_code"))


def stop_summary(view: dict) -> list[str]:
    """AWS's reasons, one per line: stop code and reason, then the container's own reason and exit code."""
    lines = []
    state = view.get("state") or "unknown"
    code = view.get("stop_code")
    reason = view.get("stopped_reason")
    head = f"task {view.get('task_arn') or '(none yet)'} is {state}"
    if code:
        head += f", stop code {code}"
    lines.append(head)
    if reason:
        lines.append(f"stopped reason: {reason}")
    container = view.get("container_reason")
    if container and container == reason:
        container = None  # AWS often repeats the container's reason as the task's
    exit_code = view.get("exit_code")
    if container or exit_code is not None:
        text = container or "exited"
        lines.append(f"container: {text}" + (f" (exit code {exit_code})" if exit_code is not None else ""))
    if code in INTERRUPTION_CODES:
        lines.append("AWS reclaimed the Fargate Spot capacity; retry the job")
    return lines
