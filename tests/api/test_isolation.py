"""Tenant isolation at the API (issue 12): callers only ever see and touch their own jobs, a call names the
attempt it is about, and no malformed body gets past validation (no 5xx, no state change)."""

from __future__ import annotations

import json
import urllib.parse

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chalicelib.callers import owner_of
from chalicelib.errors import Forbidden
from chalicelib.jobs import record_key
from tests.api.conftest import (
    ACCOUNT,
    CLUSTER,
    OWNER,
    REGION,
    STRANGER,
    as_caller,
    delete,
    heartbeat,
    job_body,
    post,
    table_key,
)

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
KEY = "t3sT_1234-5005"
ROLE = f"arn:aws:sts::{ACCOUNT}:assumed-role/ci-runner"


def session(name: str, role: str = ROLE) -> str:
    """An assumed-role session's ARN, as API Gateway reports the caller (botocore names each session)."""
    return f"{role}/{name}"


def post_as(client, caller: str, body: dict):
    return client.http.post(
        "/jobs", headers={"Content-Type": "application/json", **as_caller(caller)}, body=json.dumps(body)
    )


def get_as(client, caller: str, key: str = KEY):
    return client.http.get(f"/jobs/{key}", headers=as_caller(caller))


def ecs_tasks(aws) -> dict[str, tuple[str, str]]:
    """Every task of the cluster, running or stopped: ARN -> (lastStatus, desiredStatus)."""
    arns = aws.ecs.list_tasks(cluster=CLUSTER)["taskArns"]
    arns += aws.ecs.list_tasks(cluster=CLUSTER, desiredStatus="STOPPED")["taskArns"]
    if not arns:
        return {}
    described = aws.ecs.describe_tasks(cluster=CLUSTER, tasks=sorted(set(arns)))["tasks"]
    return {t["taskArn"]: (t["lastStatus"], t["desiredStatus"]) for t in described}


def world(aws) -> tuple[list, dict]:
    """Everything a request could change: every record, whole, and every task."""
    items = sorted(aws.table.scan(ConsistentRead=True)["Items"], key=lambda i: i["pk"])
    return json.loads(json.dumps(items, default=str)), ecs_tasks(aws)


def error_of(response) -> str:
    return json.loads(response.body)["error"]


# --- callers are isolated ---------------------------------------------------------------------------------


def test_a_stranger_posting_the_owners_very_request_gets_its_own_record_and_task(client, aws):
    body = job_body()
    mine = json.loads(post(client, body).body)

    theirs = post_as(client, STRANGER, body)  # same runner, job id, keys: only the caller differs

    assert theirs.status_code == 201, theirs.body
    assert json.loads(theirs.body)["task_arn"] != mine["task_arn"]  # not handed the owner's task back
    records = aws.table.scan()["Items"]
    assert sorted(r["owner"] for r in records) == sorted([OWNER, STRANGER])
    assert {r["job_key"] for r in records} == {KEY}
    assert json.loads(get_as(client, OWNER).body)["task_arn"] == mine["task_arn"]
    assert ecs_tasks(aws)[mine["task_arn"]] == ("RUNNING", "RUNNING")


def test_a_stranger_who_comes_first_does_not_block_the_owner(client, aws):
    first = post_as(client, STRANGER, job_body())
    assert first.status_code == 201

    mine = post(client, job_body())  # other keys: a different request for the same job key

    assert mine.status_code == 201, mine.body  # not 409: the stranger's record is not the owner's
    view = json.loads(mine.body)
    assert view["attempt"] == 1 and view["task_arn"] != json.loads(first.body)["task_arn"]
    assert len(ecs_tasks(aws)) == 2


def test_get_delete_and_heartbeat_of_another_callers_job_are_404_and_change_nothing(client, aws):
    post(client, job_body())
    before = world(aws)

    answers = [
        get_as(client, STRANGER),
        delete(client, KEY, attempt=1, caller=STRANGER, reason="mine now"),
        heartbeat(client, KEY, attempt=1, caller=STRANGER),
        heartbeat(client, KEY, attempt=2, caller=STRANGER),  # not 409: nothing of it may be revealed
        delete(client, KEY, attempt=7, caller=STRANGER),
    ]

    assert [a.status_code for a in answers] == [404] * 5
    assert {error_of(a) for a in answers} == {"JobNotFound"}
    assert world(aws) == before


