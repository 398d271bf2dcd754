"""Where `prepare` leaves the job key for the job's later stages, and how they read it back.

`run` and `cleanup` must find their job from trusted data, and `run` must stay cheap (it loads only modules
built into the interpreter, so no `json` to re-read the job payload per stage). GitLab Runner makes one
directory per job (`TMPDIR`, which holds `JOB_RESPONSE_FILE`), 0700 and owned by the runner's user; no job
variable can name another one (job variables reach the driver only as `CUSTOM_ENV_*`). So prepare writes
the job key it derived from the payload to `<that directory>/fargate-driver-job`, exclusively, and the
later stages read it there.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # not typing's: `run` loads this module for every stage
if TYPE_CHECKING:
    from collections.abc import Mapping

MARKER_NAME = "fargate-driver-job"
RESPONSE_VARIABLE = "JOB_RESPONSE_FILE"
# The job key's shape, `<runner>-<job id>`, in the driver: this is its one home (settings checks
# `[Runner] ShortToken` with `valid_runner`, the agent checks keys with `valid_key`). The orchestrator's
# `chalicelib/jobs.py` keeps its own regex (the Lambda ships without the driver);
# tests/unit/test_driver_job.py checks that the two accept the same keys.
RUNNER_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
RUNNER_MAX = 12
# GitLab's ids are int64 (gitlab-runner common/spec/spec.go): at most 19 decimal digits.
ID_DIGITS_MAX = 19
_DIGITS = frozenset("0123456789")


def marker_path(environ: Mapping[str, str]) -> str | None:
    """`<dir of JOB_RESPONSE_FILE>/fargate-driver-job`, or None when the runner passed no payload."""
    response = environ.get(RESPONSE_VARIABLE, "")
    if not response or not os.path.isabs(response):
        return None
    return os.path.join(os.path.dirname(response), MARKER_NAME)


def valid_runner(name: str) -> bool:
    """The runner part of a job key: 1-12 of [A-Za-z0-9_-] (without `re`: a stage loads this module)."""
    return 1 <= len(name) <= RUNNER_MAX and set(name) <= RUNNER_CHARS


def valid_key(key: str) -> bool:
    """`<runner>-<job id>`: a runner (`valid_runner`), a dash, 1-19 digits."""
    runner, dash, job_id = key.rpartition("-")
    return (
        bool(dash) and valid_runner(runner) and 1 <= len(job_id) <= ID_DIGITS_MAX and set(job_id) <= _DIGITS
    )


def read(environ: Mapping[str, str]) -> str | None:
    """The job key prepare recorded for this job; None when it recorded none (or not in this form)."""
    path = marker_path(environ)
    if path is None:
        return None
    try:
        with open(path, encoding="ascii") as f:
            key = f.read(64).strip()
    except (OSError, ValueError):
        return None
    return key if valid_key(key) else None


def write(environ: Mapping[str, str], key: str) -> str:
    """Record `key` for the job's later stages; never overwrites (O_EXCL). Returns the path. Raises OSError,
    FileExistsError when another key is already recorded there."""
    path = marker_path(environ)
    if path is None:
        raise FileNotFoundError(f"{RESPONSE_VARIABLE} is not an absolute path")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        if read(environ) == key:  # prepare run twice in one job directory (by hand): the same job
            return path
        raise
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(key + "\n")
    return path
