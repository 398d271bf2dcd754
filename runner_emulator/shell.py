"""Stage scripts as GitLab Runner's bash shell writes them (custom-executor protocol §7).

`shells/bash.go BashWriter.Finish` wraps every stage body the same way: a TERM trap, errexit (and
pipefail when bash has it), and the body `$'...'`-escaped and `eval`ed in a subshell whose stdin is
/dev/null, so nothing the job runs can read the rest of the script when a driver pipes it to a shell.
"""

from __future__ import annotations

from collections.abc import Iterable

_NAMED_ESCAPES = {
    0x07: "\\a",
    0x08: "\\b",
    0x09: "\\t",
    0x0A: "\\n",
    0x0B: "\\v",
    0x0C: "\\f",
    0x0D: "\\r",
    0x1B: "\\e",
    0x27: "\\'",
    0x5C: "\\\\",
}


def shell_escape(text: str) -> str:
    """ANSI-C quoting, byte by byte, as `helpers/shell_escape.go ShellEscape` does: printable ASCII as is,
    the usual named escapes, everything else (including UTF-8 bytes) as \\xHH."""
    out = ["$'"]
    for byte in text.encode("utf-8"):
        if byte in _NAMED_ESCAPES:
            out.append(_NAMED_ESCAPES[byte])
        elif 0x20 <= byte < 0x7F:
            out.append(chr(byte))
        else:
            out.append(f"\\x{byte:02x}")
    out.append("'")
    return "".join(out)


def stage_script(body: Iterable[str], trace: bool = False) -> str:
    """The whole file the runner passes to run_exec for one stage."""
    lines = ["#!/usr/bin/env bash", "", "trap 'exit 1' TERM", ""]
    if trace:
        lines.append("set -o xtrace")
    lines += [
        'case "$(set -o)" in *"pipefail"*) set -o pipefail;; esac; set -o errexit',
        "set +o noclobber",
        f"(trap 'exit 1' TERM; eval {shell_escape(chr(10).join(body) + chr(10))}) < /dev/null",
        "exit 0",
        "",
    ]
    return "\n".join(lines)


def echo(text: str) -> str:
    return f"echo {shell_escape(text)}"


def export(key: str, value: str) -> str:
    return f"export {key}={shell_escape(value)}"


def command_lines(commands: Iterable[str]) -> list[str]:
    """Each user command is echoed as `$ command` first, as in a GitLab job log."""
    lines = []
    for command in commands:
        first = command.splitlines()[0] if command.strip() else command
        shown = first + (" # collapsed multi-line command" if "\n" in command.strip() else "")
        lines.append(echo(f"$ {shown}"))
        lines.append(command)
    return lines
