"""The jobs table as the reaper and the event handler read it: live jobs a page at a time, oldest deadline
first, and a record found by its task; and writes that set and remove fields together."""

from __future__ import annotations

import pytest

from chalicelib import factory
from chalicelib.errors import StaleWrite
from chalicelib.schema import TABLE_KEY
from chalicelib.states import CHECKED, HEARTBEAT, STOP_REQUESTED
from chalicelib.store import JobStore


@pytest.fixture
def store(aws) -> JobStore:
    return JobStore(aws.table)


def job(n: int, **fields) -> dict:
    return {
        TABLE_KEY: f"t3sT_1234-{n}/" + "0" * 32,
        "job_key": f"t3sT_1234-{n}",
        "state": "RUNNING",
        **fields,
    }


def test_live_jobs_come_a_page_at_a_time_oldest_deadline_first(store):
    for n, deadline in [(1, 30), (2, 10), (3, 20), (4, 40), (5, 50)]:
        store.create(job(n, live="1", deadline=deadline))
    store.create(job(6, deadline=1))  # finished: not in the live index

    seen, start = [], None
    pages = 0
    while True:
        page, start = store.live_jobs(limit=2, start_key=start)
        pages += 1
        seen += [int(item["deadline"]) for item in page]
        assert len(page) <= 2
        if not start:
            break

    assert seen == [10, 20, 30, 40, 50]
    assert pages == 3


def test_the_reapers_page_is_a_hundred_jobs(store):
    for n in range(101):
        store.create(job(n, live="1", deadline=n))
    service = factory.job_service()

    page, start = service.live_jobs()

    assert len(page) == 100 and start is not None
    rest, end = service.live_jobs(start)
    assert [int(item["deadline"]) for item in rest] == [100]
    assert end is None


def test_a_record_is_found_by_its_task_and_a_task_of_no_record_by_nothing(store):
    store.create(job(1, task_arn="arn:aws:ecs:eu-west-1:123456789012:task/c/1"))

    assert store.find_by_task("arn:aws:ecs:eu-west-1:123456789012:task/c/1")["job_key"] == "t3sT_1234-1"
    assert store.find_by_task("arn:aws:ecs:eu-west-1:123456789012:task/c/9") is None


def test_a_transition_sets_and_removes_in_one_write_and_returns_the_whole_record(store):
    store.create(job(1, live="1", deadline=5, checked_at="old", stop_retries=2))

    after = store.transition(
        job(1)[TABLE_KEY],
        STOP_REQUESTED,
        set_fields={"stop_requested": "done"},
        remove=("live", "stop_retries"),
    )

    assert after["state"] == "STOPPING" and after["stop_requested"] == "done"
    assert "live" not in after and "stop_retries" not in after
    assert after["checked_at"] == "old" and after["job_key"] == "t3sT_1234-1"


def test_a_transition_that_only_removes_or_only_sets_works(store):
    store.create(job(1, live="1", deadline=5))

    assert "live" not in store.transition(job(1)[TABLE_KEY], CHECKED, remove=("live",))
    assert (
        store.transition(job(1)[TABLE_KEY], CHECKED, set_fields={"checked_at": "now"})["checked_at"] == "now"
    )


def test_a_transition_with_a_target_state_needs_no_other_field(store):
    store.create(job(1))

    assert store.transition(job(1)[TABLE_KEY], STOP_REQUESTED)["state"] == "STOPPING"


def test_a_failed_guard_names_the_record(store):
    store.create(job(1, attempt=1))

    with pytest.raises(StaleWrite, match=rf"^job {job(1)[TABLE_KEY]} changed under this write$"):
        store.transition(job(1)[TABLE_KEY], HEARTBEAT, set_fields={"heartbeat_at": "x"}, equal={"attempt": 2})


@pytest.mark.parametrize(
    ("guard", "holds", "fails"),
    [
        ("absent_or_equal", {"stop_retries": 2}, {"stop_retries": 3}),
        ("absent_or_below", {"task_version": 3}, {"task_version": 2}),
        ("absent_or_in", {"last_status": ["PENDING", "RUNNING"]}, {"last_status": ["PENDING"]}),
    ],
)
def test_an_absent_or_guard_holds_when_the_attribute_is_absent_or_the_comparison_holds(
    store, guard, holds, fails
):
    store.create(job(1))
    store.create(job(2, stop_retries=2, task_version=2, last_status="RUNNING"))

    store.transition(job(1)[TABLE_KEY], CHECKED, set_fields={"checked_at": "a"}, **{guard: fails})  # absent
    store.transition(job(2)[TABLE_KEY], CHECKED, set_fields={"checked_at": "b"}, **{guard: holds})
    with pytest.raises(StaleWrite):
        store.transition(job(2)[TABLE_KEY], CHECKED, set_fields={"checked_at": "c"}, **{guard: fails})

    assert store.get(job(2)[TABLE_KEY])["checked_at"] == "b"
