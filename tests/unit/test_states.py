"""The job state machine: forward only, terminal is final, ECS statuses mean what they should."""

from __future__ import annotations

import itertools

import pytest

from chalicelib.states import TERMINAL, JobState, can_move, sources_for, state_for_task

ORDER = [JobState.PROVISIONING, JobState.PENDING, JobState.RUNNING, JobState.STOPPING]


@pytest.mark.parametrize(("earlier", "later"), list(itertools.combinations(ORDER, 2)))
def test_jobs_move_forward_never_back(earlier, later):
    assert can_move(earlier, later)
    assert not can_move(later, earlier)


@pytest.mark.parametrize("terminal", sorted(TERMINAL))
@pytest.mark.parametrize("target", list(JobState))
def test_terminal_states_are_final(terminal, target):
    assert not can_move(terminal, target)


def test_any_live_state_may_end_in_either_terminal_state():
    for state in ORDER:
        assert can_move(state, JobState.STOPPED)
        assert can_move(state, JobState.FAILED)


def test_staying_in_a_live_state_with_new_details_is_allowed():
    assert can_move(JobState.RUNNING, JobState.RUNNING)


def test_sources_for_running_are_what_a_conditional_write_checks():
    assert sources_for(JobState.RUNNING) == [JobState.PROVISIONING, JobState.PENDING, JobState.RUNNING]
    assert JobState.STOPPED not in sources_for(JobState.STOPPED)


@pytest.mark.parametrize(
    ("last_status", "expected"),
    [
        ("PROVISIONING", JobState.PROVISIONING),
        ("PENDING", JobState.PENDING),
        ("ACTIVATING", JobState.PENDING),
        ("RUNNING", JobState.RUNNING),
        ("DEACTIVATING", JobState.STOPPING),
        ("STOPPING", JobState.STOPPING),
        ("DEPROVISIONING", JobState.STOPPING),
    ],
)
def test_ecs_statuses_map_to_job_states(last_status, expected):
    assert state_for_task(last_status, stop_code=None, started=False) == expected


def test_a_stopped_task_that_ran_stopped_the_job_and_one_that_never_ran_failed_it():
    assert state_for_task("STOPPED", stop_code="UserInitiated", started=True) == JobState.STOPPED
    assert state_for_task("STOPPED", stop_code="SpotInterruption", started=True) == JobState.STOPPED
    assert state_for_task("STOPPED", stop_code="TaskFailedToStart", started=False) == JobState.FAILED
    assert state_for_task("STOPPED", stop_code="UserInitiated", started=False) == JobState.FAILED


def test_an_unknown_ecs_status_is_refused():
    with pytest.raises(ValueError, match="unknown ECS task status"):
        state_for_task("EXPLODED", stop_code=None, started=True)
