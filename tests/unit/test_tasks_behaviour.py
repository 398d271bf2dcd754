"""Reading a task as ECS reports it (DescribeTasks or an event's detail) into what the orchestrator keeps:
every field, its defaults when ECS leaves it out, and which container and attachment count."""

from __future__ import annotations

from datetime import UTC, datetime

from chalicelib.states import JobState
from chalicelib.tasks import TaskSnapshot, snapshot_from_ecs

ARN = "arn:aws:ecs:eu-west-1:123456789012:task/ci/0123456789abcdef0123456789abcdef"


def test_every_field_ecs_reports_is_read():
    snapshot = snapshot_from_ecs(
        {
            "taskArn": ARN,
            "clusterArn": "arn:aws:ecs:eu-west-1:123456789012:cluster/ci",
            "lastStatus": "STOPPED",
            "desiredStatus": "STOPPED",
            "startedBy": "gl-key",
            "version": "7",
            "stopCode": "EssentialContainerExited",
            "stoppedReason": "Essential container in task exited",
            "capacityProviderName": "FARGATE_SPOT",
            "launchType": "FARGATE",
            "cpu": "1024",
            "memory": "2048",
            "createdAt": "2026-11-29T20:00:00.000Z",
            "startedAt": datetime(2026, 11, 29, 20, 0, 30, tzinfo=UTC),
            "stoppingAt": "2026-11-29T20:05:00.000Z",
            "stoppedAt": "2026-11-29T20:05:30.000Z",
            "containers": [{"name": "ci-coordinator", "exitCode": 3, "reason": "OOM"}],
            "attachments": [
                {
                    "type": "ElasticNetworkInterface",
                    "details": [
                        {"name": "subnetId", "value": "subnet-a"},
                        {"name": "networkInterfaceId", "value": "eni-9"},
                        {"name": "privateIPv4Address", "value": "10.0.0.9"},
                    ],
                }
            ],
            "tags": [{"key": "managed-by", "value": "fargate-ci"}, {"key": "empty"}, {"value": "no key"}],
        },
        "ci-coordinator",
    )

    assert snapshot == TaskSnapshot(
        task_arn=ARN,
        cluster_arn="arn:aws:ecs:eu-west-1:123456789012:cluster/ci",
        last_status="STOPPED",
        desired_status="STOPPED",
        started_by="gl-key",
        version=7,
        stop_code="EssentialContainerExited",
        stopped_reason="Essential container in task exited",
        exit_code=3,
        container_reason="OOM",
        private_address="10.0.0.9",
        eni_id="eni-9",
        capacity_provider="FARGATE_SPOT",
        cpu=1024,
        memory=2048,
        created_at=datetime(2026, 11, 29, 20, 0, 0, tzinfo=UTC).timestamp(),
        started_at=datetime(2026, 11, 29, 20, 0, 30, tzinfo=UTC).timestamp(),
        stopping_at=datetime(2026, 11, 29, 20, 5, 0, tzinfo=UTC).timestamp(),
        stopped_at=datetime(2026, 11, 29, 20, 5, 30, tzinfo=UTC).timestamp(),
        tags={"managed-by": "fargate-ci", "empty": ""},
        container_known=True,
    )
    assert snapshot.job_state() == JobState.STOPPED


def test_a_bare_task_takes_the_defaults():
    snapshot = snapshot_from_ecs({"taskArn": ARN}, "ci-coordinator")

    assert snapshot == TaskSnapshot(
        task_arn=ARN,
        cluster_arn="",
        last_status="PROVISIONING",
        desired_status="RUNNING",
        started_by=None,
        version=None,
        container_known=False,
    )
    assert snapshot.tags == {}
    assert snapshot.job_state() == JobState.PROVISIONING


def test_empty_strings_from_ecs_mean_nothing():
    snapshot = snapshot_from_ecs(
        {
            "taskArn": ARN,
            "stopCode": "",
            "stoppedReason": "",
            "capacityProviderName": "",
            "launchType": "",
            "cpu": "",
            "memory": None,
            "containers": [{"name": "ci-coordinator", "reason": ""}],
        },
        "ci-coordinator",
    )

    assert (snapshot.stop_code, snapshot.stopped_reason, snapshot.capacity_provider) == (None, None, None)
    assert (snapshot.cpu, snapshot.memory, snapshot.container_reason, snapshot.exit_code) == (
        None,
        None,
        None,
        None,
    )
    assert snapshot.container_known is True


def test_the_launch_type_stands_in_for_a_capacity_provider():
    assert snapshot_from_ecs({"taskArn": ARN, "launchType": "FARGATE"}, "c").capacity_provider == "FARGATE"


def test_a_version_of_zero_is_a_version():
    assert snapshot_from_ecs({"taskArn": ARN, "version": 0}, "c").version == 0


def test_only_our_container_by_name_counts_not_a_sidecar_or_the_first():
    task = {
        "taskArn": ARN,
        "containers": [
            {"name": "sidecar", "exitCode": 137, "reason": "killed"},
            {"name": "ci-coordinator", "exitCode": 0},
        ],
    }

    snapshot = snapshot_from_ecs(task, "ci-coordinator")
    assert (snapshot.exit_code, snapshot.container_reason, snapshot.container_known) == (0, None, True)

    other = snapshot_from_ecs(task, "runner")
    assert (other.exit_code, other.container_reason, other.container_known) == (None, None, False)


def test_an_exit_code_of_zero_is_kept():
    task = {"taskArn": ARN, "containers": [{"name": "c", "exitCode": 0}]}

    assert snapshot_from_ecs(task, "c").exit_code == 0


def test_only_the_eni_attachment_gives_the_address_whichever_name_ecs_uses():
    for kind in ("ElasticNetworkInterface", "eni"):
        task = {
            "taskArn": ARN,
            "attachments": [
                {
                    "type": "Service Connect",
                    "details": [{"name": "privateIPv4Address", "value": "192.0.2.1"}],
                },
                {
                    "type": kind,
                    "details": [
                        {"name": "privateIPv4Address", "value": "10.0.0.5"},
                        {"name": "networkInterfaceId", "value": "eni-5"},
                    ],
                },
                {"type": kind, "details": [{"name": "privateIPv4Address", "value": "10.0.0.6"}]},
            ],
        }

        snapshot = snapshot_from_ecs(task, "c")

        assert (snapshot.private_address, snapshot.eni_id) == ("10.0.0.5", "eni-5")


def test_an_eni_attachment_without_details_gives_no_address():
    snapshot = snapshot_from_ecs({"taskArn": ARN, "attachments": [{"type": "eni"}]}, "c")

    assert (snapshot.private_address, snapshot.eni_id) == (None, None)


def test_a_stopped_task_that_never_started_failed_its_job_unless_we_know_it_ran():
    stopped = snapshot_from_ecs({"taskArn": ARN, "lastStatus": "STOPPED"}, "c")

    assert stopped.job_state() == JobState.FAILED
    assert stopped.job_state(started=True) == JobState.STOPPED
    failed_to_start = snapshot_from_ecs(
        {"taskArn": ARN, "lastStatus": "STOPPED", "stopCode": "TaskFailedToStart", "startedAt": 5}, "c"
    )
    assert failed_to_start.job_state(started=True) == JobState.FAILED
