"""Whether a process is alive: the one check the driver (its agent's pid file) and the sandbox (its
processes) share. Standard library built-ins only (the stage fast path may load it)."""

from __future__ import annotations


def alive(pid: int) -> bool:
    """Running, i.e. neither gone nor a zombie waiting for its parent (`/proc/PID/stat`'s state field)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