def test_an_assumed_role_keeps_its_jobs_across_sessions(client, aws):
    created = post_as(client, session("botocore-session-1"), job_body())
    assert created.status_code == 201
    arn = json.loads(created.body)["task_arn"]

    assert get_as(client, session("botocore-session-2")).status_code == 200
    assert heartbeat(client, KEY, attempt=1, caller=session("agent-restarted")).status_code == 200
    assert (
        get_as(client, session("x", role=f"arn:aws:sts::{ACCOUNT}:assumed-role/other-role")).status_code
        == 404
    )
    assert get_as(client, OWNER).status_code == 404  # an IAM user is not the role
    stopped = delete(client, KEY, attempt=1, caller=session("cleanup-session"))

    assert stopped.status_code == 200 and json.loads(stopped.body)["state"] == "STOPPING"
    assert ecs_tasks(aws)[arn][0] == "STOPPED"
    (item,) = aws.table.scan()["Items"]
    assert item["owner"] == ROLE  # the role, not a session
    assert item["pk"] == record_key(ROLE, KEY)


@pytest.mark.parametrize(
    ("arn", "owner"),
    [
        (f"{ROLE}/s1", ROLE),
        (
            f"arn:aws-cn:sts::{ACCOUNT}:assumed-role/r.1@x/s-2",
            f"arn:aws-cn:sts::{ACCOUNT}:assumed-role/r.1@x",
        ),
        (OWNER, OWNER),
        (f"arn:aws:iam::{ACCOUNT}:user/path/to/u", f"arn:aws:iam::{ACCOUNT}:user/path/to/u"),
        (f"arn:aws:sts::{ACCOUNT}:federated-user/bob", f"arn:aws:sts::{ACCOUNT}:federated-user/bob"),
    ],
)
def test_owner_normalisation(arn, owner):
    assert owner_of({"userArn": arn, "caller": "AROAEXAMPLE:s1"}) == owner


@pytest.mark.parametrize("identity", [None, {}, {"userArn": None}, {"userArn": ""}, {"caller": "AIDAX"}])
def test_no_identity_is_forbidden(identity):
    with pytest.raises(Forbidden):
        owner_of(identity)


def test_requests_without_an_identity_are_403_and_change_nothing(client, aws):
    post(client, job_body())
    before = world(aws)
    anonymous = as_caller("")

    answers = [
        client.http.post("/jobs", headers={"Content-Type": "application/json", **anonymous}, body="{}"),
        post_as(client, "", job_body(job_id="6006")),
        client.http.get(f"/jobs/{KEY}", headers=anonymous),
        delete(client, KEY, attempt=1, caller=""),
        heartbeat(client, KEY, attempt=1, caller=""),
        client.http.get("/health", headers=anonymous),
    ]

    assert [a.status_code for a in answers] == [403] * 6
    assert {error_of(a) for a in answers} == {"Forbidden"}
    assert world(aws) == before


# --- attempts are bound -----------------------------------------------------------------------------------


@pytest.fixture
def second_attempt(client, aws) -> tuple[dict, dict]:
    """Attempt 1 ended (cleaned up, its task stopped); the runner's prepare retry started attempt 2."""
    first = json.loads(post(client, job_body()).body)
    assert delete(client, KEY, attempt=1).status_code == 200
    aws.table.update_item(
        Key=table_key(KEY),
        UpdateExpression="SET #s = :s REMOVE live",
        ExpressionAttributeNames={"#s": "state"},
        ExpressionAttributeValues={":s": "STOPPED"},
    )
    second = json.loads(post(client, job_body()).body)
    assert second["attempt"] == 2 and second["task_arn"] != first["task_arn"]
    return first, second


def test_a_late_delete_of_an_old_attempt_is_409_and_stops_nothing(client, aws, second_attempt):
    _, second = second_attempt
    before = world(aws)

    late = delete(client, KEY, attempt=1, reason="replayed cleanup")

    assert late.status_code == 409
    error = json.loads(late.body)
    assert error["error"] == "AttemptMismatch"
    assert error["message"] == f"attempt 1 of job {KEY} is not its current attempt 2"
    assert world(aws) == before
    assert ecs_tasks(aws)[second["task_arn"]] == ("RUNNING", "RUNNING")
    assert delete(client, KEY, attempt=3).status_code == 409  # nor one from the future


