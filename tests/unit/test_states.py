"""The job state machine: forward only, terminal is final, ECS statuses mean what they should, and the
transition table every guarded write goes through."""

from __future__ import annotations

import itertools

import pytest

from chalicelib import states
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


# -- the transition table --------------------------------------------------------------------------------

PROV, PEND, RUN, STOPPING, STOPPED, FAILED = (
    JobState.PROVISIONING,
    JobState.PENDING,
    JobState.RUNNING,
    JobState.STOPPING,
    JobState.STOPPED,
    JobState.FAILED,
)
LIVE = {PROV, PEND, RUN, STOPPING}
EVERY = LIVE | {STOPPED, FAILED}

# (transition, target state or None for "stays", the states it may come from): written out by hand, so a
# change to the table must change this too.
TABLE = [
    (states.START, PROV, set()),
    (states.NEW_ATTEMPT, PROV, {STOPPED, FAILED}),
    (states.LEASE_TAKEN, None, EVERY),
    (states.SPOT_FALLBACK, None, LIVE),
    (states.NO_CAPACITY, None, LIVE),
    (states.LAUNCH_THROTTLED, None, EVERY),
    (states.LAUNCHED, None, LIVE),
    (states.LAUNCH_FAILED, FAILED, LIVE),
    (states.CERTIFIED, None, LIVE),
    (states.HOST_KEY_PUBLISHED, None, LIVE),
    (states.POOL_CLAIMED, None, {PROV, PEND, RUN}),
    (states.warm_claimed(PROV), PROV, {PROV}),
    (states.warm_claimed(PEND), PEND, {PROV}),
    (states.warm_claimed(RUN), RUN, {PROV}),
    (states.STOP_REQUESTED, STOPPING, LIVE),
    (states.HEARTBEAT, None, LIVE),
    (states.CHECKED, None, EVERY),
    (states.FINISHED_TASK_SEEN, None, {STOPPED, FAILED}),
    (states.REAPED, STOPPING, {PROV, PEND, RUN}),
    (states.FAILED_STUCK, FAILED, LIVE),
    (states.STOP_RETRIED, None, LIVE),
    (states.observed(PROV), PROV, {PROV}),
    (states.observed(PEND), PEND, {PROV, PEND}),
    (states.observed(RUN), RUN, {PROV, PEND, RUN}),
    (states.observed(STOPPING), STOPPING, LIVE),
    (states.observed(STOPPED), STOPPED, LIVE),
    (states.observed(FAILED), FAILED, LIVE),
    (states.task_gone(True), STOPPED, LIVE),
    (states.task_gone(False), FAILED, LIVE),
]


@pytest.mark.parametrize(
    ("transition", "target", "allowed_from"), TABLE, ids=lambda v: getattr(v, "event", None)
)
def test_each_event_has_its_target_and_the_states_it_may_come_from(transition, target, allowed_from):
    assert transition.target == target
    assert transition.allowed_from == frozenset(allowed_from)


def test_the_table_is_every_transition_and_nothing_else():
    assert sorted(map(repr, states.TRANSITIONS)) == sorted(repr(row[0]) for row in TABLE)


MOVES = [
    t for t in states.TRANSITIONS if t.target is not None and t not in (states.START, states.NEW_ATTEMPT)
]


@pytest.mark.parametrize("transition", MOVES, ids=lambda t: f"{t.event}-{t.target}")
def test_no_event_but_a_new_attempt_moves_a_job_backwards_or_out_of_a_terminal_state(transition):
    assert transition.allowed_from
    assert all(can_move(source, transition.target) for source in transition.allowed_from)


def test_a_finished_job_changes_state_only_by_a_new_attempt():
    leaving = [t.event for t in states.TRANSITIONS if t.target is not None and t.allowed_from & TERMINAL]
    assert leaving == ["new attempt"]


def test_a_reaped_job_is_never_reaped_again_but_may_still_be_stopped_by_its_runner():
    assert STOPPING not in states.REAPED.allowed_from
    assert STOPPING in states.STOP_REQUESTED.allowed_from
