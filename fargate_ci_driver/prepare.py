"""`prepare`: ask the orchestrator for the job's task, wait until it runs and its sshd answers with the
pinned host key. On any failure the task is stopped before the driver exits, and AWS's reasons are shown.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from fargate_ci_driver import job_marker
from fargate_ci_driver.api import ApiClient, with_retries
from fargate_ci_driver.backoff import READINESS, Readiness
from fargate_ci_driver.context import StageContext
from fargate_ci_driver.errors import (
    ApiError,
    Cancelled,
    DriverError,
    HostKeyMismatch,
    JobInputError,
    SshError,
    SshUnavailable,
    StateError,
    TaskError,
    attempt_over,
)
from fargate_ci_driver.job import (
    JOB_VARIABLE_FIELDS,
    SERVICE_VALUE_MAX,
    SERVICE_VARIABLES_MAX,
    Job,
    TaskRequest,
    create_body,
    identity_warnings,
    job_from_payload,
    job_images,
    read_job_payload,
    task_request,
    with_job_variables,
)
from fargate_ci_driver.keys import KeyPair, generate_ed25519
from fargate_ci_driver.logs import fields, log
from fargate_ci_driver.metadata import JobState
from fargate_ci_driver.report import ENDING_STATES, stop_summary, task_gone

# While an earlier attempt is being stopped, look at it this often.
POLL_SECONDS = 1.0
# Authentication failures are retried briefly: the task writes the CA keys its sshd trusts right after the
# orchestrator has answered its publish, so a login that follows the published key within milliseconds can
# be refused once. The first refusal is retried after a short pause, later ones after the usual back-off.
SSH_AUTH_RETRIES = 5
FIRST_AUTH_RETRY_SECONDS = 0.05
SSH_CONNECT_TIMEOUT = 10.0
STOP_ATTEMPTS = 3
STOP_TIMEOUT = 5.0
# The job log: the task's start is one collapsible section, with a line at least this often while it waits
# (issue 17 asks for one every 15 s at most; the ticker looks every second).
JOB_LOG_SECTION = "fargate_task"
PROGRESS_EVERY = 10.0
# What a task in each ECS status is waiting for (ECS's task lifecycle), for the keep-alive line.
WAITING_FOR = {
    "PROVISIONING": "Fargate is finding capacity and attaching the network interface",
    "PENDING": "pulling the image and starting the container",
    "ACTIVATING": "the container is starting",
    "RUNNING": "waiting for the task's sshd",
}


class Prepare:
    def __init__(
        self,
        ctx: StageContext,
        sleep: Callable[[float], None] = time.sleep,
        policy: Readiness = READINESS,
    ) -> None:
        self.ctx = ctx
        self.transport = ctx.transport
        self.policy = policy
        self.out = ctx.job_log
        self.sleep = sleep
        self.started = time.monotonic()
        self.deadline = self.started + ctx.settings.prepare_timeout
        self.api: ApiClient = ctx.api()
        self.job: Job | None = None
        self.state: JobState | None = None
        self.last_view: dict = {}
        self._seen: tuple | None = None
        self.task_may_exist = False
        self.client_key: KeyPair | None = None
        self.failed_over = False
        self.certificate = ""  # the client key's certificate for the job's task, once issued

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def run(self) -> None:
        settings = self.ctx.settings
        for note in settings.notes:
            self.ctx.stderr.write(note + "\n")
        self.ctx.stderr.flush()
        payload = read_job_payload(self.ctx.environ)
        job = self.job = job_from_payload(payload, settings)
        for line in identity_warnings(job, self.ctx.environ, settings):
            self.out.warning(line)
        request = task_request(
            self.ctx.environ, settings, self.ctx.task_def_flag, self.ctx.platform_version_flag
        )
        image, services = job_images(self.ctx.environ, payload)
        if services:
            services, dropped = with_job_variables(services, payload)
            if dropped:
                self.out.warning(
                    f"job variables not given to the services (more than {SERVICE_VARIABLES_MAX}, "
                    f"or longer than {SERVICE_VALUE_MAX} characters): {', '.join(dropped)}"
                )
        request = dataclasses.replace(request, image=image, services=services)
        try:
            self._prepare(job, request)
        except Cancelled as exc:
            self.out.close_section()
            self._give_up(f"cancelled by the runner during prepare: {exc}", cancelled=True)
            raise
        except DriverError as exc:
            self.out.close_section()
            self._give_up(f"prepare failed: {exc}")
            raise

    def _prepare(self, job: Job, request: TaskRequest) -> None:
        settings = self.ctx.settings
        client_key = self.client_key = generate_ed25519(f"fargate-ci-{job.key}")
        store = self.ctx.metadata
        store.ensure()
        # The host key is the task's own: it is pinned once the task has published it (the job view).
        state = JobState(
            job_key=job.key, ssh_port=settings.ssh_port, ssh_user=settings.ssh_user, host_public_key=""
        )
        # On disk before the request leaves: a SIGTERM or crash from here on still lets cleanup stop the task.
        # Created exclusively: another job's files are never overwritten (StateExists, and we stop here).
        store.claim(state, client_key.private_pem)
        self.state = state
        try:
            job_marker.write(self.ctx.environ, job.key)
        except OSError as exc:
            raise StateError(
                f"cannot record the job key for the job's later stages in "
                f"{job_marker.marker_path(self.ctx.environ)}: {exc.strerror or exc}"
            ) from None
        self.task_may_exist = True
        self.transport.job_starting(job.key)

        wanted = ", ".join(
            f"{k} {v}"
            for k, v in (
                ("task definition", request.task_definition),
                ("cpu", request.cpu),
                ("memory", request.memory),
                ("platform", request.platform_version),
                ("image", (request.image or {}).get("name")),
                ("services", ", ".join(s.get("name", "?") for s in request.services or [])),
            )
            if v
        )
        # The task's start, collapsed in GitLab's job log (its header and duration show); a line at least
        # every PROGRESS_EVERY seconds while it waits, and failures close it first so their reasons show.
        self.out.open_section(JOB_LOG_SECTION, f"Starting a Fargate task for job {job.key}")
        self.out.say(f"Requesting a Fargate task for job {job.key}" + (f" ({wanted})" if wanted else ""))
        body = create_body(job, request, client_key.public_line)
        with self.out.keep_alive(self._progress, every=PROGRESS_EVERY):
            view = self._create(body)
            self._record(view)
            try:
                self._wait_ready(view)
            except TaskError:
                if not self._may_fail_over():
                    raise
                self._wait_ready(self._fail_over(job, request))
        ready = self.elapsed()
        self.out.close_section()
        self.out.say(f"SSH ready after {ready:.1f}s")
        log.info("prepared", extra=fields(job_key=job.key, task_arn=self.state.task_arn))
        self.transport.report_ready(self.state, ready)
        self.transport.job_ready(job.key)

    # --- a warm task lost before the job connected ---

    def _may_fail_over(self) -> bool:
        """Once per prepare, for a warm task (a cold one failing is AWS's answer, shown as it is)."""
        return bool(self.last_view.get("warm")) and not self.failed_over and time.monotonic() < self.deadline

    def _fail_over(self, job: Job, request: TaskRequest) -> dict:
        """The claimed warm task stopped before the job connected: end that attempt and ask again with a
        fresh client key (a new attempt: another warm task, or a cold start), within PrepareTimeout."""
        self.failed_over = True
        self.out.say("The warm task stopped before the job could connect: asking for another task")
        try:
            self.api.stop_job(job.key, "warm task lost before the job connected", attempt=self.state.attempt)
        except ApiError as exc:
            if exc.status != 404 and not attempt_over(exc):
                raise
        client_key = self.client_key = generate_ed25519(f"fargate-ci-{job.key}")
        self.certificate = ""
        self.state.host_public_key = ""
        self.state.address = None
        self.ctx.metadata.save_client_key(job.key, client_key.private_pem)
        self.ctx.metadata.save(self.state)
        self._seen = None
        view = self._create(create_body(job, request, client_key.public_line))
        self._record(view)
        return view

    # --- POST /jobs ---

    def _create(self, body: dict) -> dict:
        def announce(exc: ApiError, delay: float) -> None:
            what = "did not answer" if exc.status == 0 else "is busy"
            self.out.warning(f"The orchestrator {what} ({exc}); retrying in {delay:.1f}s")

        for _ in range(3):
            try:
                return with_retries(
                    lambda: self.api.create_job(body),
                    attempts=8,
                    deadline=self.deadline,
                    sleep=self.sleep,
                    on_retry=announce,
                )
            except ApiError as exc:
                if exc.status == 409 and self._previous_attempt_ended():
                    continue
                self._explain_create_failure(exc)
                raise
        raise TaskError(f"job {self.job.key}: an earlier attempt is still live")

    def _explain_create_failure(self, exc: ApiError) -> None:
        if exc.status in (400, 403, 404, 409, 502):
            # Definitely no task of ours: nothing for cleanup to stop. The files are ours (claimed above).
            self.task_may_exist = False
            self.ctx.metadata.remove(self.job.key)
        if exc.status == 502:
            self.out.close_section()
            self.out.error(f"AWS did not start the task: {exc.message}")
        if exc.status == 400 and exc.field in JOB_VARIABLE_FIELDS:
            raise JobInputError(
                f"the orchestrator refused {exc.field} (job variable {JOB_VARIABLE_FIELDS[exc.field]}): "
                f"{exc.message}"
            ) from exc

    def _previous_attempt_ended(self) -> bool:
        """409: the job is live with other parameters, i.e. an attempt this prepare did not start (its keys
        are not ours). prepare stops only an attempt its own state holds, and ours holds none yet. One that is
        already being stopped (the runner's cleanup of a failed prepare) we wait for, and then ask again (the
        API starts a new attempt); one still running we leave alone and fail. False when we give up."""
        key = self.job.key
        try:
            view = self.api.get_job(key)
            if view.get("state") not in ENDING_STATES:
                self.out.warning(
                    f"Job {key} already has a live attempt {view.get('attempt')} ({view.get('state')}) that "
                    "this prepare did not start: not stopping it (the orchestrator's reaper ends it once its "
                    "heartbeats stop)"
                )
                return False
            self.out.say(f"An earlier attempt of job {key} is {view.get('state')}; waiting for it to end")
            while view.get("state") not in ("STOPPED", "FAILED"):
                if time.monotonic() + POLL_SECONDS > self.deadline:
                    return False
                self.sleep(POLL_SECONDS)
                view = self.api.get_job(key)
        except ApiError as exc:
            log.warning("cannot settle the previous attempt", extra=fields(job_key=key, error=str(exc)))
            return False
        return True

    def _record(self, view: dict) -> None:
        self.last_view = view
        arn = view.get("task_arn")
        attempt = view.get("attempt")
        changed = (arn, attempt) != (self.state.task_arn, self.state.attempt)
        if arn and arn != self.state.task_arn:
            suffix = f" (attempt {attempt})" if attempt and attempt > 1 else ""
            if view.get("warm"):
                self.out.say(f"Warm task claimed: {arn}{suffix}")
            else:
                self.out.say(f"Task requested: {arn}{suffix} (cold start)")
            if view.get("capacity_note"):  # e.g. Fargate Spot had no capacity: the task runs on FARGATE
                self.out.say(view["capacity_note"])
            for note in view.get("service_notes") or []:  # a service whose port the job cannot wait for
                self.out.warning(str(note))
        self.state.task_arn = arn or self.state.task_arn
        self.state.attempt = attempt or self.state.attempt
        if changed:
            self.ctx.metadata.save(self.state)
        certificate = view.get("ssh_certificate") or ""
        if certificate and certificate != self.certificate and self.client_key is not None:
            self.ctx.metadata.save_client_key(self.job.key, self.client_key.private_pem, certificate)
            self.certificate = certificate

    # --- waiting: one loop for the task's state and its sshd ---

    def _wait_ready(self, view: dict) -> None:
        """Until the task's sshd takes our key with the pinned host key. Each pause is spent in the
        transport's SSH check once the task's address is known (the agent's check tries sshd every 20 ms
        even while the task is PENDING, so prepare learns within milliseconds that sshd is up); the policy
        (`backoff`) says how long the pauses are and when to look at the API again."""
        running = self._observe(view, None)
        pauses = self.policy.pauses(running)
        last_look = time.monotonic()
        auth_failures = 0
        while True:
            delay = next(pauses)
            problem: SshError | None = None
            if self.state.address and self.state.host_public_key and self.certificate:
                start = time.monotonic()
                timeout = max(1.0, min(SSH_CONNECT_TIMEOUT, self.deadline - start))
                try:
                    if self.transport.check_ssh(self.state, timeout, wait=delay, task_running=running):
                        return
                except HostKeyMismatch:
                    raise
                except SshUnavailable as exc:  # not listening yet
                    problem = exc
                except SshError as exc:  # not taking our key yet (only counted once the task runs)
                    auth_failures += 1 if running else 0
                    if auth_failures >= SSH_AUTH_RETRIES:
                        raise
                    problem = exc
                    if auth_failures == 1:
                        delay = min(delay, FIRST_AUTH_RETRY_SECONDS)
                if problem is not None:
                    log.debug("sshd not ready yet", extra=fields(error=str(problem)))
                delay -= time.monotonic() - start
            if time.monotonic() + max(0.0, delay) > self.deadline:
                self._time_out(view, running, problem)
            self.sleep(max(0.0, delay))
            # Until the task has published its host key (and our key is certified), every pause ends with
            # a look at the API: nothing else can make progress.
            keys_pending = not (self.state.host_public_key and self.certificate)
            if keys_pending or self.policy.look_at_api(running, time.monotonic() - last_look):
                last_look = time.monotonic()
                view = self._get_tolerant() or view
                self._record(view)
                seen = self._seen
                if self._observe(view, running) and not running:
                    running, pauses = True, self.policy.pauses(True)
                elif not running and self._seen != seen:
                    pauses = self.policy.pauses(False, moved=True)

    def _observe(self, view: dict, running: bool | None) -> bool:
        """Say what changed, fail if the task is gone, record its address; whether it runs (with an address).
        `running`: what the loop knew before (None at the start)."""
        status = (view.get("state"), view.get("last_status"))
        if status != self._seen:
            self._seen = status
            detail = f" ({status[1]})" if status[1] and status[1] != status[0] else ""
            self.out.say(f"Task {status[0]}{detail} after {self.elapsed():.1f}s")
        if task_gone(view):
            what = "while sshd was starting" if running else "before the job could start"
            raise TaskError(self._stopped_text(view, f"the task stopped {what}"))
        published = view.get("host_key")
        if published and published != self.state.host_public_key:
            if self.state.host_public_key:
                # The orchestrator binds the first key a task publishes; another one is never trusted.
                raise HostKeyMismatch(
                    f"the task's published host key changed from {self.state.host_public_key}: refusing"
                )
            self.state.host_public_key = published
            self.ctx.metadata.save(self.state)
            self.out.say(f"Task host key: {published}")
        if view.get("address") and view["address"] != self.state.address:
            self.state.address = view["address"]
            self.ctx.metadata.save(self.state)
            self.out.say(f"Task address: {view['address']}:{self.ctx.settings.ssh_port}")
        # Ready for SSH once it runs and has published its host key: until then the API is polled at its own
        # quick pace (the key is published while the task boots, before its sshd listens).
        return view.get("state") == "RUNNING" and bool(view.get("address")) and bool(view.get("host_key"))

    def _time_out(self, view: dict, running: bool, problem: SshError | None) -> None:
        s = self.ctx.settings
        if not running and view.get("state") == "RUNNING":
            raise TaskError(
                f"the task did not publish its host key within {s.prepare_timeout:g}s ([Job] "
                "PrepareTimeout): see its log's `entrypoint:` lines (FARGATE_CI_API_URL, the task role, "
                "the route to the API)"
            )
        if not running:
            raise TaskError(
                f"the task is not running after {s.prepare_timeout:g}s ([Job] PrepareTimeout); "
                f"last state {view.get('state')}"
            )
        raise SshError(
            f"sshd on {self.state.address}:{s.ssh_port} did not answer within {s.prepare_timeout:g}s "
            f"([Job] PrepareTimeout): {problem}"
        )

    def _progress(self) -> str:
        """The keep-alive line: how long prepare has waited, and for what."""
        state, last_status = self._seen or (None, None)
        doing = WAITING_FOR.get(last_status or state or "", "waiting for the orchestrator")
        shown = f"task {state}" + (f" ({last_status})" if last_status and last_status != state else "")
        return f"Still starting after {self.elapsed():.0f}s: {shown if state else 'no task yet'}, {doing}"

    def _get_tolerant(self) -> dict | None:
        """One GET; a passing API hiccup costs a poll, not the job."""
        try:
            return self.api.get_job(self.job.key)
        except ApiError as exc:
            if not exc.retryable:
                raise
            log.warning(
                "job poll failed; will poll again", extra=fields(job_key=self.job.key, error=str(exc))
            )
            return None

    # --- failure ---

    def _stopped_text(self, view: dict, headline: str) -> str:
        """Print AWS's reasons in the job log (outside the collapsed section); the error line stays short."""
        self.out.close_section()
        for line in stop_summary(view):
            self.out.say(f"  {line}")
        return f"{headline} ({view.get('stop_code') or view.get('state')})"

    def _give_up(self, reason: str, cancelled: bool = False) -> None:
        """Make sure no task outlives a failed prepare. Never raises: the original error is what matters."""
        if not self.task_may_exist or self.job is None or self.state is None:
            return
        attempt = self.state.attempt
        if not attempt:
            # The POST's answer never came: cleanup (which the runner runs next) asks the orchestrator for an
            # attempt started with this job's key and stops it.
            self.out.say("No task attempt on record yet; cleanup looks for one started with this job's key")
            return
        if cancelled:
            self.out.say("Cancelled: stopping the task")
        stopper = self.ctx.api(timeout=STOP_TIMEOUT)
        attempt = (self.state.attempt if self.state is not None else None) or 1
        try:
            view = with_retries(
                lambda: stopper.stop_job(self.job.key, reason[:250], attempt=attempt),
                attempts=STOP_ATTEMPTS,
                base_delay=0.5,
                max_delay=2.0,
                sleep=self.sleep,
            )
        except ApiError as exc:
            if exc.status == 404 or attempt_over(exc):
                return
            self.out.warning(f"Could not stop the task ({exc}); cleanup will try again, then the reaper")
            return
        except Cancelled:  # a second signal is ignored by the handler; this is belt and braces
            return
        arn = view.get("task_arn") or self.state.task_arn
        if arn and not task_gone(self.last_view):  # nothing to announce for a task that had already ended
            self.out.say(f"Stopped task {arn} ({view.get('state')})")


def prepare(ctx: StageContext) -> None:
    Prepare(ctx).run()
