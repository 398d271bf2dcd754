"""The stage fast path: `fargate-driver [flags] custom run SCRIPT STAGE` handed to the session agent before
the rest of the driver is loaded (`cli.main` calls it first).

It loads only modules built into the interpreter (`_socket`, `_signal`; not `socket`, `signal`, `json` or
`re`, whose imports would double a stage's cost), never paramiko or botocore. Its command-line reading is a
subset of `cli.build_parser`'s; `tests/unit/test_driver_agent.py` checks the two agree, so they cannot drift.
"""

from __future__ import annotations

import os

from fargate_ci_driver import job_marker
from fargate_ci_driver.agent.client import RemoteStage, spawn, stage_request
from fargate_ci_driver.agent.protocol import AgentGone, Spot, StageResult, enabled
from fargate_ci_driver.flags import DEFAULT_CONFIG, GROUPS, STAGES, VALUE_FLAGS

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping


def quick_run(argv: list[str], environ: Mapping[str, str]) -> StageResult | None:
    """Run the stage through the agent with nothing but the standard library loaded.

    Returns None when this is not a plain `run` command line (--debug, another stage, an unreadable config):
    the full driver then handles it as usual, reporting any error. Otherwise the agent's result, `unavailable`
    when the agent is absent or could not serve: the full driver then connects directly.
    Raises Cancelled on SIGTERM, after the agent killed the remote stage."""
    parsed = run_command_line(argv)
    if parsed is None or not enabled(environ):
        return None
    config, script_path = parsed
    key = job_marker.read(environ)
    if key is None:
        return None  # prepare recorded no job here: the full path says so
    spot = Spot.read(config, environ)
    if spot is None:
        return None
    try:
        script_fd = os.open(script_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # the full path says what is wrong with it
    remote = RemoteStage(spot)
    try:
        remote.start(stage_request(spot, key), script_fd, 1, 2)
    except AgentGone as exc:
        spawn(spot, environ, open_job=key)  # for the next stage; this one connects directly
        return StageResult(unavailable=str(exc))
    finally:
        os.close(script_fd)  # the agent holds its own copy
    from fargate_ci_driver.errors import Cancelled

    _cancel_on_signals()
    try:
        return remote.wait()
    except Cancelled:
        remote.cancel()
        raise
    finally:
        remote.close()


def _cancel_on_signals() -> None:
    """`fargate_ci_driver.signals` for the quick path, without its threading and signal imports: the first
    SIGTERM/SIGINT raises Cancelled wherever the stage waits, later ones are ignored while the remote stage is
    killed."""
    import _signal

    from fargate_ci_driver.errors import Cancelled

    names = {_signal.SIGTERM: "SIGTERM", _signal.SIGINT: "SIGINT"}
    received: list[int] = []

    def cancel(signum: int, _frame: object) -> None:
        if received:
            return
        received.append(signum)
        raise Cancelled(f"received {names[signum]} from the runner (job cancelled or timed out)")

    for signum in names:
        _signal.signal(signum, cancel)


def run_command_line(argv: list[str]) -> tuple[str, str] | None:
    """(config path, script path) for a plain `[value flags] custom|c run|r SCRIPT STAGE`; None for anything
    else (--debug, --version, another stage, a value the parser would refuse, anything unusual): the full
    parser then reads it. Whatever this accepts, `cli.parse_args` reads the same way (`flags`)."""
    config = DEFAULT_CONFIG
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        flag, has_value, value = argv[i].partition("=")
        name = flag[2:] if flag.startswith("--") else flag[1:]
        if name not in VALUE_FLAGS:
            return None  # --debug, --version, --help, an abbreviation or a typo: the full parser's business
        if not has_value:
            i += 1
            if i >= len(argv) or argv[i].startswith("-"):
                return None  # argparse takes no value that looks like a flag
            value = argv[i]
        choices = VALUE_FLAGS[name]
        if choices is not None and value.lower() not in choices:
            return None
        if name == "config":
            config = value
        i += 1
    rest = argv[i:]
    if len(rest) < 4 or rest[0] not in GROUPS or STAGES.get(rest[1]) != "run":
        return None
    if any(arg.startswith("-") for arg in rest[2:]):
        return None  # a flag among the positionals: the parser refuses it or reads it otherwise
    return config, rest[2]
