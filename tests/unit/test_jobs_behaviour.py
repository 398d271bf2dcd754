"""What the API accepts and how it refuses: every request body (POST /jobs, DELETE, heartbeat), the job key,
the record key that isolates callers, and the job view. Each refusal is a 400 whose message and `field` tell
the runner manager what to fix."""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal

import pytest

from chalicelib.errors import InvalidInput
from chalicelib.jobs import (
    FARGATE_SIZES,
    MAX_ATTEMPT,
    MAX_BODY_BYTES,
    VIEW_FIELDS,
    decode_body,
    job_key,
    job_view,
    parse_heartbeat_request,
    parse_job_request,
    parse_stop_request,
    read_job_request,
    record_key,
    record_key_from_started_by,
    started_by,
    validate_job_key,
)
from chalicelib.settings import load_settings
from tests.api.conftest import new_keys

ACCOUNT = "123456789012"
SETTINGS = load_settings(
    {
        "FARGATE_CLUSTER": "ci",
        "FARGATE_SUBNETS": "subnet-a",
        "FARGATE_SECURITY_GROUPS": "sg-1",
        "FARGATE_TASK_DEFINITION": "ci-coordinator",
        "FARGATE_ALLOWED_TASK_DEFINITIONS": "ci-large,ci-pinned:4",
        "JOBS_TABLE": "jobs",
        "FARGATE_MAX_CPU": "2048",
        "FARGATE_MAX_MEMORY": "8192",
        "JOB_DEFAULT_TIMEOUT": "1800",
        "JOB_MAX_TIMEOUT": "7200",
        "FARGATE_PLATFORM_VERSION": "1.4.0",
        "AWS_REGION": "eu-west-1",
    }
)
PUBLIC, HOST = new_keys()
BODY = {
    "runner": "t3sT_1234",
    "job_id": "5005",
    "gitlab_url": "https://gitlab.example.com",
    "project_id": "42",
    "project_path": "group/project",
    "pipeline_id": "1001",
    "job_name": "build",
    "ssh_public_key": PUBLIC,
}


def parse(**change):
    body = {**BODY, **change}
    return parse_job_request({k: v for k, v in body.items() if v is not ...}, SETTINGS, ACCOUNT)


def refusal(call, *args) -> tuple[str, str | None]:
    with pytest.raises(InvalidInput) as caught:
        call(*args)
    return caught.value.message, caught.value.field


def refused(**change) -> tuple[str, str | None]:
    with pytest.raises(InvalidInput) as caught:
        parse(**change)
    assert caught.value.status == 400
    return caught.value.message, caught.value.field


# -- POST /jobs: what a valid request becomes ---------------------------------------------------------------


def test_a_minimal_request_takes_the_orchestrators_defaults():
    request = parse()

    assert request.job_key == "t3sT_1234-5005"
    assert (request.runner, request.job_id, request.project_id, request.pipeline_id) == (
        "t3sT_1234",
        "5005",
        "42",
        "1001",
    )
    assert (request.gitlab_url, request.project_path, request.job_name) == (
        "https://gitlab.example.com",
        "group/project",
        "build",
    )
    assert request.ssh_public_key == PUBLIC
    assert request.task_definition == "ci-coordinator"
    assert request.platform_version == "1.4.0"
    assert (request.cpu, request.memory) == (None, None)
    assert request.timeout_seconds == 1800


def test_what_a_job_asks_for_is_taken():
    request = parse(
        task_definition="ci-large:7", platform_version="LATEST", cpu=1024, memory=3072, timeout_seconds=600
    )

    assert (request.task_definition, request.platform_version) == ("ci-large:7", "LATEST")
    assert (request.cpu, request.memory, request.timeout_seconds) == (1024, 3072, 600)


def test_a_timeout_above_the_maximum_is_cut_to_it():
    assert parse(timeout_seconds=10**6).timeout_seconds == 7200
    assert parse(timeout_seconds=7200).timeout_seconds == 7200
    assert parse(timeout_seconds=1).timeout_seconds == 1


def test_optional_free_text_may_be_absent_or_null():
    request = parse(gitlab_url=..., project_path=None, job_name=...)

    assert (request.gitlab_url, request.project_path, request.job_name) == ("", "", "")


