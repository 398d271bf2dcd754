"""`cleanup`: stop the job's task through the API and delete the local state and keys.

Never hangs and never leaves keys behind: the API gets a few bounded tries; if it stays unreachable the
orchestrator's reaper stops the task at its deadline. With nothing recorded (prepare never ran, or failed
before a task could exist) there is nothing to do. When prepare's request had no answer, the orchestrator is
asked whether it started an attempt with this job's client key, and that one is stopped. The job is the one
prepare recorded in the runner's per-job directory (never a job variable), and the DELETE names the attempt
its state holds: a newer attempt is not ours to stop (409 AttemptMismatch).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fargate_ci_driver.api import with_retries
from fargate_ci_driver.attempts import own_attempt
from fargate_ci_driver.context import StageContext
from fargate_ci_driver.errors import ApiError, Cancelled, DriverError, StateError, attempt_over
from fargate_ci_driver.keys import public_line_of
from fargate_ci_driver.logs import fields, log

STOP_ATTEMPTS = 3
STOP_TIMEOUT = 10.0
# The whole stop, retries included; the runner's cleanup_exec_timeout is an hour, we need seconds.
STOP_BUDGET = 30.0
REASON = "job finished: cleanup by GitLab Runner"


def _attempt_started_here(ctx: StageContext, key: str, sleep: Callable[[float], None]) -> int | None:
    """prepare's POST had no answer, yet it may have started a task: the attempt whose certificate certifies
    this job's client key is the one it started (attempts.py). None when the orchestrator shows none."""
    try:
        public_line = public_line_of(ctx.metadata.load_client_key(key))
        api = ctx.api(timeout=STOP_TIMEOUT)
        view = with_retries(
            lambda: api.get_job(key),
            attempts=STOP_ATTEMPTS,
            base_delay=0.5,
            max_delay=5.0,
            deadline=time.monotonic() + STOP_BUDGET,
            sleep=sleep,
        )
    except (ApiError, StateError, ValueError) as exc:
        log.info("no attempt to recover", extra=fields(job_key=key, error=str(exc)))
        return None
    attempt = own_attempt(view, public_line)
    if attempt is not None:
        ctx.job_log.say(
            f"prepare had no answer from the orchestrator, but it started attempt {attempt} of job {key} "
            "with this job's key: stopping it"
        )
    return attempt


def cleanup(ctx: StageContext, sleep: Callable[[float], None] = time.sleep) -> None:
    out = ctx.job_log
    key = ctx.recorded_job_key()
    if key is None:
        out.say("Nothing to clean up: prepare recorded no job here (it did not run, or failed before a task)")
        return
    store = ctx.metadata
    state = store.load(key)
    if state is None:
        leftover = store.remove(key)  # a key without state: prepare died between the two writes
        note = " (removed a stray key)" if leftover else ""
        out.say(f"Nothing to clean up for job {key}: no task was started{note}")
        return
    ctx.transport.job_done(key)
    attempt = state.attempt or _attempt_started_here(ctx, key, sleep)
    if not attempt:
        removed = store.remove(key)
        log.info("local state removed", extra=fields(job_key=key, files=len(removed)))
        out.say(
            f"Job {key} has no task attempt on record (the orchestrator never answered prepare) and none "
            "started with this job's key: nothing to stop; the orchestrator's reaper stops any it started"
        )
        return
    failure: DriverError | None = None
    try:
        api = ctx.api(timeout=STOP_TIMEOUT)
        view = with_retries(
            lambda: api.stop_job(key, REASON, attempt=attempt),
            attempts=STOP_ATTEMPTS,
            base_delay=0.5,
            max_delay=5.0,
            deadline=time.monotonic() + STOP_BUDGET,
            sleep=sleep,
        )
        arn = view.get("task_arn") or state.task_arn or "(no task)"
        out.say(f"Stopped task {arn} of job {key}: {view.get('state')}")
    except ApiError as exc:
        if exc.status == 404:
            out.say(f"Job {key} is unknown to the orchestrator: nothing to stop")
        elif attempt_over(exc):
            out.say(
                f"Attempt {attempt} of job {key} is already over and a newer one exists, not ours to "
                "stop: nothing stopped"
            )
        else:
            failure = exc
            out.say(f"Could not stop the task of job {key} ({exc}); the orchestrator's reaper will stop it")
    except Cancelled as exc:
        failure = exc
    finally:
        removed = store.remove(key)
        log.info("local state removed", extra=fields(job_key=key, files=len(removed)))
    if failure is not None:
        raise failure
