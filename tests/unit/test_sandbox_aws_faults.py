"""The sandbox's faults that make AWS's harder cases happen: no Spot capacity, the version-less notice."""

from __future__ import annotations

import pytest

from sandbox.__main__ import main
from sandbox.errors import UsageError
from sandbox.events import EventFaults, as_event_detail
from sandbox.faults import FaultRegistry, parse_fault


def test_spot_no_capacity_takes_no_options():
    assert parse_fault({"job_id": "5", "kind": "spot-no-capacity"}).params == {}
    with pytest.raises(UsageError, match="takes no parameter after"):
        parse_fault({"job_id": "5", "kind": "spot-no-capacity", "after": 1})


def test_spot_may_send_its_notice_without_version():
    fault = parse_fault({"job_id": "5", "kind": "spot", "after": 1, "notice": 2, "versionless": True})
    assert fault.params == {"after": 1.0, "notice": 2.0, "versionless": True}
    with pytest.raises(UsageError, match="true or false"):
        parse_fault({"job_id": "5", "kind": "spot", "after": 1, "notice": 2, "versionless": "yes"})


def test_spot_no_capacity_is_consulted_on_its_own_and_a_jobs_own_is_used_up():
    registry = FaultRegistry()
    registry.arm(parse_fault({"job_id": "5", "kind": "spot-no-capacity"}))
    registry.arm(parse_fault({"job_id": "5", "kind": "exit", "after": 1, "code": 3}))

    assert registry.take_kind("5", "spot-no-capacity") is not None
    assert registry.take_kind("5", "spot-no-capacity") is None
    assert [f.kind for f in registry.take("5")] == ["exit"]


def test_a_spot_no_capacity_for_every_job_stays_armed_and_never_reaches_a_task():
    registry = FaultRegistry()
    registry.arm(parse_fault({"job_id": "*", "kind": "spot-no-capacity"}))

    assert registry.take_kind("9", "spot-no-capacity") is not None
    assert registry.take_kind("10", "spot-no-capacity") is not None
    assert registry.take("9") == []


def detail(status: str, version: int, **extra) -> dict:
    return {"lastStatus": status, "version": version, "desiredStatus": "RUNNING", **extra}


def test_the_versionless_notice_has_no_version_and_comes_again_after_the_next_event():
    faults = EventFaults(versionless_notice=True)
    notice = detail("RUNNING", 5, desiredStatus="STOPPED", stopCode="TerminationNotice")

    now = faults.apply(notice, final=False)
    after = faults.apply(detail("DEACTIVATING", 6), final=False)

    assert now == [{k: v for k, v in notice.items() if k != "version"}]
    assert [d["lastStatus"] for d in after] == ["DEACTIVATING", "RUNNING"]
    assert "version" not in after[1]
    assert faults.apply(detail("STOPPING", 7), final=False) == [detail("STOPPING", 7)]


def test_events_name_the_eni_attachment_eni_and_leave_others_alone():
    api = {
        "taskArn": "arn",
        "attachments": [
            {"type": "ElasticNetworkInterface", "details": []},
            {"type": "ServiceConnect", "details": []},
        ],
    }

    event = as_event_detail(api)

    assert [a["type"] for a in event["attachments"]] == ["eni", "ServiceConnect"]
    assert api["attachments"][0]["type"] == "ElasticNetworkInterface"  # the task's own state is untouched


def test_the_cli_arms_the_new_faults(monkeypatch, capsys):
    armed = []
    monkeypatch.setattr("sandbox.control.arm_fault", lambda directory, body: armed.append(body) or body)

    assert main(["fault", "--dir", "/nonexistent", "--job-id", "5", "spot-no-capacity"]) == 0
    assert (
        main(
            [
                "fault",
                "--dir",
                "/x",
                "--job-id",
                "5",
                "spot",
                "--after",
                "1",
                "--notice",
                "2",
                "--versionless",
            ]
        )
        == 0
    )

    assert armed == [
        {"job_id": "5", "kind": "spot-no-capacity"},
        {"job_id": "5", "kind": "spot", "after": 1.0, "notice": 2.0, "versionless": True},
    ]