def test_the_request_hash_tells_a_repeat_from_a_different_request():
    assert parse().request_hash == parse().request_hash
    assert parse().request_hash != parse(job_name="test").request_hash
    assert parse().request_hash != parse(timeout_seconds=600).request_hash
    assert len(parse().request_hash) == 64
    # Two spellings of the same request (default named or not) are the same request.
    assert parse().request_hash == parse(task_definition="ci-coordinator", timeout_seconds=1800).request_hash


def test_a_same_region_and_account_arn_is_taken():
    arn = f"arn:aws:ecs:eu-west-1:{ACCOUNT}:task-definition/ci-large:3"

    assert parse(task_definition=arn).task_definition == arn


# -- POST /jobs: refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["runner", "job_id", "project_id", "pipeline_id", "ssh_public_key"])
def test_each_required_field_is_named_when_missing(name):
    assert refused(**{name: ...}) == (f"{name} is required", name)
    assert refused(**{name: None}) == (f"{name} is required", name)


@pytest.mark.parametrize("name", ["runner", "job_id", "project_id", "pipeline_id", "task_definition"])
def test_a_field_that_is_not_a_string_is_named(name):
    assert refused(**{name: 5005}) == (f"{name} must be a string", name)


@pytest.mark.parametrize(
    ("name", "value", "what"),
    [
        ("runner", "t3sT_12345678", "1-12 characters of A-Z a-z 0-9 _ -"),
        ("runner", "", "1-12 characters of A-Z a-z 0-9 _ -"),
        ("runner", "a.b", "1-12 characters of A-Z a-z 0-9 _ -"),
        ("job_id", "12a", "a decimal GitLab job id"),
        ("job_id", "5005\n", "a decimal GitLab job id"),
        ("job_id", "1" * 20, "a decimal GitLab job id"),
        ("project_id", "-1", "a decimal project id"),
        ("pipeline_id", "x", "a decimal pipeline id"),
        ("ssh_public_key", "ssh-rsa AAAA", "one 'ssh-ed25519 AAAA...' key line"),
        ("task_definition", "ci large", "a task definition family, family:revision or ARN"),
        ("platform_version", "1.4", "LATEST or a version such as 1.4.0"),
        ("platform_version", "latest", "LATEST or a version such as 1.4.0"),
    ],
)
def test_a_malformed_field_is_named_with_what_it_must_be(name, value, what):
    assert refused(**{name: value}) == (f"{name} must be {what}", name)


def test_the_longest_runner_token_and_job_id_are_taken():
    request = parse(runner="A" * 12, job_id="9" * 19)

    assert request.job_key == "A" * 12 + "-" + "9" * 19


def test_an_unknown_field_is_named():
    assert refused(owner="someone-else") == ("unknown field 'owner'", "owner")


def test_the_first_unknown_field_in_order_is_named():
    assert refused(zz=1, aa=2) == ("unknown field 'aa'", "aa")


def test_a_task_definition_outside_the_allowlist_is_refused():
    assert refused(task_definition="ci-other") == (
        "task_definition 'ci-other' is not in this orchestrator's allowlist",
        "task_definition",
    )


def test_an_arn_of_another_account_or_region_is_refused_naming_ours():
    for arn in (
        "arn:aws:ecs:eu-west-1:999999999999:task-definition/ci-large:3",
        f"arn:aws:ecs:us-east-1:{ACCOUNT}:task-definition/ci-large:3",
    ):
        assert refused(task_definition=arn) == (
            f"task_definition {arn!r} is not in this orchestrator's account and region "
            f"({ACCOUNT}, eu-west-1)",
            "task_definition",
        )


