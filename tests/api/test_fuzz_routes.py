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
    before = state(aws)

    response = post(client, body)

    assert response.status_code < 500, response.body
    assert set(json.loads(response.body)) >= (
        {"error", "message"} if response.status_code >= 400 else {"job_key"}
    )
    if response.status_code >= 400:
        assert state(aws) == before


@FUZZ
@given(raw=st.binary(max_size=2000))
def test_post_with_any_bytes_never_answers_5xx(client, aws, raw):
    before = state(aws)

    response = post(client, None, raw=raw)

    assert response.status_code < 500
    if response.status_code >= 400:
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
