"""The reaper's decisions at their edges (what it does to a job, with the reason ECS records as the stop
reason and the metric dimension), and its loop against a recording service: what it reports, what it
re-checks on the current record before acting, and which running tasks it sweeps."""

from __future__ import annotations

from collections import Counter

import pytest

from chalicelib import clock, reaper
from chalicelib.reaper import (
    NOTHING,
    QUIET_AFTER,
    STOPPING_QUIET_AFTER,
    STUCK_AFTER,
    Action,
    decide,
    run_reaper,
)
from chalicelib.settings import Settings
from chalicelib.tasks import TaskSnapshot

NOW = 1_800_000_000.0
SETTINGS = Settings(
    cluster="ci",
    subnets=("subnet-a",),
    security_groups=("sg-1",),
    table="jobs",
    default_task_definition="ci-coordinator",
    allowed_task_definitions=(),
    heartbeat_timeout=900,
)
DEADLINE = Action("stop", "CI job passed its deadline (job timeout plus grace)", "Deadline")
HEARTBEAT_LOST = Action("stop", "runner manager stopped sending heartbeats for this job", "HeartbeatLost")
STUCK = Action("fail", "no task was started for this job", "StuckWithoutTask")
SETTLE = Action("settle", why="Stopping")
REFRESH = Action("refresh", why="Refresh")


def ago(seconds: float) -> str:
    return clock.iso(NOW - seconds)


def live(**fields) -> dict:
    """A running job with a task, fresh news and heartbeats, its deadline an hour away."""
    job_key = fields.get("job_key", "t3sT_1234-5005")
    return {
        "pk": f"{job_key}/{'0' * 32}",
        "job_key": job_key,
        "state": "RUNNING",
        "task_arn": "arn:aws:ecs:eu-west-1:123456789012:task/ci/abc",
        "deadline": NOW + 3600,
        "updated_at": ago(1),
        "heartbeat_at": ago(1),
        **fields,
    }


def launching(**fields) -> dict:
    item = live(
        **{
            "state": "PROVISIONING",
            "created_at": ago(STUCK_AFTER + 1),
            "launch_lease_until": NOW - 1,
            **fields,
        }
    )
    del item["task_arn"]
    return item


# -- decide ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["STOPPED", "FAILED"])
def test_a_finished_job_is_left_alone_whatever_it_says(state):
    assert (
        decide(live(state=state, deadline=NOW - 10_000, heartbeat_at=ago(10_000)), NOW, SETTINGS) == NOTHING
    )


def test_a_healthy_job_is_left_alone():
    assert decide(live(), NOW, SETTINGS) is NOTHING


def test_a_job_without_a_task_is_failed_only_when_old_and_its_lease_ran_out():
    assert decide(launching(), NOW, SETTINGS) == STUCK
    assert decide(launching(created_at=ago(STUCK_AFTER)), NOW, SETTINGS) == NOTHING  # not older than 5 min
    assert decide(launching(launch_lease_until=NOW), NOW, SETTINGS) == NOTHING  # its lease runs until now
    assert decide(launching(launch_lease_until=NOW + 30), NOW, SETTINGS) == NOTHING
    young = launching(created_at=ago(10))
    assert decide(young, NOW, SETTINGS) == NOTHING  # lease over but just created


def test_a_job_without_a_task_or_lease_is_failed_once_old():
    item = launching()
    del item["launch_lease_until"]

    assert decide(item, NOW, SETTINGS) == STUCK


def test_a_job_without_a_creation_time_is_never_failed_as_stuck():
    item = launching()
    del item["created_at"]

    assert decide(item, NOW, SETTINGS) == NOTHING


def test_a_job_past_its_deadline_is_stopped_and_one_at_it_is_not():
    assert decide(live(deadline=NOW - 1), NOW, SETTINGS) == DEADLINE
    assert decide(live(deadline=NOW), NOW, SETTINGS) == NOTHING


def test_a_running_job_without_heartbeats_for_longer_than_the_timeout_is_stopped():
    assert decide(live(heartbeat_at=ago(901)), NOW, SETTINGS) == HEARTBEAT_LOST
    assert decide(live(heartbeat_at=ago(900)), NOW, SETTINGS) == NOTHING


def test_only_a_running_job_is_stopped_for_lost_heartbeats():
    assert decide(live(state="PENDING", heartbeat_at=ago(5000)), NOW, SETTINGS) == NOTHING


def test_a_job_without_any_heartbeat_counts_from_now():
    item = live()
    del item["heartbeat_at"]

    assert decide(item, NOW, SETTINGS) == NOTHING


