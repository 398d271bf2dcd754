"""The DynamoDB adapter against moto: every guarded write either happens whole or raises StaleWrite and
changes nothing. The service's state machine rests on this; a store that ignored its conditions would let
events, the reaper and the API overwrite each other."""

from __future__ import annotations

import pytest
from boto3.dynamodb.conditions import Attr

from chalicelib.errors import StaleWrite
from chalicelib.schema import TABLE_KEY
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


def test_an_update_whose_condition_holds_is_applied_and_returned(store):
    store.create(_item(stale="x"))

    updated = store.update(
        KEY, set_fields={"state": "STOPPING"}, remove=("stale",), condition=Attr("state").eq("RUNNING")
    )

    assert updated["state"] == "STOPPING" and "stale" not in updated
    assert store.get(KEY) == updated


def test_an_update_whose_condition_fails_raises_and_changes_nothing(store):
    store.create(_item(note="kept"))
    before = store.get(KEY)

    with pytest.raises(StaleWrite):
        store.update(
            KEY, set_fields={"state": "STOPPED"}, remove=("note",), condition=Attr("state").eq("PENDING")
        )

    assert store.get(KEY) == before


def test_an_update_never_creates_a_record(store):
    with pytest.raises(StaleWrite):
        store.update(KEY, set_fields={"state": "RUNNING"})
    with pytest.raises(StaleWrite):
        store.update(KEY, set_fields={"state": "RUNNING"}, condition=Attr("state").not_exists())

    assert store.get(KEY) is None


def test_find_by_task_and_the_live_index(store):
    store.create(_item(task_arn="arn:aws:ecs:eu-west-1:123456789012:task/c/1", live="1", deadline=5))
    store.create({**_item(), TABLE_KEY: "t3sT_1234-2/" + "0" * 32, "job_key": "t3sT_1234-2", "deadline": 9})

    assert store.find_by_task("arn:aws:ecs:eu-west-1:123456789012:task/c/1")[TABLE_KEY] == KEY
    assert store.find_by_task("arn:aws:ecs:eu-west-1:123456789012:task/c/2") is None
    live, _ = store.live_jobs()
    assert [item[TABLE_KEY] for item in live] == [KEY]  # the other record is not live