def test_a_late_heartbeat_of_an_old_attempt_is_409_and_touches_nothing(client, aws, second_attempt):
    before = world(aws)

    late = heartbeat(client, KEY, attempt=1, ssh_ready_seconds=2.5)

    assert late.status_code == 409 and error_of(late) == "AttemptMismatch"
    assert world(aws) == before
    assert heartbeat(client, KEY, attempt=2).status_code == 200  # the current attempt's own beat


def test_the_current_attempt_is_stopped_by_naming_it(client, aws, second_attempt):
    _, second = second_attempt

    stopped = delete(client, KEY, attempt=2)

    assert stopped.status_code == 200
    assert ecs_tasks(aws)[second["task_arn"]][0] == "STOPPED"


@pytest.mark.parametrize("attempt", [None, True, "1", 1.0, 0, -1, 2**31, [1], {"n": 1}])
@pytest.mark.parametrize("route", ["delete", "heartbeat"])
def test_a_missing_or_ill_typed_attempt_is_400_naming_it(client, aws, attempt, route):
    post(client, job_body())
    before = world(aws)

    call = delete if route == "delete" else heartbeat
    response = call(client, KEY, attempt=attempt)  # None: left out

    assert response.status_code == 400, response.body
    assert (error_of(response), json.loads(response.body)["field"]) == ("InvalidInput", "attempt")
    assert world(aws) == before


# --- every malformed body is a 400, and changes nothing ---------------------------------------------------

PATTERNED = [
    "runner",
    "job_id",
    "project_id",
    "pipeline_id",
    "ssh_public_key",
    "platform_version",
    "task_definition",
    "job_name",
    "project_path",
    "gitlab_url",
]


def nested(depth: int, kind: str) -> str:
    return ("[" * depth + "]" * depth) if kind == "list" else ('{"a":' * depth + "1" + "}" * depth)


@st.composite
def deep_post_bodies(draw) -> bytes:
    """A valid job whose one field is nested thousands deep (Python's json recursion limit is ~1000)."""
    depth = draw(st.integers(min_value=900, max_value=5000))
    field = draw(st.sampled_from([*job_body(), "surprise"]))
    body = json.dumps({k: v for k, v in job_body().items() if k != field})
    return (
        body[:-1] + f', "{field}": ' + nested(depth, draw(st.sampled_from(["list", "dict"]))) + "}"
    ).encode()


@st.composite
def huge_number_bodies(draw) -> tuple[str, bytes]:
    """An integer of 4301+ digits (past Python's int conversion limit) in any field; the body < 16 KiB."""
    digits = draw(st.integers(min_value=4301, max_value=12000))
    field = draw(st.sampled_from([*job_body(), "cpu", "memory", "attempt", "ssh_ready_seconds"]))
    sign = draw(st.sampled_from(["", "-"]))
    number = sign + "1" + "0" * (digits - 1)
    return field, number.encode()


def _assert_body_refused_and_task_kept(client, aws, live_job, route: str, raw: str) -> None:
    """DELETE or heartbeat the live job with `raw` as its body: a 400 that changes nothing."""
    before = world(aws)
    method = client.http.delete if route == "delete" else client.http.post
    path = f"/jobs/{KEY}" + ("/heartbeat" if route == "heartbeat" else "")

    response = method(path, headers={"Content-Type": "application/json"}, body=raw)

    _assert_refused_and_nothing_changed(aws, response, before)
    assert ecs_tasks(aws)[live_job["task_arn"]] == ("RUNNING", "RUNNING")


def _assert_refused_and_nothing_changed(aws, response, before) -> None:
    assert response.status_code == 400, (response.status_code, response.body[:300])
    assert error_of(response) == "InvalidInput"
    assert world(aws) == before


@FUZZ
@given(raw=deep_post_bodies())
def test_deeply_nested_post_bodies_are_400(client, aws, raw):
    before = world(aws)
    _assert_refused_and_nothing_changed(aws, post(client, None, raw=raw), before)


@FUZZ
@given(case=huge_number_bodies())
def test_post_bodies_with_huge_integers_are_400(client, aws, case):
    field, number = case
    body = json.dumps({k: v for k, v in job_body().items() if k != field}).encode()
    raw = body[:-1] + b', "' + field.encode() + b'": ' + number + b"}"
    before = world(aws)
    _assert_refused_and_nothing_changed(aws, post(client, None, raw=raw), before)


