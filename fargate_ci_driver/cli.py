"""The `fargate-driver` command line, drop-in for the Go driver's:

    fargate-driver [--debug] [--log-level L] [--log-format F] [--log-file P] [--config PATH]
                   [--task-def TD] [--platform-version V]
                   custom|c  config|co | prepare|p | run|r SCRIPT STAGE | cleanup|cl
    fargate-driver --config PATH status [--all] [--json] [--since S]

`main` is the edge: it maps every outcome to 0, BUILD_FAILURE_EXIT_CODE or SYSTEM_FAILURE_EXIT_CODE
(`exit_status`), prints one clear line for an error and a stack trace only with --debug.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # not typing's: importing typing costs every stage a few milliseconds
if TYPE_CHECKING:
    import argparse
    from collections.abc import Mapping, Sequence
    from typing import TextIO

    from fargate_ci_driver.agent.protocol import StageResult
    from fargate_ci_driver.exit_status import ExitCodes

# What `--help` lists under "environment": every variable the driver reads. tests/unit/test_driver_cli.py
# checks that each `FARGATE_*` name the driver's modules read is here.
ENVIRONMENT = (
    (
        "Per job (CI/CD variables; GitLab Runner passes them as CUSTOM_ENV_<name>; set by the job's author):",
        "",
    ),
    (
        "CUSTOM_ENV_FARGATE_TASK_DEFINITION",
        "task definition family[:revision] or ARN (orchestrator's allowlist)",
    ),
    ("CUSTOM_ENV_FARGATE_PLATFORM_VERSION", "Fargate platform version, LATEST or N.N.N"),
    ("CUSTOM_ENV_FARGATE_CPU", "task cpu units (256 ... 16384), with FARGATE_MEMORY"),
    ("CUSTOM_ENV_FARGATE_MEMORY", "task memory in MiB, a Fargate size for the cpu"),
    (
        "CUSTOM_ENV_CI_JOB_ID, _CI_PROJECT_ID, _CI_PIPELINE_ID, _CI_SERVER_URL, _CI_RUNNER_SHORT_TOKEN",
        "only compared with the job payload: a mismatch is a WARNING",
    ),
    ("Set by GitLab Runner:", ""),
    ("JOB_RESPONSE_FILE", "the job payload (the job's identity); its directory holds fargate-driver-job"),
    ("BUILD_FAILURE_EXIT_CODE, SYSTEM_FAILURE_EXIT_CODE", "the exit codes to use (default 1 and 2)"),
    ("BUILD_EXIT_CODE_FILE", "where the job script's own exit status is written"),
    ("Runner manager (the runner's environment):", ""),
    ("FARGATE_DRIVER_AGENT", "off: no session agent (every stage connects itself)"),
    ("FARGATE_DRIVER_AGENT_JOB_IDLE", "seconds the agent keeps an idle job's connection (30)"),
    ("FARGATE_DRIVER_AGENT_EXIT_IDLE", "seconds the agent lives without jobs (60)"),
    ("AWS_*", "botocore's credential chain and settings (AWS_PROFILE, AWS_CONFIG_FILE, ...)"),
)


def _epilog() -> str:
    lines = ["environment:"]
    for name, meaning in ENVIRONMENT:
        lines.append(f"  {name}" if not meaning else f"    {name}\n        {meaning}")
    lines.append("")
    lines.append("exit codes: 0; BUILD_FAILURE_EXIT_CODE for the job's own failure; SYSTEM_FAILURE_EXIT_CODE")
    lines.append("for everything else (status too). Config: see docs/operators-guide.md.")
    return "\n".join(lines)


# Everything else is imported where it is used: `run` is called for every stage, and when the session agent
# serves it, this module, `agent.fastpath` and the interpreter's built-in modules are all a stage loads.


def build_parser() -> argparse.ArgumentParser:
    import argparse
    from typing import NoReturn

    from fargate_ci_driver import __version__
    from fargate_ci_driver.errors import ConfigError
    from fargate_ci_driver.flags import DEFAULT_CONFIG, GROUPS, LOG_FORMATS, LOG_LEVELS, STAGES

    class _Parser(argparse.ArgumentParser):
        """argparse exits 2 on bad usage, a code the runner may not expect: raise instead."""

        def error(self, message: str) -> NoReturn:
            raise ConfigError(f"command line: {message}")

    parser = _Parser(
        prog="fargate-driver",
        description="GitLab Runner custom-executor driver for AWS Fargate: one Fargate task per CI job.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fargate-driver {__version__}")
    # Go's flag parsing (urfave/cli v1) takes -flag as well as --flag; so do we.
    parser.add_argument(
        "--debug", "-debug", action="store_true", help="debug logs, and a stack trace with an error"
    )
    parser.add_argument(
        "--log-level",
        "-log-level",
        choices=LOG_LEVELS,
        type=str.lower,
        metavar="LEVEL",
        help=f"diagnostics from this level up ({', '.join(LOG_LEVELS)}; default: [LogLevel] or warning)",
    )
    parser.add_argument(
        "--log-format",
        "-log-format",
        choices=LOG_FORMATS,
        type=str.lower,
        metavar="FORMAT",
        help=f"diagnostics as {', '.join(LOG_FORMATS)} (default: [LogFormat] or text)",
    )
    parser.add_argument(
        "--log-file",
        "-log-file",
        metavar="PATH",
        help="diagnostics to this file instead of stderr (the job log) (default: [LogFile])",
    )
    parser.add_argument(
        "--config",
        "-config",
        default=DEFAULT_CONFIG,
        metavar="PATH",
        help=f"the driver's fargate.toml (default: {DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--task-def",
        "-task-def",
        metavar="TD",
        help="task definition for every job (default: job variable FARGATE_TASK_DEFINITION, then [Fargate] "
        "TaskDefinition, then the orchestrator's default)",
    )
    parser.add_argument(
        "--platform-version",
        "-platform-version",
        metavar="V",
        help="Fargate platform version (default: job variable FARGATE_PLATFORM_VERSION, then [Fargate] "
        "PlatformVersion, then the orchestrator's)",
    )
    top = parser.add_subparsers(dest="group", metavar="{custom,status}")
    custom = top.add_parser(
        GROUPS[0], aliases=list(GROUPS[1:]), help="the custom-executor stages GitLab Runner calls"
    )
    stages = custom.add_subparsers(dest="command", metavar="config|prepare|run|cleanup")
    helps = {
        "config": "print the runner configuration JSON",
        "prepare": "start the job's task and wait for SSH",
        "run": "run one stage script in the task",
        "cleanup": "stop the task and remove local state",
    }
    for name, help_text in helps.items():
        aliases = [alias for alias, stage in STAGES.items() if stage == name and alias != name]
        stage = stages.add_parser(name, aliases=aliases, help=help_text, description=help_text)
        if name == "run":
            stage.add_argument("script", help="the script GitLab Runner wrote for this stage")
            stage.add_argument("stage", help="the stage's name (e.g. build_script, after_script)")
            stage.add_argument("extra", nargs="*", help=argparse.SUPPRESS)
    status = top.add_parser(
        "status",
        help="list this runner manager's jobs (its AWS identity's) from the orchestrator",
        description="This runner manager's jobs, newest first: live ones, or with --all the finished ones "
        "the orchestrator still keeps (JOB_RETENTION_DAYS) too. Needs only [Orchestrator] in the config.",
    )
    status.add_argument(
        "--all", action="store_true", dest="show_all", help="finished jobs too, not only live ones"
    )
    status.add_argument(
        "--json",
        action="store_true",
        dest="as_json",
        help="a JSON list of the API's job views instead of a table",
    )
    status.add_argument(
        "--since", metavar="WHEN", help="only jobs created since a duration ago (30m, 2h, 7d) or a UTC time"
    )
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    from fargate_ci_driver.errors import ConfigError
    from fargate_ci_driver.flags import STAGES

    args = build_parser().parse_args(list(argv))
    if args.group == "status":
        args.command = "status"
        return args
    if args.group is None or args.command is None:
        raise ConfigError(
            "command line: expected `custom config|prepare|run SCRIPT STAGE|cleanup` or `status`"
        )
    args.command = STAGES[args.command]
    return args


def main(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """The edge. A real process (its fds 1 and 2 can be handed to the session agent) first tries the stage
    fast path (`agent.fastpath`); what it made of the stage goes to the stage context, which picks the
    transport."""
    argv = sys.argv[1:] if argv is None else argv
    environ = os.environ if environ is None else environ
    from fargate_ci_driver.errors import BuildFailed, DriverError

    debug = "--debug" in argv or "-debug" in argv
    try:
        try:
            fast_path = None
            if stdout is None and stderr is None:
                from fargate_ci_driver.agent import fastpath

                fast_path = fastpath.quick_run(list(argv), environ)
                if fast_path is not None and fast_path.status == 0:
                    return 0
            return _main(argv, environ, stdout or sys.stdout, stderr or sys.stderr, fast_path)
        except BuildFailed as exc:
            from fargate_ci_driver.logs import fields, log

            log.debug("build failed", extra=fields(exit_code=exc.exit_code))
            codes = _exit_codes(environ)
            codes.record_build_exit_code(exc)
            return codes.build_failure
    except DriverError as exc:
        _report(stderr or sys.stderr, f"ERROR: {exc}", debug, colour=_in_job_log(environ))
        return _exit_codes(environ).for_error(exc)
    except KeyboardInterrupt:
        _report(stderr or sys.stderr, "ERROR: interrupted", debug, colour=_in_job_log(environ))
        return _exit_codes(environ).system_failure
    except Exception as exc:  # noqa: BLE001 - the edge: anything unforeseen is still a system failure
        _report(
            stderr or sys.stderr,
            f"ERROR: internal error in fargate-driver: {type(exc).__name__}: {exc}",
            debug,
            hint=True,
            colour=_in_job_log(environ),
        )
        return _exit_codes(environ).system_failure


def _exit_codes(environ: Mapping[str, str]) -> ExitCodes:
    from fargate_ci_driver.exit_status import ExitCodes

    return ExitCodes.from_environ(environ)


def _in_job_log(environ: Mapping[str, str]) -> bool:
    """Whether stderr is a job log: GitLab Runner sets SYSTEM_FAILURE_EXIT_CODE for every stage it runs
    (`status`, run by hand, gets plain text)."""
    return "SYSTEM_FAILURE_EXIT_CODE" in environ


def _report(stderr: TextIO, line: str, debug: bool, hint: bool = False, colour: bool = False) -> None:
    stderr.flush()
    if debug:
        import traceback

        traceback.print_exc(file=stderr)
    elif hint:
        line += " (run with --debug for the stack trace)"
    if colour:  # as GitLab Runner prints its own errors (logs.error_line)
        from fargate_ci_driver.logs import error_line

        line = error_line(line)
    stderr.write(line + "\n")
    stderr.flush()


def _main(
    argv: Sequence[str],
    environ: Mapping[str, str],
    stdout: TextIO,
    stderr: TextIO,
    fast_path: StageResult | None = None,
) -> int:
    from fargate_ci_driver import logs, signals
    from fargate_ci_driver.errors import Cancelled, ConfigError
    from fargate_ci_driver.exit_status import SUCCESS
    from fargate_ci_driver.logs import log
    from fargate_ci_driver.settings import load

    args = parse_args(argv)
    settings = load(args.config)
    level = "debug" if args.debug else (args.log_level or settings.log_level)
    log_file = args.log_file or settings.log_file
    try:
        logs.setup(level, args.log_format or settings.log_format, log_file, stderr)
    except OSError as exc:
        raise ConfigError(f"{settings.path}: LogFile {log_file}: {exc.strerror or exc}") from None
    if args.command == "status":
        from fargate_ci_driver.status import status

        status(settings, stdout, show_all=args.show_all, as_json=args.as_json, since=args.since)
        return SUCCESS
    if args.command == "config":
        from fargate_ci_driver.runner_config import render

        stdout.write(render(settings))
        stdout.flush()
        return SUCCESS
    codes = _exit_codes(environ)
    if codes.problem:
        log.warning(codes.problem)
    signals.install()

    from fargate_ci_driver.context import StageContext

    ctx = StageContext(
        settings=settings,
        environ=environ,
        stdout=stdout,
        stderr=stderr,
        task_def_flag=args.task_def,
        platform_version_flag=args.platform_version,
        fast_path=fast_path,
    )
    if args.command == "prepare":
        from fargate_ci_driver.prepare import prepare

        prepare(ctx)
    elif args.command == "run":
        from fargate_ci_driver.run import run

        run(ctx, args.script, args.stage)
    else:
        from fargate_ci_driver.cleanup import cleanup

        cleanup(ctx)
    if signals.cancelled():
        raise Cancelled("cancelled by the runner")
    return SUCCESS
