"""POST/GET/DELETE /jobs against moto: idempotency, conflicts, validation, stops, refreshes."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import threading

import pytest

from chalicelib.certs import ca_public_line
from chalicelib.ecs import client_token  # noqa: F401  (kept: documents where the token comes from)
from chalicelib.jobs import record_key
from tests.api.conftest import (
    CLUSTER,
    OWNER,
    STRANGER,
    delete,
    heartbeat,
    job_body,
    new_keys,
    post,
    table_key,
    tasks,
)


def test_post_starts_one_task_with_tags_started_by_and_nothing_secret_in_its_environment(client, aws):
    body = job_body()
    response = post(client, body)

    assert response.status_code == 201, response.body
    job = json.loads(response.body)
    assert job["job_key"] == "t3sT_1234-5005"
    assert job["state"] == "PROVISIONING"
    assert job["task_arn"] in tasks(aws)
    task = aws.ecs.describe_tasks(cluster=CLUSTER, tasks=[job["task_arn"]], include=["TAGS"])["tasks"][0]
    assert task["startedBy"] == "gl-" + record_key(OWNER, "t3sT_1234-5005")
    tags = {t["key"]: t["value"] for t in task["tags"]}
    assert tags["gitlab-ci:job-id"] == "5005"
    assert tags["gitlab-ci:project-id"] == "42"
    assert tags["gitlab-ci:pipeline-id"] == "1001"
    assert tags["gitlab-ci:runner"] == "t3sT_1234"
    assert tags["gitlab-ci:deadline"].endswith("Z")
    env = {e["name"]: e["value"] for e in task["overrides"]["containerOverrides"][0]["environment"]}
    # Only where to publish its host key: the task makes its own keys; jobs log in with certificates.
    assert env == {"FARGATE_CI_API_URL": "https://api.example/api"}
    assert "PRIVATE KEY" not in json.dumps(task, default=str)


def test_post_answers_a_certificate_for_the_jobs_key_valid_for_its_task_only_until_its_deadline(
    client, aws, tmp_path
):
    body = job_body()
    job = json.loads(post(client, body).body)

    certificate = job["ssh_certificate"]
    assert certificate.startswith("ssh-ed25519-cert-v01@openssh.com ")
    (tmp_path / "key-cert.pub").write_text(certificate + "\n")
    shown = subprocess.run(
        ["ssh-keygen", "-L", "-f", str(tmp_path / "key-cert.pub")], capture_output=True, text=True, check=True
    ).stdout
    task_id = job["task_arn"].rsplit("/", 1)[1]
    principals = shown.split("Principals:")[1].split("Critical Options:")[0].split()
    assert principals == [task_id]
    assert "Critical Options: (none)" in shown and "Extensions: (none)" in shown  # no pty, no forwarding
    assert "Signing CA: ECDSA" in shown and "user certificate" in shown
    # It certifies exactly the job's client key.
    client_key = body["ssh_public_key"].split()[1]
    assert _certified_key(certificate) == base64.b64decode(client_key)[-32:]
    valid_to = shown.split("Valid: from ")[1].split(" to ")[1].split()[0]
    assert valid_to == job["deadline"].removesuffix("Z")[:19]
    # The CA's public key KMS holds verifies it (the private half never left KMS).
    ca = aws.kms.get_public_key(KeyId=aws.ca_key)["PublicKey"]
    assert ca_public_line(ca).split()[1] in [line.split()[1] for line in _ca_lines(shown, ca)]


def _certified_key(certificate: str) -> bytes:
    blob = base64.b64decode(certificate.split()[1])
    at = 0
    for _ in range(2):  # the type, then the nonce
        length = int.from_bytes(blob[at : at + 4], "big")
        at += 4 + length
    return blob[at + 4 : at + 36]


def _ca_lines(shown: str, spki: bytes) -> list[str]:
    # ssh-keygen shows the CA's fingerprint; compare it with the fingerprint of KMS's public key.
    import hashlib

    fingerprint = base64.b64encode(hashlib.sha256(base64.b64decode(ca_public_line(spki).split()[1])).digest())
    assert fingerprint.decode().rstrip("=") in shown
    return [ca_public_line(spki)]


def test_the_table_and_the_answer_hold_no_private_key(client, aws):
    response = post(client, job_body())

    assert "PRIVATE KEY" not in response.body.decode()
    items = aws.table.scan()["Items"]
    assert len(items) == 1
    assert "PRIVATE KEY" not in json.dumps(items, default=str)


def test_repeating_the_same_request_returns_the_same_job_and_starts_nothing(client, aws):
    body = job_body()
    first = json.loads(post(client, body).body)

    again = post(client, body)

    assert again.status_code == 200
    assert json.loads(again.body)["task_arn"] == first["task_arn"]
    assert tasks(aws) == [first["task_arn"]]


@pytest.fixture
def thread_local_requests():
    """What `chalice local` does: make current_request thread-local so parallel requests do not mix. The app
    and Chalice's class are put back afterwards, so no other test runs a rebased Chalice."""
    from chalice.local import CustomLocalChalice, LocalChalice

    import app as app_module

    bases, cls = CustomLocalChalice.__bases__, app_module.app.__class__
    # chalice.test swaps `os.environ` for a dict copy around each invocation and back; concurrent invocations
    # can leave a copy in place, which later tests would read (and their child processes would not see).
    environ = os.environ
    CustomLocalChalice.__bases__ = (LocalChalice, cls)
    app_module.app.__class__ = CustomLocalChalice
    try:
        yield
    finally:
        app_module.app.__class__ = cls
        CustomLocalChalice.__bases__ = bases
        os.environ = environ  # noqa: B003 (putting the real mapping back, not clearing it)


