"""The sandbox's one error hierarchy; `__main__` maps it to exit codes and one-line messages."""

from __future__ import annotations


class SandboxError(Exception):
    """Something the operator can fix; the message says what."""

    exit_code = 1


class UsageError(SandboxError):
    """A bad command-line option or fault parameter."""

    exit_code = 2


class AlreadyRunning(SandboxError):
    """`start` on a directory whose sandbox is still running."""

    exit_code = 3


class NotRunning(SandboxError):
    """A command that needs a running sandbox found none."""

    exit_code = 4


class StartFailed(SandboxError):
    """A sandbox process died or did not answer while starting."""

    exit_code = 5
