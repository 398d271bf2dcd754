"""PUT /tasks/{task_id}/host-key: a task publishes its own host key, signed as itself (its task role's
session is its task id); the first key is bound to the job, the driver pins what GET /jobs shows."""

from __future__ import annotations

import json

import pytest

from tests.api.conftest import ACCOUNT, OWNER, TASK_ROLE, as_caller, job_body, new_keys, post, table_key


def task_session(task_id: str, role: str = TASK_ROLE, account: str = ACCOUNT) -> str:
    """The caller ARN API Gateway sees for a task's signed call (ECS names the session after the task)."""
    return f"arn:aws:sts::{account}:assumed-role/{role}/{task_id}"


def publish(client, task_id: str, host_key: str, caller: str | None = None):
    return client.http.put(
        f"/tasks/{task_id}/host-key",
        headers={"Content-Type": "application/json", **as_caller(caller or task_session(task_id))},
        body=json.dumps({"host_key": host_key}),
    )


@pytest.fixture
def job(client, aws):
    view = json.loads(post(client, job_body()).body)
    return {**view, "task_id": view["task_arn"].rsplit("/", 1)[1]}


def test_the_task_publishes_its_host_key_once_and_learns_the_ca_and_its_principal(client, aws, job):
    host_key, _ = new_keys()

    response = publish(client, job["task_id"], host_key)

    assert response.status_code == 200, response.body
    answer = json.loads(response.body)
    assert answer["principal"] == job["task_id"]
    [ca_line] = answer["user_ca_keys"]
    assert ca_line.startswith("ecdsa-sha2-nistp256 ")
    # The driver pins what the job view shows.
    view = json.loads(client.http.get(f"/jobs/{job['job_key']}").body)
    assert view["host_key"] == host_key
    # Publishing the same key again (a retry whose answer was lost) is fine.
    assert publish(client, job["task_id"], host_key).status_code == 200


def test_a_second_different_host_key_is_refused_and_the_first_stays(client, aws, job, caplog):
    first, _ = new_keys()
    second, _ = new_keys()
    assert publish(client, job["task_id"], first).status_code == 200

    response = publish(client, job["task_id"], second)

    assert response.status_code == 409
    assert json.loads(response.body)["error"] == "HostKeyConflict"
    assert aws.table.get_item(Key=table_key(job["job_key"]))["Item"]["host_key"] == first
    assert "a second, different host key for a task was refused" in caplog.text


@pytest.mark.parametrize(
    "caller",
    [
        OWNER,  # the runner manager
        task_session("0" * 32),  # another task
        task_session("{task}", role="other-role"),  # another role's session named like the task
        task_session("{task}", account="999999999999"),  # the task role's name in another account
    ],
)
def test_only_the_task_itself_may_publish_its_host_key(client, aws, job, caller):
    host_key, _ = new_keys()

    response = publish(client, job["task_id"], host_key, caller=caller.replace("{task}", job["task_id"]))

    assert response.status_code == 403, response.body
    assert "host_key" not in aws.table.get_item(Key=table_key(job["job_key"]))["Item"]


def test_a_task_we_did_not_start_cannot_bind_a_key(client, aws, job):
    stranger = aws.ecs.run_task(
        cluster="fargate-ci",
        taskDefinition="ci-coordinator",
        launchType="FARGATE",
        startedBy="someone-else",
        networkConfiguration={
            "awsvpcConfiguration": {
                "subnets": [aws.ec2.describe_subnets()["Subnets"][0]["SubnetId"]],
                "securityGroups": [aws.ec2.describe_security_groups()["SecurityGroups"][0]["GroupId"]],
            }
        },
    )["tasks"][0]
    task_id = stranger["taskArn"].rsplit("/", 1)[1]
    host_key, _ = new_keys()

    response = publish(client, task_id, host_key)

    assert response.status_code == 404
    assert "host_key" not in aws.table.get_item(Key=table_key(job["job_key"]))["Item"]


def test_a_malformed_key_or_task_id_is_400(client, aws, job):
    _, private = new_keys()
    assert publish(client, job["task_id"], private).status_code == 400  # never a private key
    response = publish(client, "not-a-task", "ssh-ed25519 AAAA")
    assert response.status_code == 400
