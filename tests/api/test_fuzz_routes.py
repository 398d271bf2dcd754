"""Fuzzing the routes: no input gives a 5xx, and a rejected input changes nothing."""

from __future__ import annotations

import json
import urllib.parse

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.api.conftest import CLUSTER, job_body, post

VALID = job_body()
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=300),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@st.composite
def bodies(draw):
    body = {}
    for name, value in VALID.items():
        choice = draw(st.sampled_from(["keep", "keep", "drop", "junk"]))
        if choice == "keep":
            body[name] = value
        elif choice == "junk":
            body[name] = draw(junk)
    if draw(st.booleans()):
        body["job_id"] = str(draw(st.integers(min_value=0, max_value=10**6)))
    for name in ("cpu", "memory"):
        if draw(st.booleans()):
            body[name] = draw(st.sampled_from([256, 512, 1024, 2048, 3000, 4096, 8192, -1, 0]))
    if draw(st.booleans()):
        body[draw(st.text(min_size=1, max_size=10))] = draw(junk)
    return body


def state(aws) -> tuple[int, int]:
    return len(aws.ecs.list_tasks(cluster=CLUSTER)["taskArns"]), aws.table.scan(Select="COUNT")["Count"]


@FUZZ
@given(body=bodies())
def test_post_never_answers_5xx_and_a_rejection_changes_nothing(client, aws, body):
    tasks_before, records_before = state(aws)

    response = post(client, body)

    answer = json.loads(response.body)
    if response.status_code == 201:  # a new job: its record and its one task
        assert answer["job_key"] == f"{body['runner']}-{body['job_id']}"
        assert state(aws) == (tasks_before + 1, records_before + 1)
    elif response.status_code == 200:  # a repeat of an earlier example's request: nothing new
        assert answer["job_key"] == f"{body['runner']}-{body['job_id']}"
        assert state(aws) == (tasks_before, records_before)
    else:  # refused (400), or the same job with other parameters while live (409): nothing changed
        assert response.status_code in (400, 409), response.body
        assert set(answer) >= {"error", "message"}
        assert state(aws) == (tasks_before, records_before)


@FUZZ
@given(raw=st.binary(max_size=2000))
def test_post_with_any_bytes_is_refused_and_changes_nothing(client, aws, raw):
    before = state(aws)

    response = post(client, None, raw=raw)

    # Arbitrary bytes are never a complete job request (it needs keys of a fixed shape).
    assert response.status_code == 400, response.body
    assert json.loads(response.body)["error"] == "InvalidInput"
    assert state(aws) == before


@FUZZ
@given(key=st.text(min_size=1, max_size=60), method=st.sampled_from(["get", "delete", "heartbeat"]))
def test_job_routes_with_any_key_never_answer_5xx(client, aws, key, method):
    path = "/jobs/" + urllib.parse.quote(key, safe="")
    before = state(aws)

    if method == "heartbeat":
        response = client.http.post(path + "/heartbeat")
    else:
        response = getattr(client.http, method)(path)

    assert response.status_code in (400, 404, 405), response.body
    assert state(aws) == before
