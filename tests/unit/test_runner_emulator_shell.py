"""Stage scripts as the runner writes them: the `$'...'` escaping survives bash byte for byte, and the
wrapper keeps the job's commands off the script's stdin."""

from __future__ import annotations

import subprocess

from hypothesis import given, settings
from hypothesis import strategies as st

from runner_emulator.shell import command_lines, export, shell_escape, stage_script


@settings(max_examples=60, deadline=None)
@given(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
)
def test_shell_escape_round_trips_through_bash(text):
    out = subprocess.run(["bash", "-c", f"printf '%s' {shell_escape(text)}"], capture_output=True, check=True)
    assert out.stdout.decode("utf-8") == text


def test_the_wrapper_has_the_runners_shape():
    script = stage_script([export("A", "1"), "echo $A"])
    lines = script.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert "trap 'exit 1' TERM" in lines
    assert any("set -o errexit" in line for line in lines)
    body = next(line for line in lines if line.startswith("(trap 'exit 1' TERM; eval $'"))
    assert body.endswith("') < /dev/null")
    assert lines[-1] == "exit 0"


def test_piped_to_bash_the_first_failure_is_the_exit_status_and_stdin_is_not_eaten():
    script = stage_script([*command_lines(["cat", "echo still here", "(exit 42)", "echo never"])])
    # Piped like a driver does: if `cat` could read stdin it would swallow the rest of the script.
    out = subprocess.run(["bash"], input=script.encode(), capture_output=True, check=False)
    assert out.returncode == 42
    assert out.stdout.decode() == "$ cat\n$ echo still here\nstill here\n$ (exit 42)\n"
