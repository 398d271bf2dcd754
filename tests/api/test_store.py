"""The DynamoDB adapter against moto: every transition either happens whole or raises StaleWrite and
changes nothing. The service's state machine rests on this; a store that ignored its conditions would let
events, the reaper and the API overwrite each other."""

from __future__ import annotations

import pytest

from chalicelib.errors import StaleWrite
from chalicelib.schema import TABLE_KEY
from chalicelib.states import CHECKED, HEARTBEAT, STOP_REQUESTED
from chalicelib.store import JobStore

KEY = "t3sT_1234-1/" + "0" * 32


@pytest.fixture
def store(aws) -> JobStore:
    return JobStore(aws.table)


def _item(**fields) -> dict:
    return {TABLE_KEY: KEY, "job_key": "t3sT_1234-1", "state": "RUNNING", "attempt": 1, **fields}


def test_create_writes_once_and_hands_back_what_is_there(store):
    assert store.create(_item()) is None

    existing = store.create(_item(state="PROVISIONING", attempt=7))

    assert existing["state"] == "RUNNING" and existing["attempt"] == 1
    assert store.get(KEY)["state"] == "RUNNING"


def test_a_transition_whose_condition_holds_is_applied_and_returned(store):
    store.create(_item(stale="x"))

    updated = store.transition(KEY, STOP_REQUESTED, set_fields={"note": "n"}, remove=("stale",))

    assert updated["state"] == "STOPPING" and updated["note"] == "n" and "stale" not in updated
    assert store.get(KEY) == updated


def test_a_transition_from_a_state_it_may_not_come_from_raises_and_changes_nothing(store):
    store.create(_item(state="STOPPED", note="kept"))
    before = store.get(KEY)

    with pytest.raises(StaleWrite):
        store.transition(KEY, STOP_REQUESTED, set_fields={"note": "x"}, remove=("note",))

    assert store.get(KEY) == before


# Each guard: one record it holds on, one it fails on (and then nothing is written).
GUARDS = [
    ({"equal": {"attempt": 1}}, {"attempt": 1}, {"attempt": 2}),
    ({"absent": ("task_arn",)}, {}, {"task_arn": "arn:t"}),
    ({"below": {"deadline": 10}}, {"deadline": 9}, {"deadline": 10}),
    ({"absent_or_equal": {"stop_retries": 1}}, {}, {"stop_retries": 2}),
    ({"absent_or_equal": {"stop_retries": 1}}, {"stop_retries": 1}, {"stop_retries": 0}),
    ({"absent_or_below": {"task_version": 3}}, {"task_version": 2}, {"task_version": 3}),
    ({"absent_or_below": {"task_version": 3}}, {}, {"task_version": 4}),
    (
        {"absent_or_in": {"last_status": ["PENDING", "RUNNING"]}},
        {"last_status": "RUNNING"},
        {"last_status": "STOPPED"},
    ),
    ({"absent_or_in": {"last_status": ["PENDING", "RUNNING"]}}, {}, {"last_status": "PROVISIONING"}),
]


@pytest.mark.parametrize(("guard", "holds", "fails"), GUARDS)
def test_every_guard_of_a_transition_is_checked_on_the_record(aws, store, guard, holds, fails):
    store.create(_item(**fails))
    before = store.get(KEY)
    with pytest.raises(StaleWrite):
        store.transition(KEY, HEARTBEAT, set_fields={"note": "x"}, **guard)
    assert store.get(KEY) == before

    aws.table.delete_item(Key={TABLE_KEY: KEY})
    store.create(_item(**holds))

    assert store.transition(KEY, HEARTBEAT, set_fields={"note": "x"}, **guard)["note"] == "x"


def test_a_transition_that_names_every_state_still_never_creates_a_record(store):
    with pytest.raises(StaleWrite):
        store.transition(KEY, CHECKED, set_fields={"checked_at": "now"})
    with pytest.raises(StaleWrite):
        store.transition(KEY, HEARTBEAT, set_fields={"heartbeat_at": "now"}, absent=("state",))

    assert store.get(KEY) is None


def test_find_by_task_and_the_live_index(store):
    store.create(_item(task_arn="arn:aws:ecs:eu-west-1:123456789012:task/c/1", live="1", deadline=5))
    store.create({**_item(), TABLE_KEY: "t3sT_1234-2/" + "0" * 32, "job_key": "t3sT_1234-2", "deadline": 9})

    assert store.find_by_task("arn:aws:ecs:eu-west-1:123456789012:task/c/1")[TABLE_KEY] == KEY
    assert store.find_by_task("arn:aws:ecs:eu-west-1:123456789012:task/c/2") is None
    live, _ = store.live_jobs()
    assert [item[TABLE_KEY] for item in live] == [KEY]  # the other record is not live
