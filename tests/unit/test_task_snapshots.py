"""TaskSnapshot parsing of both shapes ECS reports a task in: AWS's published events and DescribeTasks."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from chalicelib.states import JobState, state_for_task, statuses_up_to
from chalicelib.tasks import snapshot_from_ecs

AWS = Path(__file__).resolve().parents[1] / "fixtures" / "aws"


def aws_event(name: str) -> dict:
    return json.loads((AWS / name).read_text())


def test_awss_running_event_gives_the_address_from_its_eni_attachment():
    snapshot = snapshot_from_ecs(aws_event("task-state-change-running.json")["detail"], "FargateApp")

    assert snapshot.private_address == "10.0.0.139"
    assert snapshot.eni_id == "eni-abcd1234"
    assert snapshot.version == 4
    assert (snapshot.cpu, snapshot.memory) == (256, 512)  # strings in the event
    assert snapshot.started_at == datetime(2020, 1, 23, 17, 57, 58, 103000, tzinfo=UTC).timestamp()
    assert snapshot.capacity_provider == "FARGATE"  # launchType when no capacity provider is named
    assert snapshot.job_state() == JobState.RUNNING


def test_describe_tasks_names_the_eni_differently_and_gives_datetimes():
    detail = aws_event("task-state-change-running.json")["detail"]
    api_task = {
        **detail,
        "attachments": [{**detail["attachments"][0], "type": "ElasticNetworkInterface"}],
        "startedAt": datetime(2020, 1, 23, 17, 57, 58, 103000, tzinfo=UTC),
    }

    snapshot = snapshot_from_ecs(api_task, "FargateApp")

    assert snapshot.private_address == "10.0.0.139"
    assert snapshot.started_at == snapshot_from_ecs(detail, "FargateApp").started_at


def test_an_attachment_of_another_type_gives_no_address():
    detail = aws_event("task-state-change-running.json")["detail"]
    other = {**detail, "attachments": [{**detail["attachments"][0], "type": "ServiceConnect"}]}

    assert snapshot_from_ecs(other, "FargateApp").private_address is None


def test_awss_termination_notice_has_no_version_and_keeps_the_job_running():
    snapshot = snapshot_from_ecs(aws_event("spot-termination-notice.json")["detail"], "ci-coordinator")

    assert snapshot.version is None
    assert snapshot.stop_code == "TerminationNotice"
    assert snapshot.stopped_reason == "Your Spot Task was interrupted."
    assert snapshot.desired_status == "STOPPED"
    assert snapshot.job_state() == JobState.RUNNING
    assert not snapshot.container_known  # no containers: the exit code is unknown, not absent


def test_a_sidecars_exit_code_is_never_taken_for_ours():
    detail = {
        **aws_event("task-state-change-running.json")["detail"],
        "lastStatus": "STOPPED",
        "containers": [{"name": "log-router", "exitCode": 0, "reason": "done"}],
    }

    snapshot = snapshot_from_ecs(detail, "ci-coordinator")

    assert snapshot.exit_code is None
    assert snapshot.container_reason is None
    assert not snapshot.container_known


def test_our_containers_exit_code_is_taken_among_others():
    detail = {
        **aws_event("task-state-change-running.json")["detail"],
        "containers": [{"name": "log-router", "exitCode": 0}, {"name": "ci-coordinator", "exitCode": 3}],
    }

    assert snapshot_from_ecs(detail, "ci-coordinator").exit_code == 3


def test_a_stopped_task_that_ran_stopped_the_job_even_without_started_at():
    assert state_for_task("STOPPED", stop_code="EssentialContainerExited", started=True) == JobState.STOPPED
    assert state_for_task("STOPPED", stop_code="UserInitiated", started=False) == JobState.FAILED
    assert state_for_task("STOPPED", stop_code="TaskFailedToStart", started=True) == JobState.FAILED


def test_ecs_statuses_only_ever_move_forward():
    assert statuses_up_to("PROVISIONING") == ["PROVISIONING"]
    assert "DEACTIVATING" in statuses_up_to("STOPPING")
    assert "STOPPING" not in statuses_up_to("DEACTIVATING")
    assert statuses_up_to("STOPPED")[-1] == "STOPPED" and len(statuses_up_to("STOPPED")) == 8
    with pytest.raises(ValueError, match="EXPLODED"):
        statuses_up_to("EXPLODED")
