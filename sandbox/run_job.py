"""`python -m sandbox run-job FILE --dir DIR` and `python -m sandbox demo --dir DIR`.

run-job drives one job of a .gitlab-ci.yml-style file through the runner emulator and the real
`fargate-driver` (with DIR/fargate.toml) against the sandbox running in DIR, printing the job log as GitLab
shows it. demo starts a sandbox, runs examples/demo-job.yml and examples/demo-images.json (a job with
`image:` and `services:`), and stops the sandbox again, even on failure.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_JOB = REPO_ROOT / "examples" / "demo-job.yml"
DEMO_IMAGES_JOB = REPO_ROOT / "examples" / "demo-images.json"  # a job with `image:` and `services:`
DEMO_PROVISION_DELAY = "3"
# The demo's second service: an image that EXPOSEs its port and takes 2 s to open it, pushed into the
# sandbox's registry before the jobs run. The job names no HEALTHCHECK_TCP_PORT for it: the orchestrator reads
# the port from the image, and the job waits for it (GitLab's wait-for-service).
DEMO_SERVICE_IMAGE = (
    "sandbox/slow-web:1",
    "busybox",
    {
        "ExposedPorts": {"18081/tcp": {}},
        "Entrypoint": ["sh", "-c"],
        "Cmd": [
            "sleep 2; mkdir -p /www && echo 'hello from a service that took 2 s to start' > /www/index.html"
            " && exec httpd -f -p 127.0.0.1:18081 -h /www"
        ],
    },
)


def driver_command(toml_path: str) -> list[str]:
    """The installed console script, as GitLab Runner's config.toml would name it."""
    beside_python = Path(sys.executable).parent / "fargate-driver"
    driver = str(beside_python) if beside_python.exists() else shutil.which("fargate-driver")
    if driver is None:
        return [sys.executable, "-m", "fargate_ci_driver", "--config", toml_path]
    return [driver, "--config", toml_path]


def run_job_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sandbox run-job", description="Run a .gitlab-ci.yml job through fargate-driver."
    )
    parser.add_argument("file", help="a .gitlab-ci.yml-style file (or JSON) with the job")
    parser.add_argument("--dir", required=True, help="the running sandbox's directory")
    parser.add_argument("--job", help="which job, when the file has several")
    parser.add_argument("--prepare-retry-delay", type=float, default=3.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    from runner_emulator import SUCCESS, RunnerConfig, RunnerEmulator
    from runner_emulator.gitlab_ci import PipelineError, load_job
    from sandbox import control
    from sandbox.errors import SandboxError

    try:
        name, job = load_job(args.file, args.job)
    except OSError as exc:
        print(f"run-job: {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except (PipelineError, ValueError) as exc:
        print(f"run-job: {args.file}: {exc}", file=sys.stderr)
        return 1
    try:
        state = control.load_state(args.dir)
    except SandboxError as exc:
        print(f"run-job: {exc}", file=sys.stderr)
        return 1

    config = RunnerConfig.for_driver(
        driver_command(state["toml_path"]),
        hostname="sandbox-runner",
        preparation_retry_delay=args.prepare_retry_delay,
    )

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    print(f"Running job {name!r} from {args.file}")
    emulator = RunnerEmulator(config, on_output=show)
    try:
        result = emulator.run(job)
    except KeyboardInterrupt:
        # The emulator already stopped what it started; say so plainly.
        print("\nrun-job: interrupted", file=sys.stderr)
        return 1
    return 0 if result.status == SUCCESS else 1


def demo_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sandbox demo", description="Start a sandbox, run the demo job in it, stop it."
    )
    parser.add_argument(
        "--dir", default=".sandbox/demo", help="the sandbox's directory (default .sandbox/demo)"
    )
    parser.add_argument("--job-file", action="append", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    sandbox = [sys.executable, "-m", "sandbox"]
    print(
        f"Starting the sandbox in {args.dir} (moto, the orchestrator API, emulated Fargate) ...", flush=True
    )
    started = subprocess.run(
        [*sandbox, "start", "--dir", args.dir, "--provision-delay", DEMO_PROVISION_DELAY],
        cwd=REPO_ROOT,
        check=False,
    )
    if started.returncode != 0:
        # `start` cleans up after itself; a sandbox already running in DIR is someone's, leave it be.
        print("demo: the sandbox did not start (see the message above)", file=sys.stderr)
        return 1
    try:
        from sandbox import control

        control.derive_image(args.dir, *DEMO_SERVICE_IMAGE)
        status = 0
        for job_file in args.job_file or [str(DEMO_JOB), str(DEMO_IMAGES_JOB)]:
            print(flush=True)
            status |= run_job_main([job_file, "--dir", args.dir])
        return status
    finally:
        print(f"\nStopping the sandbox in {args.dir} ...", flush=True)
        subprocess.run([*sandbox, "stop", "--dir", args.dir], cwd=REPO_ROOT, check=False)
