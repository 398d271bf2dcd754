"""`python -m sandbox start|stop|status|fault|run-job|demo`: the AWS side of fargate-ci on this machine."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sandbox.errors import SandboxError, UsageError
from sandbox.faults import KINDS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sandbox", description="Run fargate-ci's AWS side (moto, the API, Fargate) locally."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    start = commands.add_parser("start", help="start a sandbox in the background")
    start.add_argument("--dir", required=True, help="the sandbox's directory (created if missing)")
    start.add_argument(
        "--provision-delay",
        type=float,
        default=0.5,
        metavar="SECONDS",
        help="RunTask to RUNNING (default 0.5)",
    )
    start.add_argument(
        "--schedule-rate",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how often the reaper runs (default 60)",
    )
    start.add_argument("--ssh-port", type=int, default=2222, help="the tasks' sshd port (default 2222)")
    start.add_argument(
        "--app-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an extra orchestrator setting for the app (repeatable)",
    )
    start.add_argument(
        "--task-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an extra variable in every task definition's environment, e.g. WATCHDOG_IDLE_SECONDS=5 "
        "(repeatable)",
    )
    start.add_argument("--app-dir", type=Path, default=None, help=argparse.SUPPRESS)

    stop = commands.add_parser("stop", help="stop the sandbox and everything it started")
    stop.add_argument("--dir", required=True)

    status = commands.add_parser("status", help="print the running sandbox's sandbox.json")
    status.add_argument("--dir", required=True)

    fault = commands.add_parser("fault", help="arm a fault for the task of a GitLab job")
    fault.add_argument("--dir", required=True)
    fault.add_argument("--job-id", help="the GitLab job id, or '*' for every later task")
    fault.add_argument("kind", nargs="?", choices=sorted(KINDS))
    fault.add_argument("--clear", action="store_true", help="disarm every fault (nothing else)")
    fault.add_argument("--seconds", type=float, help="slow-provisioning, sshd-delay")
    fault.add_argument("--after", type=float, help="exit, spot: seconds after RUNNING")
    fault.add_argument("--code", type=int, help="exit: the container's exit code")
    fault.add_argument("--notice", type=float, help="spot: seconds between the notice and STOPPED")
    fault.add_argument(
        "--versionless",
        action="store_true",
        default=None,
        help="spot: the notice event without detail.version (as AWS's example), delivered again late",
    )
    fault.add_argument("--drop", help="events: task statuses whose events are lost, e.g. RUNNING,STOPPED")
    fault.add_argument("--duplicate", action="store_true", default=None, help="events: deliver each twice")
    fault.add_argument(
        "--reorder", action="store_true", default=None, help="events: swap neighbouring events"
    )

    commands.add_parser("run-job", help="run a .gitlab-ci.yml job through the driver (see run-job --help)")
    commands.add_parser("demo", help="start a sandbox and run a demo job (see demo --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The driver engineer's subcommands parse their own arguments.
    if argv and argv[0] == "run-job":
        from sandbox.run_job import run_job_main

        return run_job_main(argv[1:])
    if argv and argv[0] == "demo":
        from sandbox.run_job import demo_main

        return demo_main(argv[1:])

    args = _parser().parse_args(argv)
    from sandbox import control

    try:
        if args.command == "start":
            options = control.StartOptions(
                provision_delay=args.provision_delay,
                schedule_rate=args.schedule_rate,
                ssh_port=args.ssh_port,
                app_env=tuple(args.app_env),
                task_env=tuple(args.task_env),
                **({"app_dir": args.app_dir.resolve()} if args.app_dir else {}),
            )
            state = control.start(args.dir, options)
            print(f"sandbox running in {state['dir']}")
            print(f"  API        {state['api_url']}  (profile sandbox in {state['credentials_file']})")
            print(f"  AWS        {state['aws_endpoint_url']}  (region {state['region']})")
            print(f"  driver     fargate-driver --config {state['toml_path']} custom ...")
            print(f"  stop with  python -m sandbox stop --dir {state['dir']}")
        elif args.command == "stop":
            stopped = control.stop(args.dir)
            print("sandbox stopped" if stopped else f"no sandbox was running in {args.dir}")
        elif args.command == "status":
            print(json.dumps(control.load_state(args.dir), indent=2))
        elif args.command == "fault" and args.clear:
            print(f"faults cleared: {control.clear_faults(args.dir)}")
        elif args.command == "fault":
            if not args.job_id or not args.kind:
                raise UsageError("fault needs --job-id N and a KIND (or --clear)")
            body = {"job_id": args.job_id, "kind": args.kind}
            for name in ("seconds", "after", "code", "notice", "versionless", "drop", "duplicate", "reorder"):
                if getattr(args, name) is not None:
                    body[name] = getattr(args, name)
            fault = control.arm_fault(args.dir, body)
            print(f"fault armed: {json.dumps(fault)}")
    except SandboxError as exc:
        print(f"sandbox: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # e.g. a --dir that cannot be created
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"sandbox: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sandbox: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
