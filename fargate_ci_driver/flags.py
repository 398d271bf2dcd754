"""The command line's vocabulary, shared by the full parser (`cli.build_parser`) and the stage fast path
(`agent.fastpath`), which reads `run` command lines before the parser is loaded. The two must agree:
tests/unit/test_driver_agent.py checks that whatever the fast path accepts, the parser reads the same way.
Plain data (the fast path loads only modules built into the interpreter)."""

LOG_LEVELS = ("trace", "debug", "info", "warn", "warning", "error", "fatal", "panic")
LOG_FORMATS = ("text", "json", "text_simple")
# `custom|c`, then the stage (urfave/cli's aliases, as the Go driver has them).
GROUPS = ("custom", "c")
STAGES = {
    "config": "config",
    "co": "config",
    "prepare": "prepare",
    "p": "prepare",
    "run": "run",
    "r": "run",
    "cleanup": "cleanup",
    "cl": "cleanup",
}
DEFAULT_CONFIG = "config.toml"
# The global flags that take a value (`--name V`, `--name=V`, or Go-style `-name`), with the values the
# parser accepts, lower-cased (None: any).
VALUE_FLAGS: dict[str, tuple[str, ...] | None] = {
    "config": None,
    "log-level": LOG_LEVELS,
    "log-format": LOG_FORMATS,
    "log-file": None,
    "task-def": None,
    "platform-version": None,
}