def test_concurrent_posts_for_one_job_start_one_task(client, aws, thread_local_requests):
    body = job_body()
    answers: list = []

    def call():
        answers.append(post(client, body))

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200] * 5 + [201]
    assert len({json.loads(a.body)["task_arn"] for a in answers}) == 1
    assert len(tasks(aws)) == 1


def test_same_job_with_other_parameters_while_live_is_a_conflict(client, aws):
    post(client, job_body())

    response = post(client, job_body(task_definition="ci-coordinator-large"))

    assert response.status_code == 409
    assert json.loads(response.body)["error"] == "JobConflict"
    assert len(tasks(aws)) == 1


def test_a_new_attempt_after_cleanup_starts_a_fresh_task(client, aws):
    first = json.loads(post(client, job_body()).body)
    delete(client, first["job_key"])
    aws.table.update_item(
        Key=table_key(first["job_key"]),
        UpdateExpression="SET #s = :s, stop_code = :c, reaped = :r",
        ExpressionAttributeNames={"#s": "state"},
        ExpressionAttributeValues={":s": "STOPPED", ":c": "UserInitiated", ":r": "HeartbeatLost"},
    )

    response = post(client, job_body())  # the runner's prepare retry: new keys

    assert response.status_code == 201
    second = json.loads(response.body)
    assert second["attempt"] == 2
    assert second["task_arn"] != first["task_arn"]
    assert second["state"] == "PROVISIONING" and second["stop_code"] is None
    item = aws.table.get_item(Key=table_key(first["job_key"]))["Item"]
    assert "reaped" not in item and "stop_requested" not in item and item["live"] == "1"


BAD_INPUTS = [
    ("cpu", {"cpu": "512", "memory": 1024}),
    ("cpu", {"cpu": True, "memory": 1024}),
    ("memory", {"cpu": 512}),
    ("cpu", {"cpu": 300, "memory": 1024}),
    ("memory", {"cpu": 256, "memory": 4096}),
    ("cpu", {"cpu": 8192, "memory": 16384}),
    ("task_definition", {"task_definition": "ci-other"}),
    ("task_definition", {"task_definition": "../../etc"}),
    ("ssh_public_key", {"ssh_public_key": None}),
    ("ssh_public_key", {"ssh_public_key": "ssh-rsa AAAAB3NzaC1yc2E= x"}),
    ("ssh_host_key", {"ssh_host_key": "-----BEGIN OPENSSH PRIVATE KEY-----"}),  # no longer accepted
    ("job_id", {"job_id": "12a"}),
    ("job_id", {"job_id": 12}),
    ("runner", {"runner": "way-too-long-runner-token"}),
    ("timeout_seconds", {"timeout_seconds": "1h"}),
    ("platform_version", {"platform_version": "latest;rm"}),
    ("job_name", {"job_name": "x\n" * 3}),
    ("surprise", {"surprise": 1}),
]


@pytest.mark.parametrize(
    ("field", "change"), BAD_INPUTS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_INPUTS)]
)
def test_bad_input_is_a_400_naming_the_field_with_no_task_and_no_record(client, aws, field, change):
    body = job_body()
    body.update(change)
    body = {k: v for k, v in body.items() if v is not None}

    response = post(client, body)

    assert response.status_code == 400, response.body
    error = json.loads(response.body)
    assert error["error"] == "InvalidInput"
    assert error["field"] == field
    assert field in error["message"]
    assert tasks(aws) == []
    assert aws.table.scan()["Items"] == []


@pytest.mark.parametrize(
    ("raw", "words"),
    [(b"{not json", "not valid JSON"), (b"[1]", "JSON object"), (b"{" + b" " * 20000 + b"}", "larger than")],
)
def test_malformed_bodies_are_400(client, aws, raw, words):
    response = post(client, None, raw=raw)

    assert response.status_code == 400
    assert words in json.loads(response.body)["message"]
    assert tasks(aws) == []