def test_a_quiet_job_is_refreshed_from_ecs_after_quiet_after_seconds():
    assert decide(live(updated_at=ago(QUIET_AFTER + 1)), NOW, SETTINGS) == REFRESH
    assert decide(live(updated_at=ago(QUIET_AFTER)), NOW, SETTINGS) == NOTHING


def test_a_recent_check_counts_as_news():
    assert decide(live(updated_at=ago(5000), checked_at=ago(1)), NOW, SETTINGS) == NOTHING
    assert decide(live(updated_at=ago(1), checked_at=ago(5000)), NOW, SETTINGS) == NOTHING
    assert decide(live(updated_at=ago(5000), checked_at=ago(QUIET_AFTER + 1)), NOW, SETTINGS) == REFRESH


def test_a_job_never_heard_of_is_refreshed():
    item = live()
    del item["updated_at"]

    assert decide(item, NOW, SETTINGS) == REFRESH


@pytest.mark.parametrize("stopping", [{"state": "STOPPING"}, {"stop_requested": "CI job finished"}])
def test_a_job_asked_to_stop_is_never_reaped_again_only_settled_when_quiet(stopping):
    overdue = live(deadline=NOW - 10_000, heartbeat_at=ago(10_000), **stopping)

    assert decide({**overdue, "updated_at": ago(STOPPING_QUIET_AFTER + 1)}, NOW, SETTINGS) == SETTLE
    assert decide({**overdue, "updated_at": ago(STOPPING_QUIET_AFTER)}, NOW, SETTINGS) == NOTHING
    assert decide({**overdue, "updated_at": ago(5000), "checked_at": ago(1)}, NOW, SETTINGS) == NOTHING


# -- the loop ----------------------------------------------------------------------------------------------


class Service:
    """Records what the reaper asks of the service; answers from what a test sets."""

    def __init__(self, pages: list[list[dict]], tasks: list[TaskSnapshot] = (), *, acts: bool = True) -> None:
        self.pages = pages
        self.tasks = list(tasks)
        self.acts = acts
        self.calls: list[tuple] = []
        self.after_refresh = "RUNNING"

    def live_jobs(self, start_key=None):
        index = start_key or 0
        self.calls.append(("live_jobs", start_key))
        return self.pages[index], (index + 1 if index + 1 < len(self.pages) else None)

    def refresh(self, item):
        self.calls.append(("refresh", item["job_key"]))
        return {**item, "state": self.after_refresh}

    def settle_stopping(self, item):
        self.calls.append(("settle", item["job_key"]))
        return {**item, "state": "STOPPED"}

    def reap(self, item, reason, why, *, overdue, now):
        self.calls.append(("reap", item["job_key"], reason, why, overdue, now))
        return self.acts

    def fail_stuck(self, item, reason, *, overdue):
        self.calls.append(("fail", item["job_key"], reason, overdue))
        return self.acts

    def running_tasks(self, token=None):
        self.calls.append(("running_tasks", token))
        return self.tasks, None

    def stop_unclaimed(self, snapshot, reason):
        self.calls.append(("stop_unclaimed", snapshot.task_arn, reason))
        return self.acts

    def refill_pool(self):
        self.calls.append(("refill_pool",))
        return {}

    def deregister_unused_task_definitions(self, now):
        self.calls.append(("deregister_unused", now))
        return 0


def calls(service: Service, kind: str) -> list[tuple]:
    return [c for c in service.calls if c[0] == kind]


def test_a_deadline_stop_re_checks_the_deadline_on_the_current_record():
    service = Service([[live(deadline=NOW - 1)]])

    report = run_reaper(service, SETTINGS, now=NOW)

    assert calls(service, "reap") == [
        ("reap", "t3sT_1234-5005", DEADLINE.reason, "Deadline", {"deadline": int(NOW)}, NOW)
    ]
    assert report["tasks_stopped_Deadline"] == 1 and report["jobs_checked"] == 1


def test_a_heartbeat_stop_re_checks_the_heartbeat_on_the_current_record():
    service = Service([[live(heartbeat_at=ago(1000))]])

    report = run_reaper(service, SETTINGS, now=NOW)

    assert calls(service, "reap") == [
        ("reap", "t3sT_1234-5005", HEARTBEAT_LOST.reason, "HeartbeatLost", {"heartbeat_at": ago(900)}, NOW)
    ]
    assert report["tasks_stopped_HeartbeatLost"] == 1


