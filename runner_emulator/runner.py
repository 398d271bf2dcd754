"""Drive one job through a custom-executor driver exactly as GitLab Runner does (protocol §1-§8).

    emulator = RunnerEmulator(RunnerConfig.for_driver(["fargate-driver", "--config", toml]))
    result = emulator.run(JobSpec(script=["echo hi"]))
    result.status, result.failure_reason, result.exit_code, result.log

`cancel()` (from another thread) behaves like the job's Cancel button: during the user's script steps only the
running step is killed and after_script still runs; before that the whole build is stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from runner_emulator import shell
from runner_emulator.job import JobSpec, RunnerConfig, Variable
from runner_emulator.payload import job_payload, write_job_payload
from runner_emulator.process import TIMED_OUT, ExecResult, Failure, Interrupt, classify, run_exec

RUNNER_VERSION = "17.11.0-emulator"

SUCCESS = "success"
FAILED = "failed"
CANCELED = "canceled"
SCRIPT_FAILURE = "script_failure"
SYSTEM_FAILURE = "runner_system_failure"
JOB_TIMEOUT = "job_execution_timeout"

HEADINGS = {
    "prepare_script": "Preparing environment",
    "get_sources": "Getting source from Git repository",
    "restore_cache": "Restoring cache",
    "download_artifacts": "Downloading artifacts",
    "build_script": 'Executing "step_script" stage of the job script',
    "after_script": "Running after_script",
    "archive_cache": "Saving cache for successful job",
    "archive_cache_on_failure": "Saving cache for failed job",
    "upload_artifacts_on_success": "Uploading artifacts for successful job",
    "upload_artifacts_on_failure": "Uploading artifacts for failed job",
    "cleanup_file_variables": "Cleaning up project directory and file based variables",
}


@dataclass
class StageRun:
    stage: str
    failure: Failure | None


@dataclass
class JobResult:
    status: str  # success | failed | canceled
    failure_reason: str | None  # script_failure | runner_system_failure | job_execution_timeout
    exit_code: int | None  # the script's exit status for a script failure
    message: str  # what GitLab shows after "Job failed"
    log: str  # the job log
    runner_log: str  # what only the runner's own log sees (cleanup_exec output)
    stages: list[StageRun] = field(default_factory=list)
    prepare_attempts: int = 0

    def stage_names(self) -> list[str]:
        return [s.stage for s in self.stages]


class _Stop(Exception):
    """The build context ended (cancel before the user steps, or the job timeout)."""


class RunnerEmulator:
    def __init__(self, config: RunnerConfig, on_output: Callable[[str], None] | None = None) -> None:
        if not config.run_exec:
            raise ValueError("custom executor is missing RunExec")
        self.config = config
        self.on_output = on_output
        self._lock = threading.Lock()
        self._log: list[str] = []
        self._runner_log: list[str] = []
        self._build_ctx = Interrupt()
        self._script_ctx = Interrupt()
        self._in_user_steps = False
        self._canceled = False

    # --- public ---

    def cancel(self) -> None:
        """The Cancel button. Safe to call from any thread, at any time."""
        with self._lock:
            self._canceled = True
            target = self._script_ctx if self._in_user_steps else self._build_ctx
        target.set()

    @property
    def log_text(self) -> str:
        with self._lock:
            return "".join(self._log)

    def run(self, job: JobSpec) -> JobResult:
        """Run `job` to the end (one job per emulator) and return how it ended."""
        if hasattr(self, "_job"):
            raise RuntimeError("a RunnerEmulator runs one job; make a new one for the next")
        self._job = job
        self._started = time.monotonic()
        self._deadline = self._started + job.timeout
        self._stages: list[StageRun] = []
        self._attempts = 0
        self._job_timed_out = False
        self._say(f"Running with gitlab-runner {RUNNER_VERSION}")
        self._say(f"  on {self.config.hostname} {self.config.short_token}")
        self._say('Preparing the "custom" executor')
        temp_dir, failure = self._prepare_executor()
        if temp_dir is not None:
            try:
                failure = self._run_stages(temp_dir)
            finally:
                self._cleanup_exec(temp_dir)
        result = self._result(failure)
        self._say("Job succeeded" if result.status == SUCCESS else self._failure_line(result))
        result.log = self.log_text
        return result

    # --- output ---

    def _emit(self, text: str) -> None:
        if not text:
            return
        with self._lock:
            self._log.append(text)
        if self.on_output is not None:
            self.on_output(text)

    def _say(self, line: str) -> None:
        with self._lock:
            needs_newline = bool(self._log) and not self._log[-1].endswith("\n")
        self._emit(("\n" if needs_newline else "") + line + "\n")

    def _to_runner_log(self, text: str) -> None:
        with self._lock:
            self._runner_log.append(text)

    # --- environment (protocol §3) ---

    def _variables(self, builds_dir: str, project_dir: str, status: str) -> list[Variable]:
        job, cfg = self._job, self.config
        v = [Variable("CI_RUNNER_SHORT_TOKEN", cfg.short_token)]
        v += [Variable(k, val) for k, val in cfg.environment.items()]
        if job.image:
            v.append(Variable("CI_JOB_IMAGE", job.image))
        v += [
            Variable("CI_BUILDS_DIR", builds_dir),
            Variable("CI_PROJECT_DIR", project_dir),
            Variable("CI_CONCURRENT_ID", "0"),
            Variable("CI_CONCURRENT_PROJECT_ID", "0"),
            Variable("CI_SERVER", "yes"),
            Variable("CI_JOB_STATUS", status),
            Variable("CI_JOB_TIMEOUT", str(int(job.timeout))),
            Variable("CI_JOB_ID", str(job.job_id)),
            Variable("CI_JOB_NAME", job.name),
            Variable("CI_JOB_STAGE", job.stage),
            Variable("CI_JOB_TOKEN", job.token, public=False, masked=True),
            Variable("CI_JOB_URL", f"{cfg.server_url}/{job.project_path}/-/jobs/{job.job_id}"),
            Variable("CI_PROJECT_ID", str(job.project_id)),
            Variable("CI_PROJECT_NAME", job.project_name),
            Variable("CI_PROJECT_NAMESPACE", job.namespace),
            Variable("CI_PROJECT_PATH", job.project_path),
            Variable("CI_PROJECT_PATH_SLUG", job.project_path.lower().replace("/", "-")),
            Variable("CI_PROJECT_URL", f"{cfg.server_url}/{job.project_path}"),
            Variable("CI_PIPELINE_ID", str(job.pipeline_id)),
            Variable("CI_PIPELINE_IID", "1"),
            Variable("CI_COMMIT_SHA", "0" * 40),
            Variable("CI_COMMIT_REF_NAME", "main"),
            Variable("CI_SERVER_URL", cfg.server_url),
            Variable("CI_RUNNER_ID", "1"),
            Variable("CI_RUNNER_DESCRIPTION", cfg.hostname),
            Variable("CI_RUNNER_TAGS", '["fargate"]'),
            Variable("GITLAB_CI", "true"),
            Variable("CI", "true"),
        ]
        v += [Variable(k, val) for k, val in job.variables.items()]
        v += [Variable(k, val, file=True) for k, val in job.file_variables.items()]
        v += [
            Variable("CI_SHARED_ENVIRONMENT", "true"),
            Variable("CI_RUNNER_VERSION", RUNNER_VERSION),
            Variable("CI_RUNNER_REVISION", "emulator"),
            Variable("CI_RUNNER_EXECUTABLE_ARCH", "linux/amd64"),
            Variable("RUNNER_TEMP_PROJECT_DIR", f"{project_dir}.tmp" if project_dir else ""),
        ]
        return v

    def _env(self, temp_dir: str, variables: list[Variable], job_env: dict[str, str]) -> dict[str, str]:
        cfg = self.config
        env = dict(os.environ)
        env.update(cfg.process_env)
        env.update(
            TMPDIR=temp_dir,
            BUILD_FAILURE_EXIT_CODE=str(cfg.build_failure_exit_code),
            SYSTEM_FAILURE_EXIT_CODE=str(cfg.system_failure_exit_code),
            BUILD_EXIT_CODE_FILE=os.path.join(temp_dir, "build_exit_code"),
            JOB_RESPONSE_FILE=os.path.join(temp_dir, "response.json"),
        )
        env.update(job_env)
        for variable in variables:  # later wins, as with Go's exec
            env["CUSTOM_ENV_" + variable.key] = variable.value
        # Always present: empty without services, else a JSON array (gitlab-runner custom/custom.go).
        services = [
            {"name": s["name"], "alias": s.get("alias", ""), "entrypoint": s.get("entrypoint"),
             "command": s.get("command"), **({"variables": s["variables"]} if s.get("variables") else {})}
            for s in self._job.services
        ]  # fmt: skip
        env["CUSTOM_ENV_CI_JOB_SERVICES"] = json.dumps(services) if services else ""
        return env

    def _response(self) -> dict:
        """The job payload (protocol §3): the job's own ids, whatever its variables override."""
        return job_payload(self._job, self.config.server_url, self._variables("", "", "running"))

    # --- prepare_executor (build.go retryCreateExecutor, custom.go Prepare) ---

    def _prepare_executor(self) -> tuple[str | None, Failure | None]:
        cfg = self.config
        failure: Failure | None = None
        for attempt in range(1, max(1, cfg.preparation_retries) + 1):
            if self._build_ctx.is_set() or self._timed_out():
                break
            self._attempts = attempt
            temp_dir = tempfile.mkdtemp(prefix="custom-executor")
            write_job_payload(temp_dir, self._response())
            failure = self._create_executor(temp_dir)
            if failure is None:
                return temp_dir, None
            # The runner calls Cleanup even though prepare failed (custom.go / build.go).
            self._cleanup_exec(temp_dir)
            # An exec's own timeout is retried like any system failure; a cancel or the job timeout is not.
            if failure.build_error or self._build_ctx.is_set() or self._timed_out():
                break
            if attempt < cfg.preparation_retries:
                self._say(f"WARNING: Preparation failed: {failure.message}")
                self._say(f"Will be retried in {cfg.preparation_retry_delay:g}s ...")
                if self._wait(cfg.preparation_retry_delay):
                    break
            else:
                self._say(f"ERROR: Preparation failed: {failure.message}")
        return None, failure

    def _create_executor(self, temp_dir: str) -> Failure | None:
        cfg = self.config
        self._builds_dir, self._cache_dir, self._hostname = cfg.builds_dir, cfg.cache_dir, cfg.hostname
        self._project_dir = ""  # unknown until config_exec has answered (protocol §3)
        self._shared = False
        self._job_env: dict[str, str] = {}
        variables = self._variables("", "", "running")
        if cfg.config_exec:
            result = self._exec(
                cfg.config_exec,
                temp_dir,
                self._env(temp_dir, variables, {}),
                cfg.config_exec_timeout,
                capture=True,
            )
            failure = self._classify(result, temp_dir)
            if failure is not None:
                return failure
            text = result.stdout.decode("utf-8", "replace")
            try:
                output = json.loads(text) if text.strip() else {}
                if not isinstance(output, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                return Failure(f"error while parsing JSON output: {exc}")
            self._apply_config(output)
        if not self._builds_dir:
            return Failure("the builds_dir is not configured", build_error=True)
        if not self._cache_dir:
            return Failure("the cache_dir is not configured", build_error=True)
        self._set_dirs()
        if cfg.prepare_exec:
            result = self._exec(
                cfg.prepare_exec, temp_dir, self._stage_env(temp_dir, "running"), cfg.prepare_exec_timeout
            )
            return self._classify(result, temp_dir)
        return None

    def _apply_config(self, output: dict) -> None:
        driver = output.get("driver") or {}
        if driver.get("name"):
            self._say(f"Using Custom executor with driver {driver['name']} {driver.get('version', '')}...")
        else:
            self._say("Using Custom executor...")
        self._hostname = output.get("hostname") or self._hostname
        self._builds_dir = output.get("builds_dir") or self._builds_dir
        self._cache_dir = output.get("cache_dir") or self._cache_dir
        self._shared = bool(output.get("builds_dir_is_shared", False))
        self._job_env = {str(k): str(v) for k, v in (output.get("job_env") or {}).items()}

    def _set_dirs(self) -> None:
        job = self._job
        if self._shared:
            self._project_dir = f"{self._builds_dir}/{self.config.short_token}/0/{job.project_path}"
        else:
            self._project_dir = f"{self._builds_dir}/{job.project_path}"

    def _stage_env(self, temp_dir: str, status: str) -> dict[str, str]:
        variables = self._variables(self._builds_dir or "", self._project_dir, status)
        return self._env(temp_dir, variables, self._job_env)

    # --- the stages (build.go executeScript) ---

    def _run_stages(self, temp_dir: str) -> Failure | None:
        job = self._job
        try:
            failure = self._stage(temp_dir, "prepare_script", "running")
            if failure is not None:
                return failure  # prepare_script failure ends the job: only cleanup runs
            failure = self._get_sources(temp_dir)
            if failure is None and job.cache_paths:
                failure = self._stage(temp_dir, "restore_cache", "running")
            if failure is None and job.has_dependencies:
                failure = self._stage(temp_dir, "download_artifacts", "running")
            if failure is None:
                failure = self._user_steps(temp_dir)
            status = "success" if failure is None else "failed"
            if job.cache_paths:
                name = "archive_cache" if failure is None else "archive_cache_on_failure"
                failure = self._stage(temp_dir, name, status) or failure
            if job.artifact_paths:
                name = "upload_artifacts_on_success" if failure is None else "upload_artifacts_on_failure"
                failure = self._stage(temp_dir, name, status) or failure
            self._stage(temp_dir, "cleanup_file_variables", status)  # errors only logged
            return failure
        except _Stop as stop:
            return stop.args[0]

    def _get_sources(self, temp_dir: str) -> Failure | None:
        attempts = int(self._job.variables.get("GET_SOURCES_ATTEMPTS", "1") or 1)
        failure = None
        for attempt in range(1, max(1, min(10, attempts)) + 1):
            if attempt > 1:
                self._stage(temp_dir, "clear_worktree", "running")
            failure = self._stage(temp_dir, "get_sources", "running")
            if failure is None:
                return None
        return failure

    def _user_steps(self, temp_dir: str) -> Failure | None:
        job = self._job
        with self._lock:
            self._in_user_steps = True
        try:
            failure = self._stage(temp_dir, "build_script", "running", user=True)
            for name in job.extra_steps:
                if failure is not None:
                    break
                failure = self._stage(temp_dir, f"step_{name.lower()}", "running", user=True)
        finally:
            with self._lock:
                self._in_user_steps = False
        if self._timed_out():
            raise _Stop(failure)
        if job.after_script:
            status = CANCELED if self._canceled else ("success" if failure is None else "failed")
            after = self._stage(
                temp_dir, "after_script", status, deadline_cap=self.config.after_script_timeout
            )
            if after is not None:  # AFTER_SCRIPT_IGNORE_ERRORS defaults to true
                self._say(f"WARNING: after_script failed, but job will continue unaffected: {after.message}")
        return failure

    def _stage(
        self, temp_dir: str, stage: str, status: str, user: bool = False, deadline_cap: float | None = None
    ) -> Failure | None:
        if self._build_ctx.is_set() or self._timed_out():
            raise _Stop(Failure("stopped", stopped_by="canceled" if self._build_ctx.is_set() else TIMED_OUT))
        self._say(HEADINGS.get(stage, f'Executing "{stage}" stage of the job script'))
        script_dir = tempfile.mkdtemp(prefix="script", dir=temp_dir)
        path = os.path.join(script_dir, "script")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
        with os.fdopen(fd, "w") as f:
            f.write(shell.stage_script(self._body(stage, status)))
        exit_code_file = os.path.join(temp_dir, "build_exit_code")
        if os.path.exists(exit_code_file):
            os.unlink(exit_code_file)
        interrupts = (self._build_ctx, self._script_ctx) if user else (self._build_ctx,)
        deadline = (
            self._deadline if deadline_cap is None else min(self._deadline, time.monotonic() + deadline_cap)
        )
        result = run_exec(
            [*self.config.run_exec, path, stage],
            self._stage_env(temp_dir, status),
            temp_dir,
            deadline,
            self._emit,
            interrupts=interrupts,
            graceful_kill_timeout=self.config.graceful_kill_timeout,
            force_kill_timeout=self.config.force_kill_timeout,
        )
        failure = self._classify(result, temp_dir)
        self._stages.append(StageRun(stage, failure))
        if failure is not None and not user and (self._build_ctx.is_set() or self._timed_out()):
            raise _Stop(failure)
        if failure is not None and user and self._timed_out():
            raise _Stop(failure)
        return failure

    def _body(self, stage: str, status: str) -> list[str]:
        job = self._job
        project = self._project_dir
        if stage == "prepare_script":
            return [f'echo "Running on $(hostname) via {self._hostname}..."']
        lines = []
        tmp = f"{project}.tmp"
        for variable in self._variables(self._builds_dir, project, status):
            if variable.file:
                lines.append(f'mkdir -p "{tmp}"')
                lines.append(f"printf '%s' {shell.shell_escape(variable.value)} > \"{tmp}/{variable.key}\"")
                lines.append(f'export {variable.key}="{tmp}/{variable.key}"')
            else:
                lines.append(shell.export(variable.key, variable.value))
        if stage == "get_sources":
            lines += [
                shell.echo(f"Fetching changes into {project} (emulated: no git checkout)"),
                f'mkdir -p "{project}"',
            ]
        elif stage == "clear_worktree":
            lines.append(f'rm -rf "{project}"')
        elif stage == "build_script":
            lines += [f'cd "{project}"', *shell.command_lines(job.script)]
        elif stage.startswith("step_"):
            lines += [f'cd "{project}"', *shell.command_lines(job.extra_steps.get(stage[5:], []))]
        elif stage == "after_script":
            lines += [
                f'cd "{project}"',
                shell.echo("Running after script..."),
                *shell.command_lines(job.after_script),
            ]
        elif stage == "cleanup_file_variables":
            lines.append(f'rm -rf "{tmp}"')
        else:  # cache and artifact stages need the gitlab-runner helper binary in the task
            lines.append(shell.echo(f"{stage}: emulated (the runner would call gitlab-runner here)"))
        return lines

    # --- cleanup_exec: background context, never cancelled, output only in the runner's log ---

    def _cleanup_exec(self, temp_dir: str) -> None:
        cfg = self.config
        try:
            if cfg.cleanup_exec:
                env = self._stage_env(temp_dir, "running")
                result = run_exec(
                    cfg.cleanup_exec,
                    env,
                    temp_dir,
                    time.monotonic() + cfg.cleanup_exec_timeout,
                    self._to_runner_log,
                    graceful_kill_timeout=cfg.graceful_kill_timeout,
                    force_kill_timeout=cfg.force_kill_timeout,
                )
                if result.returncode != 0:
                    self._to_runner_log(f"WARNING: Cleanup script failed: exit status {result.returncode}\n")
        finally:
            shutil.rmtree(temp_dir, ignore_errors=True)

    # --- helpers ---

    def _exec(
        self, argv: list[str], temp_dir: str, env: dict[str, str], timeout: float, capture: bool = False
    ) -> ExecResult:
        return run_exec(
            argv,
            env,
            temp_dir,
            min(self._deadline, time.monotonic() + timeout),
            self._emit,
            interrupts=(self._build_ctx,),
            graceful_kill_timeout=self.config.graceful_kill_timeout,
            force_kill_timeout=self.config.force_kill_timeout,
            capture_stdout=capture,
        )

    def _classify(self, result: ExecResult, temp_dir: str) -> Failure | None:
        if result.stopped_by == TIMED_OUT:
            self._timed_out()
        return classify(
            result,
            self.config.build_failure_exit_code,
            self.config.system_failure_exit_code,
            os.path.join(temp_dir, "build_exit_code"),
        )

    def _timed_out(self) -> bool:
        if time.monotonic() >= self._deadline:
            self._job_timed_out = True
        return self._job_timed_out

    def _wait(self, seconds: float) -> bool:
        """Sleep, unless the build is cancelled meanwhile (returns True then)."""
        wake = threading.Event()
        self._build_ctx.watch(wake)
        try:
            wake.wait(max(0.0, min(seconds, self._deadline - time.monotonic())))
        finally:
            self._build_ctx.unwatch(wake)
        return self._build_ctx.is_set() or self._timed_out()

    def _result(self, failure: Failure | None) -> JobResult:
        common = {
            "log": "",
            "runner_log": "".join(self._runner_log),
            "stages": self._stages,
            "prepare_attempts": self._attempts,
        }
        if self._canceled:
            return JobResult(CANCELED, None, None, "canceled", **common)
        if self._job_timed_out:
            message = f"execution took longer than {self._job.timeout:g} seconds"
            return JobResult(FAILED, JOB_TIMEOUT, None, message, **common)
        if failure is None:
            return JobResult(SUCCESS, None, None, "", **common)
        if failure.build_error:
            return JobResult(FAILED, SCRIPT_FAILURE, failure.exit_code, failure.message, **common)
        return JobResult(FAILED, SYSTEM_FAILURE, None, failure.message, **common)

    @staticmethod
    def _failure_line(result: JobResult) -> str:
        if result.failure_reason == SYSTEM_FAILURE:
            return f"ERROR: Job failed (system failure): {result.message}"
        return f"ERROR: Job failed: {result.message}"
