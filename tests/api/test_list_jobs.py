"""GET /jobs against moto: owner scoping, the filters, the opaque cursor, and clear 400s."""

from __future__ import annotations

import base64
import json

import pytest

from chalicelib.jobs import owner_digest, record_key
from chalicelib.listing import encode_cursor
from tests.api.conftest import OWNER, STRANGER, as_caller, delete, job_body, post


def _post(client, job_id: str, caller: str = OWNER) -> dict:
    headers = {"Content-Type": "application/json", **as_caller(caller)}
    response = client.http.post("/jobs", headers=headers, body=json.dumps(job_body(job_id)))
    assert response.status_code == 201, response.body
    return json.loads(response.body)


def _list(client, query: str = "", caller: str = OWNER):
    return client.http.get("/jobs" + (f"?{query}" if query else ""), headers=as_caller(caller))


def _page(client, query: str = "", caller: str = OWNER) -> dict:
    response = _list(client, query, caller)
    assert response.status_code == 200, response.body
    return json.loads(response.body)


def test_a_caller_sees_only_its_own_jobs_newest_first_with_the_view_fields(client, aws):
    mine = [_post(client, str(9000 + i))["job_key"] for i in range(3)]
    _post(client, "9100", caller=STRANGER)
    _post(client, "9000", caller=STRANGER)  # the same job key as one of mine: the stranger's own record

    page = _page(client)

    assert [job["job_key"] for job in page["jobs"]] == list(reversed(mine))
    assert page["next_cursor"] is None
    first = page["jobs"][0]
    assert (
        first["job_id"] == "9002" and first["project_id"] == "42" and first["project_path"] == "group/project"
    )
    assert first["state"] == "PROVISIONING" and first["task_arn"].startswith("arn:aws:ecs:")
    assert first["created_at"].endswith("Z")
    assert "owner" not in first and "owner_key" not in first and "request_hash" not in first
    stranger = _page(client, caller=STRANGER)
    assert sorted(job["job_key"] for job in stranger["jobs"]) == ["t3sT_1234-9000", "t3sT_1234-9100"]
    assert {job["task_arn"] for job in stranger["jobs"]}.isdisjoint({job["task_arn"] for job in page["jobs"]})


def test_pages_follow_the_cursor_without_gaps_or_repeats(client, aws):
    keys = [_post(client, str(8000 + i))["job_key"] for i in range(7)]

    seen, cursor, pages = [], None, 0
    while True:
        page = _page(client, "limit=3" + (f"&cursor={cursor}" if cursor else ""))
        seen += [job["job_key"] for job in page["jobs"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(keys))
    assert pages == 3


def test_live_state_and_since_filter(client, aws):
    done = _post(client, "7001")
    live = _post(client, "7002")
    assert delete(client, done["job_key"]).status_code == 200
    # moto has no events: end the stopped job as the STOPPED event would.
    aws.table.update_item(
        Key={"pk": record_key(OWNER, done["job_key"])},
        UpdateExpression="SET #s = :s REMOVE live",
        ExpressionAttributeNames={"#s": "state"},
        ExpressionAttributeValues={":s": "STOPPED"},
    )

    assert [j["job_key"] for j in _page(client, "live=true")["jobs"]] == [live["job_key"]]
    assert [j["job_key"] for j in _page(client, "live=false")["jobs"]] == [done["job_key"]]
    assert [j["job_key"] for j in _page(client, "state=stopped")["jobs"]] == [done["job_key"]]
    assert len(_page(client, "state=STOPPED,PROVISIONING")["jobs"]) == 2
    assert _page(client, "state=RUNNING")["jobs"] == []
    assert _page(client, "since=2999-01-01T00:00:00Z")["jobs"] == []
    assert len(_page(client, "since=2000-01-01T00:00:00Z")["jobs"]) == 2
    assert len(_page(client, "since=0999-01-01T00:00:00Z")["jobs"]) == 2  # before 1970: everything


def test_a_filtered_page_is_filled_past_records_the_filter_drops(client, aws):
    live = [_post(client, str(6000 + i))["job_key"] for i in range(3)]
    # Newer finished jobs the live filter must read past: more than one DynamoDB page (the store reads 100).
    with aws.table.batch_writer() as batch:
        for i in range(130):
            batch.put_item(
                Item={
                    "pk": record_key(OWNER, f"t3sT_1234-{6100 + i}"),
                    "owner_key": owner_digest(OWNER),
                    "owner": OWNER,
                    "job_key": f"t3sT_1234-{6100 + i}",
                    "attempt": 1,
                    "state": "STOPPED",
                    "created_at": f"2999-01-01T00:{i // 60:02d}:{i % 60:02d}.000Z",
                }
            )
    page = _page(client, "live=true&limit=3")
    assert [j["job_key"] for j in page["jobs"]] == list(reversed(live))
    everything = _page(client, "limit=100")
    assert len(everything["jobs"]) == 100 and everything["next_cursor"]
    rest = _page(client, f"limit=100&cursor={everything['next_cursor']}")
    assert len(rest["jobs"]) == 33 and rest["next_cursor"] is None


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("live=yes", "live"),
        ("state=RUNNIN", "state"),
        ("since=yesterday", "since"),
        ("since=2026-13-45T00:00:00Z", "since"),
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=ten", "limit"),
        ("owner=arn:aws:iam::123456789012:user/runner-b", "owner"),
        ("cursor=bm90LWEtY3Vyc29y", "cursor"),
        ("cursor=%25%25", "cursor"),
    ],
)
def test_bad_query_parameters_are_400s_naming_the_parameter(client, aws, query, field):
    response = _list(client, query)
    assert response.status_code == 400, response.body
    body = json.loads(response.body)
    assert body["error"] == "InvalidInput" and body["field"] == field
    assert field in body["message"]


def test_another_callers_cursor_is_refused(client, aws):
    _post(client, "5101", caller=STRANGER)
    _post(client, "5102", caller=STRANGER)
    cursor = _page(client, "limit=1", caller=STRANGER)["next_cursor"]
    assert cursor

    response = _list(client, f"cursor={cursor}")
    assert response.status_code == 400
    assert json.loads(response.body)["field"] == "cursor"
    # ...and a cursor forged with the stranger's record key but the caller's digest elsewhere is refused too.
    forged = encode_cursor(
        {"pk": record_key(STRANGER, "t3sT_1234-5101"), "created_at": "2026-01-01T00:00:00.000Z"}
    )
    assert _list(client, f"cursor={forged}").status_code == 400


def test_the_cursor_is_opaque_base64_without_the_owner(client, aws):
    _post(client, "5201")
    _post(client, "5202")
    cursor = _page(client, "limit=1")["next_cursor"]
    decoded = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    assert OWNER not in decoded


def test_no_identity_is_403_before_the_query_is_read(client, aws):
    response = _list(client, "limit=0", caller="")
    assert response.status_code == 403


def test_post_still_answers_the_job_after_listing(client, aws):
    # The view grew identity fields (job_id, project...): the POST answer carries them too.
    job = json.loads(post(client, job_body("5301")).body)
    assert job["job_id"] == "5301" and job["runner"] == "t3sT_1234" and job["pipeline_id"] == "1001"