def test_a_stuck_job_is_failed_if_its_lease_is_still_over_on_the_current_record():
    service = Service([[launching()]])

    report = run_reaper(service, SETTINGS, now=NOW)

    assert calls(service, "fail") == [
        ("fail", "t3sT_1234-5005", STUCK.reason, {"launch_lease_until": int(NOW)})
    ]
    assert report["jobs_failed_stuck"] == 1


def test_a_job_that_changed_meanwhile_is_counted_as_skipped_each_time():
    service = Service([[launching(), live(deadline=NOW - 1, job_key="b-1")]], acts=False)

    report = run_reaper(service, SETTINGS, now=NOW)

    assert report["skipped_changed_meanwhile"] == 2
    assert "jobs_failed_stuck" not in report and "tasks_stopped_Deadline" not in report


def test_refreshes_and_settles_count_the_records_they_changed():
    quiet = live(updated_at=ago(QUIET_AFTER + 1))
    service = Service(
        [[quiet, {**quiet, "job_key": "b-1"}, live(job_key="c-1", state="STOPPING", updated_at=ago(100))]]
    )
    service.after_refresh = "RUNNING"  # the refreshes change nothing; the settle ends its job

    report = run_reaper(service, SETTINGS, now=NOW)

    assert calls(service, "refresh") == [("refresh", "t3sT_1234-5005"), ("refresh", "b-1")]
    assert calls(service, "settle") == [("settle", "c-1")]
    assert report["records_repaired"] == 1
    service = Service([[quiet, {**quiet, "job_key": "b-1"}]])
    service.after_refresh = "STOPPED"
    assert run_reaper(service, SETTINGS, now=NOW)["records_repaired"] == 2


def test_every_page_of_live_jobs_is_read():
    service = Service([[live()], [live(job_key="b-1")], [live(job_key="c-1")]])

    report = run_reaper(service, SETTINGS, now=NOW)

    assert calls(service, "live_jobs") == [("live_jobs", None), ("live_jobs", 1), ("live_jobs", 2)]
    assert report["jobs_checked"] == 3


def test_an_exhausted_budget_stops_the_work_but_still_reports():
    service = Service([[live(deadline=NOW - 1)]])

    report = run_reaper(service, SETTINGS, now=NOW, budget=0)

    assert calls(service, "reap") == [] and calls(service, "running_tasks") == []
    assert "jobs_checked" not in report
    assert report["seconds"] >= 0


def snapshot(arn: str, **fields) -> TaskSnapshot:
    values = {
        "task_arn": arn,
        "cluster_arn": "arn:aws:ecs:eu-west-1:123456789012:cluster/ci",
        "last_status": "RUNNING",
        "desired_status": "RUNNING",
        "started_by": None,
        "version": 1,
        "tags": {"managed-by": "fargate-ci"},
    }
    values.update(fields)
    return TaskSnapshot(**values)


def test_the_sweep_stops_only_running_tasks_of_ours_that_no_job_claims():
    service = Service(
        [[]],
        [
            snapshot("ours"),
            snapshot("stopped", last_status="STOPPED", desired_status="STOPPED"),
            snapshot("stopping", desired_status="STOPPED"),
            snapshot("theirs", tags={"managed-by": "someone-else"}),
        ],
    )

    report = run_reaper(service, SETTINGS, now=NOW)

    assert calls(service, "stop_unclaimed") == [("stop_unclaimed", "ours", "no CI job claims this task")]
    assert report["tasks_seen"] == 1
    assert report["tasks_stopped_NoJobRecord"] == 1


def test_a_task_some_job_claims_is_seen_but_not_counted_as_stopped():
    service = Service([[]], [snapshot("ours")], acts=False)

    report = run_reaper(service, SETTINGS, now=NOW)

    assert report["tasks_seen"] == 1
    assert "tasks_stopped_NoJobRecord" not in report


def test_the_reapers_metrics_name_what_it_did(monkeypatch):
    counted = Counter()
    monkeypatch.setattr(reaper, "count", lambda name, value=1, **d: counted.update([(name, d.get("reason"))]))
    service = Service([[launching(), live(job_key="b-1", deadline=NOW - 1)]], [snapshot("ours")])

    run_reaper(service, SETTINGS, now=NOW)

    assert counted == Counter(
        {
            ("JobsFailed", "StuckWithoutTask"): 1,
            ("TasksReaped", "Deadline"): 1,
            ("TasksReaped", "NoJobRecord"): 1,
        }
    )


def test_the_reaper_runs_at_the_real_time_when_not_told(monkeypatch):
    monkeypatch.setattr(reaper.clock, "now", lambda: NOW)
    service = Service([[live(deadline=NOW - 1)]])

    run_reaper(service, SETTINGS)

    assert calls(service, "reap")[0][-1] == NOW