def test_delete_stops_the_task_and_is_idempotent(client, aws):
    job = json.loads(post(client, job_body()).body)

    first = delete(client, job["job_key"])
    second = delete(client, job["job_key"])

    assert first.status_code == 200
    assert json.loads(first.body)["state"] == "STOPPING"
    assert second.status_code == 200
    task = aws.ecs.describe_tasks(cluster=CLUSTER, tasks=[job["task_arn"]])["tasks"][0]
    assert task["lastStatus"] == "STOPPED"
    assert task["stoppedReason"] == "CI job cleanup"


def test_delete_of_a_job_that_never_got_a_task_answers_with_its_state(client, aws):
    aws.table.put_item(
        Item={
            **table_key("t3sT_1234-77"),
            "job_key": "t3sT_1234-77",
            "attempt": 1,
            "state": "PROVISIONING",
            "live": "1",
            "owner": OWNER,
            "deadline": 2**31,
            "launch_lease_until": 0,
        }
    )

    response = delete(client, "t3sT_1234-77")

    assert response.status_code == 200
    job = json.loads(response.body)
    assert job["state"] == "FAILED"
    assert "Cancelled before a task was started" in job["stopped_reason"]


def test_unknown_job_is_404_and_a_malformed_key_is_400(client, aws):
    assert client.http.get("/jobs/t3sT_1234-999").status_code == 404
    assert delete(client, "t3sT_1234-999").status_code == 404
    assert client.http.get("/jobs/not%20a%20key").status_code == 400


def test_get_refreshes_a_stale_record_from_describe_tasks(client, aws, monkeypatch):
    monkeypatch.setenv("JOB_REFRESH_AFTER", "0")
    from chalicelib import factory

    factory.reset()
    job = json.loads(post(client, job_body()).body)
    assert job["state"] == "PROVISIONING"

    running = json.loads(client.http.get(f"/jobs/{job['job_key']}").body)
    assert running["state"] == "RUNNING"  # moto reports the task RUNNING; no event told us
    assert running["address"].startswith("10.")

    aws.ecs.stop_task(cluster=CLUSTER, task=job["task_arn"], reason="Essential container in task exited")
    stopped = json.loads(client.http.get(f"/jobs/{job['job_key']}").body)
    assert stopped["state"] in ("STOPPED", "FAILED")
    assert stopped["stopped_reason"] == "Essential container in task exited"
    item = aws.table.get_item(Key=table_key(job["job_key"]))["Item"]
    assert item["last_status"] == "STOPPED"  # written back
    assert "live" not in item


def test_health(client):
    response = client.http.get("/health")
    assert response.status_code == 200
    assert json.loads(response.body) == {"status": "ok"}


def test_keys_differ_per_call():
    assert new_keys() != new_keys()


def test_another_callers_job_is_unreadable_unstoppable_and_cannot_be_taken_over(client, aws):
    from chalicelib import factory
    from chalicelib.errors import JobNotFound
    from chalicelib.jobs import parse_job_request

    service = factory.job_service()
    settings = factory.current_settings()
    job, _ = service.start(parse_job_request(job_body(), settings, None), OWNER)

    with pytest.raises(JobNotFound):
        service.get(job["job_key"], STRANGER)
    with pytest.raises(JobNotFound):
        service.stop(job["job_key"], STRANGER, 1, "mine now")
    with pytest.raises(JobNotFound):
        service.heartbeat(job["job_key"], STRANGER, 1)
    theirs, created = service.start(parse_job_request(job_body(), settings, None), STRANGER)
    assert created and theirs["task_arn"] != job["task_arn"]  # their own record and task
    assert (
        aws.ecs.describe_tasks(cluster=CLUSTER, tasks=[job["task_arn"]])["tasks"][0]["lastStatus"]
        == "RUNNING"
    )
    assert service.get(job["job_key"], OWNER)["task_arn"] == job["task_arn"]


def test_heartbeat_records_the_time_and_answers_the_job(client, aws):
    job = json.loads(post(client, job_body()).body)
    aws.table.update_item(
        Key=table_key(job["job_key"]),
        UpdateExpression="SET heartbeat_at = :old",
        ExpressionAttributeValues={":old": "2000-01-01T00:00:00.000Z"},
    )

    response = heartbeat(client, job["job_key"], ssh_ready_seconds=1.25)

    assert response.status_code == 200
    assert json.loads(response.body)["heartbeat_at"] > "2026"
    assert float(aws.table.get_item(Key=table_key(job["job_key"]))["Item"]["ssh_ready_seconds"]) == 1.25
    # Only the first report counts (the start-latency metric): a later one does not overwrite it.
    assert heartbeat(client, job["job_key"], ssh_ready_seconds=9.5).status_code == 200
    assert float(aws.table.get_item(Key=table_key(job["job_key"]))["Item"]["ssh_ready_seconds"]) == 1.25
    bad = heartbeat(client, job["job_key"], ssh_ready_seconds="x")
    assert bad.status_code == 400