@pytest.mark.parametrize(("account", "region"), [(None, "eu-west-1"), (ACCOUNT, "")])
def test_an_arn_is_refused_where_the_orchestrator_cannot_tell_its_home(account, region):
    settings = load_settings(
        {
            "FARGATE_CLUSTER": "ci",
            "FARGATE_SUBNETS": "subnet-a",
            "FARGATE_SECURITY_GROUPS": "sg-1",
            "FARGATE_TASK_DEFINITION": "ci-coordinator",
            "FARGATE_ALLOWED_TASK_DEFINITIONS": "ci-large",
            "JOBS_TABLE": "jobs",
            "AWS_REGION": region,
        }
    )
    arn = f"arn:aws:ecs:eu-west-1:{ACCOUNT}:task-definition/ci-large:3"

    with pytest.raises(InvalidInput) as caught:
        parse_job_request({**BODY, "task_definition": arn}, settings, account)

    assert caught.value.message == (
        "task_definition may not be an ARN here (this orchestrator cannot tell its own account and region); "
        "give the family or family:revision"
    )
    assert caught.value.field == "task_definition"
    # A family needs no home check.
    assert parse_job_request({**BODY, "task_definition": "ci-large"}, settings, account).task_definition == (
        "ci-large"
    )


@pytest.mark.parametrize("value", [True, 1.5, "600"])
def test_a_timeout_that_is_not_an_integer_is_named(value):
    assert refused(timeout_seconds=value) == ("timeout_seconds must be an integer", "timeout_seconds")


@pytest.mark.parametrize("value", [0, -5])
def test_a_timeout_that_is_not_positive_is_named(value):
    assert refused(timeout_seconds=value) == ("timeout_seconds must be positive", "timeout_seconds")


@pytest.mark.parametrize(("cpu", "memory", "missing"), [(1024, ..., "memory"), (..., 2048, "cpu")])
def test_cpu_and_memory_come_together(cpu, memory, missing):
    assert refused(cpu=cpu, memory=memory) == ("cpu and memory must be given together", missing)


def test_a_cpu_that_is_no_fargate_size_lists_the_sizes():
    assert refused(cpu=300, memory=1024) == (
        "cpu 300 is not a Fargate size (256, 512, 1024, 2048, 4096, 8192, 16384)",
        "cpu",
    )


@pytest.mark.parametrize(
    ("cpu", "memory", "allowed"),
    [
        (256, 4096, "512-2048 in steps of 512"),
        (1024, 1024, "2048-8192 in steps of 1024"),
        (512, 1536, "1024-4096 in steps of 1024"),
    ],
)
def test_a_memory_that_does_not_go_with_the_cpu_names_what_does(cpu, memory, allowed):
    assert refused(cpu=cpu, memory=memory) == (
        f"memory {memory} MiB does not go with cpu {cpu} on Fargate ({allowed})",
        "memory",
    )


def test_sizes_above_the_orchestrators_maximum_are_refused_and_the_maximum_is_taken():
    assert refused(cpu=4096, memory=8192) == ("cpu 4096 is above this orchestrator's maximum 2048", "cpu")
    assert refused(cpu=2048, memory=9216) == (
        "memory 9216 is above this orchestrator's maximum 8192",
        "memory",
    )
    request = parse(cpu=2048, memory=8192)
    assert (request.cpu, request.memory) == (2048, 8192)


@pytest.mark.parametrize("cpu", [True, "1024", 1024.0])
def test_a_size_that_is_not_an_integer_is_named(cpu):
    assert refused(cpu=cpu, memory=2048) == ("cpu must be an integer", "cpu")


def test_every_fargate_size_pairs_with_its_documented_memory():
    # https://docs.aws.amazon.com/AmazonECS/latest/developerguide/fargate-tasks-services.html#fargate-tasks-size
    assert {cpu: (m.start, m.stop - 1, m.step) for cpu, m in FARGATE_SIZES.items()} == {
        256: (512, 2048, 512),
        512: (1024, 4096, 1024),
        1024: (2048, 8192, 1024),
        2048: (4096, 16384, 1024),
        4096: (8192, 30720, 1024),
        8192: (16384, 61440, 4096),
        16384: (32768, 122880, 8192),
    }


@pytest.mark.parametrize(("name", "limit"), [("gitlab_url", 2048), ("project_path", 1024), ("job_name", 255)])
def test_free_text_has_a_length_limit_and_no_control_characters(name, limit):
    message = (f"{name} must be a printable string of at most {limit} characters", name)
    assert parse(**{name: "x" * limit}) is not None
    assert refused(**{name: "x" * (limit + 1)}) == message
    assert refused(**{name: "a\nb"}) == message
    assert refused(**{name: "a\x7fb"}) == message
    assert refused(**{name: "a\ud800b"}) == message
    assert refused(**{name: 42}) == message