@pytest.fixture
def live_job(client, aws) -> dict:
    return json.loads(post(client, job_body()).body)


@FUZZ
@given(
    route=st.sampled_from(["delete", "heartbeat"]),
    depth=st.integers(min_value=900, max_value=5000),
    kind=st.sampled_from(["list", "dict"]),
    where=st.sampled_from(["attempt", "reason", "ssh_ready_seconds", "other"]),
)
def test_deeply_nested_delete_and_heartbeat_bodies_are_400_and_stop_nothing(
    client, aws, live_job, route, depth, kind, where
):
    raw = '{"attempt": 1, "' + where + '": ' + nested(depth, kind) + "}"
    if where == "attempt":
        raw = '{"attempt": ' + nested(depth, kind) + "}"
    _assert_body_refused_and_task_kept(client, aws, live_job, route, raw)


@FUZZ
@given(
    route=st.sampled_from(["delete", "heartbeat"]),
    field=st.sampled_from(["attempt", "ssh_ready_seconds", "reason", "other"]),
    digits=st.integers(min_value=4301, max_value=12000),
)
def test_huge_integers_in_delete_and_heartbeat_bodies_are_400_and_stop_nothing(
    client, aws, live_job, route, field, digits
):
    number = "9" * digits
    raw = '{"attempt": 1, "' + field + '": ' + number + "}"
    _assert_body_refused_and_task_kept(client, aws, live_job, route, raw)


@FUZZ
@given(field=st.sampled_from(PATTERNED), tail=st.sampled_from(["\n", "\r\n", "\n\n", "\r", "\x00"]))
def test_a_trailing_newline_in_any_patterned_field_is_400_naming_it(client, aws, field, tail):
    body = job_body(task_definition="ci-coordinator-large", platform_version="1.4.0")
    body[field] += tail
    before = world(aws)

    response = post(client, body)

    _assert_refused_and_nothing_changed(aws, response, before)
    assert json.loads(response.body)["field"] == field


@FUZZ
@given(
    tail=st.sampled_from(["\n", "\r\n", "\n\n", " ", "\t"]),
    route=st.sampled_from(["get", "delete", "heartbeat"]),
)
def test_a_trailing_newline_in_the_job_key_is_400(client, aws, live_job, tail, route):
    path = "/jobs/" + urllib.parse.quote(KEY + tail, safe="")
    before = world(aws)
    body = json.dumps({"attempt": 1})

    if route == "get":
        response = client.http.get(path)
    elif route == "delete":
        response = client.http.delete(path, headers={"Content-Type": "application/json"}, body=body)
    else:
        response = client.http.post(
            path + "/heartbeat", headers={"Content-Type": "application/json"}, body=body
        )

    _assert_refused_and_nothing_changed(aws, response, before)
    assert json.loads(response.body)["field"] == "job_key"


@FUZZ
@given(
    region=st.sampled_from([REGION, "us-east-1", "eu-west-2", "eu-central-1"]),
    account=st.sampled_from([ACCOUNT, "210987654321", "000000000000"]),
    partition=st.sampled_from(["aws", "aws-cn", "aws-us-gov"]),
    family=st.sampled_from(["ci-coordinator", "ci-coordinator-large:1", "ci-coordinator:1"]),
)
def test_a_task_definition_arn_outside_this_account_and_region_is_400(
    client, aws, region, account, partition, family
):
    if (region, account) == (REGION, ACCOUNT):
        account = "210987654321"  # every example is foreign; the one at home is checked below
    arn = f"arn:{partition}:ecs:{region}:{account}:task-definition/{family}"
    before = world(aws)

    response = post(client, job_body(task_definition=arn))

    _assert_refused_and_nothing_changed(aws, response, before)
    error = json.loads(response.body)
    assert error["field"] == "task_definition" and "account and region" in error["message"]


def test_a_task_definition_arn_in_this_account_and_region_is_accepted(client, aws):
    arn = f"arn:aws:ecs:{REGION}:{ACCOUNT}:task-definition/ci-coordinator-large:1"

    response = post(client, job_body(task_definition=arn))

    assert response.status_code == 201, response.body
    assert json.loads(response.body)["task_definition"] == arn
