"""The start of a stage's stdout: the remote shell's PID marker is taken out, everything else is output."""

from __future__ import annotations

from fargate_ci_driver.ssh import PID_MARKER, _take_pid


def test_the_marker_line_gives_the_pid_and_is_swallowed():
    assert _take_pid(PID_MARKER + b"4242\nfirst line of the job\npart") == (
        4242,
        b"first line of the job\npart",
        b"",
    )


def test_lines_a_login_script_prints_first_stay_output():
    head = b"Welcome!\n" + PID_MARKER + b"77\nrest"
    assert _take_pid(head) == (77, b"rest", b"Welcome!\n")


def test_an_incomplete_line_waits_for_more():
    assert _take_pid(PID_MARKER + b"42") == (None, PID_MARKER + b"42", b"")
    assert _take_pid(b"no marker\nyet") == (None, b"yet", b"no marker\n")
