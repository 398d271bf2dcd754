"""prepare's back-off policy (`fargate_ci_driver.backoff`), on its own: pure, so every delay is checked
exactly."""

from __future__ import annotations

from itertools import islice

import pytest

from fargate_ci_driver.backoff import READINESS, Backoff, Readiness


def first(n: int, delays) -> list[float]:
    return list(islice(delays, n))


def test_until_the_task_runs_the_api_is_polled_from_50_ms_backing_off_by_a_quarter_to_1_s():
    assert first(17, READINESS.pauses(running=False)) == [
        0.05,
        0.0625,
        0.078125,
        0.097656,
        0.12207,
        0.152588,
        0.190735,
        0.238419,
        0.298023,
        0.372529,
        0.465661,
        0.582077,
        0.727596,
        0.909495,
        1.0,
        1.0,
        1.0,
    ]


def test_when_the_task_moves_on_before_its_key_is_published_the_polls_start_again_from_25_ms():
    assert first(17, READINESS.pauses(running=False, moved=True))[:8] == [
        0.025,
        0.03125,
        0.039062,
        0.048828,
        0.061035,
        0.076294,
        0.095367,
        0.119209,
    ]
    assert first(20, READINESS.pauses(running=False, moved=True))[-3:] == [1.0, 1.0, 1.0]
    assert first(3, READINESS.pauses(running=True, moved=True)) == [0.2, 0.4, 0.8]  # SSH has its own


def test_once_the_task_runs_sshd_is_tried_from_200_ms_doubling_to_1_s():
    assert first(6, READINESS.pauses(running=True)) == [0.2, 0.4, 0.8, 1.0, 1.0, 1.0]


def test_each_phase_starts_its_back_off_afresh():
    used = READINESS.pauses(running=True)
    first(5, used)
    assert first(2, READINESS.pauses(running=True)) == [0.2, 0.4]


@pytest.mark.parametrize(
    ("running", "since", "look"),
    [(False, 0.0, True), (False, 10.0, True), (True, 0.0, False), (True, 4.999, False), (True, 5.0, True)],
)
def test_the_api_is_asked_at_every_pause_until_the_task_runs_then_every_5_s(running, since, look):
    assert READINESS.look_at_api(running, since) is look


def test_a_policy_is_plain_data():
    quick = Readiness(task=Backoff(0.01, 2.0, 0.03), ssh=Backoff(0.5, 1.0, 0.5), state_check_seconds=1.0)
    assert first(4, quick.pauses(running=False)) == [0.01, 0.02, 0.03, 0.03]
    assert first(2, quick.pauses(running=True)) == [0.5, 0.5]
    assert quick.look_at_api(True, 1.0) and not quick.look_at_api(True, 0.5)
    assert first(2, Backoff(2.0, 2.0, 1.0).delays()) == [1.0, 1.0]  # never above the cap, even at first