# -- bodies ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [None, b""])
def test_a_missing_body_is_refused(raw):
    assert refusal(decode_body, raw) == ("request body is required (a JSON object)", None)


def test_a_body_above_the_limit_is_refused_and_one_at_it_is_read():
    assert refusal(decode_body, b" " * (MAX_BODY_BYTES + 1)) == (
        f"request body is larger than {MAX_BODY_BYTES} bytes",
        None,
    )
    padded = b"{}" + b" " * (MAX_BODY_BYTES - 2)
    assert decode_body(padded) == {}


def test_a_body_that_is_not_json_says_why():
    message, field = refusal(decode_body, b"{nope")
    assert message.startswith("request body is not valid JSON: Expecting property name")
    assert field is None
    message, _ = refusal(decode_body, b"\xff\xfe")
    assert message.startswith("request body is not valid JSON: ")


def test_a_body_nested_too_deeply_is_refused():
    assert refusal(decode_body, b"[" * 5000 + b"]" * 5000) == ("request body is nested too deeply", None)


@pytest.mark.parametrize("raw", [b"[]", b"1", b'"x"', b"null"])
def test_a_body_that_is_not_an_object_is_refused(raw):
    assert refusal(decode_body, raw) == ("request body must be a JSON object", None)


def test_read_job_request_decodes_then_parses():
    assert read_job_request(json.dumps(BODY).encode(), SETTINGS, ACCOUNT).job_key == "t3sT_1234-5005"
    assert refusal(read_job_request, b"[]", SETTINGS, ACCOUNT) == ("request body must be a JSON object", None)


# -- DELETE and heartbeat bodies ---------------------------------------------------------------------------


def test_a_stop_names_its_attempt_and_a_reason_or_gets_the_default():
    assert parse_stop_request(b'{"attempt": 2, "reason": "pipeline cancelled"}') == (2, "pipeline cancelled")
    assert parse_stop_request(b'{"attempt": 1}') == (1, "CI job cleanup")
    assert parse_stop_request(b'{"attempt": 1, "reason": null}') == (1, "CI job cleanup")
    assert parse_stop_request(b'{"attempt": 1, "reason": ""}') == (1, "CI job cleanup")
    assert parse_stop_request(json.dumps({"attempt": 1, "reason": "r" * 255}).encode()) == (1, "r" * 255)


@pytest.mark.parametrize("raw", [None, b"", b"{}"])
def test_a_stop_without_an_attempt_is_refused(raw):
    assert refusal(parse_stop_request, raw) == (
        "attempt is required (the job's attempt POST /jobs answered)",
        "attempt",
    )


@pytest.mark.parametrize("attempt", [0, -1, MAX_ATTEMPT + 1, True, 1.0, "1"])
def test_an_attempt_out_of_range_or_not_an_integer_is_refused(attempt):
    message = (f"attempt must be an integer from 1 to {MAX_ATTEMPT}", "attempt")
    assert refusal(parse_stop_request, json.dumps({"attempt": attempt}).encode()) == message
    assert refusal(parse_heartbeat_request, json.dumps({"attempt": attempt}).encode()) == message


def test_the_largest_attempt_is_taken():
    assert parse_stop_request(json.dumps({"attempt": MAX_ATTEMPT}).encode())[0] == MAX_ATTEMPT


@pytest.mark.parametrize("reason", ["r" * 256, 42, "a\ud800"])
def test_a_bad_reason_is_refused(reason):
    raw = json.dumps({"attempt": 1, "reason": reason}).encode()
    assert refusal(parse_stop_request, raw) == ("reason must be a string of at most 255 characters", "reason")


def test_a_stop_with_an_unknown_field_is_refused():
    assert refusal(parse_stop_request, b'{"attempt": 1, "force": true}') == ("unknown field 'force'", "force")


def test_a_heartbeat_names_its_attempt_and_maybe_how_long_ssh_took():
    assert parse_heartbeat_request(b'{"attempt": 3}') == (3, None)
    assert parse_heartbeat_request(b'{"attempt": 1, "ssh_ready_seconds": 4.25}') == (1, 4.25)
    assert parse_heartbeat_request(b'{"attempt": 1, "ssh_ready_seconds": 0}') == (1, 0)
    assert parse_heartbeat_request(b'{"attempt": 1, "ssh_ready_seconds": null}') == (1, None)
    assert refusal(parse_heartbeat_request, b"{}")[1] == "attempt"


@pytest.mark.parametrize("ready", [-0.1, 86400, True, "4"])
def test_a_heartbeat_with_a_bad_ssh_ready_time_is_refused(ready):
    raw = json.dumps({"attempt": 1, "ssh_ready_seconds": ready}).encode()
    assert refusal(parse_heartbeat_request, raw) == (
        "ssh_ready_seconds must be a number of seconds",
        "ssh_ready_seconds",
    )


def test_a_heartbeat_with_an_unknown_field_is_refused():
    assert refusal(parse_heartbeat_request, b'{"attempt": 1, "x": 1}') == ("unknown field 'x'", "x")


# -- keys --------------------------------------------------------------------------------------------------


def test_the_job_key_is_runner_dash_job_id():
    assert job_key("t3sT_1234", "5005") == "t3sT_1234-5005"


@pytest.mark.parametrize("key", ["t3sT_1234-5005", "A-1", "abcdefghijkl-" + "9" * 19])
def test_valid_job_keys_are_taken(key):
    assert validate_job_key(key) == key


@pytest.mark.parametrize("key", ["t3sT_1234", "-5005", "t3sT_1234-", "t3sT_1234-5005\n", "a.b-1", 5005])
def test_a_malformed_job_key_is_refused(key):
    assert refusal(validate_job_key, key) == ("job key must look like <runner>-<job id>", "job_key")


def test_two_callers_get_two_records_of_one_job_key():
    a = record_key("arn:aws:iam::123456789012:user/a", "t3sT_1234-5005")
    b = record_key("arn:aws:iam::123456789012:user/b", "t3sT_1234-5005")

    assert a != b
    digest = hashlib.sha256(b"arn:aws:iam::123456789012:user/a").hexdigest()[:32]
    assert a == f"t3sT_1234-5005/{digest}"


def test_started_by_carries_the_record_key_and_gives_it_back():
    key = record_key("arn:aws:iam::123456789012:user/a", "t3sT_1234-5005")

    assert started_by(key) == "gl-" + key
    assert len(started_by(key)) <= 128  # ECS's limit for startedBy
    assert record_key_from_started_by(started_by(key)) == key


@pytest.mark.parametrize(
    "value",
    [
        None,
        42,
        "",
        "gl-",
        "ecs-svc/123",
        "t3sT_1234-5005/" + "a" * 32,
        "gl-t3sT_1234-5005",
        "gl-x-1/" + "A" * 32,
    ],
)
def test_a_started_by_we_did_not_write_names_no_record(value):
    assert record_key_from_started_by(value) is None


# -- the job view ------------------------------------------------------------------------------------------


def test_the_view_shows_every_documented_field_plainly_and_nothing_else():
    item = {
        "job_key": "t3sT_1234-5005",
        "attempt": Decimal(2),
        "state": "RUNNING",
        "exit_code": Decimal(0),
        "deadline": Decimal(0),
        "owner": "arn:aws:iam::123456789012:user/a",
        "request_hash": "abc",
        "launch_lease_until": Decimal(5),
        "ssh_host_key": "secret",
    }

    view = job_view(item)

    assert list(view) == list(VIEW_FIELDS)
    assert view["attempt"] == 2 and type(view["attempt"]) is int
    assert view["exit_code"] == 0 and type(view["exit_code"]) is int
    assert view["deadline"] == "1970-01-01T00:00:00.000Z"
    assert view["task_arn"] is None
    assert "owner" not in view and "ssh_host_key" not in view and "launch_lease_until" not in view


def test_a_job_without_a_deadline_shows_none():
    assert job_view({"job_key": "k"})["deadline"] is None


def test_a_host_key_is_no_longer_taken_from_the_caller():
    # The task makes its own host key (design.md "The task's host key"): a private key in the body is refused.
    assert refused(ssh_host_key=HOST) == ("unknown field 'ssh_host_key'", "ssh_host_key")
