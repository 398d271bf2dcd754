"""Job identity (design.md "Job identity"): from GitLab Runner's job payload and the driver's config, never
from the job's variables; and the POST /jobs body."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import settings as examples
from hypothesis import strategies as st

from fargate_ci_driver import job_marker
from fargate_ci_driver.errors import ConfigError, JobInputError
from fargate_ci_driver.job import (
    create_body,
    gitlab_instance,
    identity_warnings,
    job_from_payload,
    read_job_payload,
    runner_name,
    task_request,
)
from fargate_ci_driver.settings import parse
from runner_emulator.job import JobSpec, Variable
from runner_emulator.payload import job_payload

FIXTURE = Path(__file__).parent.parent / "fixtures" / "job_response.json"
PAYLOAD = json.loads(FIXTURE.read_text())
TOKEN = PAYLOAD["token"]


def settings(**runner: str):
    document = {
        "Fargate": {"Region": "eu-west-1", "TaskDefinition": "ci-coordinator", "PlatformVersion": "1.4.0"},
        "TaskMetadata": {"Directory": "/m"},
        "Orchestrator": {"URL": "http://127.0.0.1:1"},
    }
    if runner:
        document["Runner"] = runner
    return parse(document)


SETTINGS = settings(ShortToken="t3sT1234")
# What the job's variables say; the identity never comes from here.
ENV = {
    "CUSTOM_ENV_CI_RUNNER_SHORT_TOKEN": "t3sT1234",
    "CUSTOM_ENV_CI_SERVER_URL": "https://gitlab.example.com",
    "CUSTOM_ENV_CI_PROJECT_ID": "42",
    "CUSTOM_ENV_CI_PROJECT_PATH": "group/app",
    "CUSTOM_ENV_CI_PIPELINE_ID": "900",
    "CUSTOM_ENV_CI_JOB_ID": "5005",
    "CUSTOM_ENV_CI_JOB_NAME": "unit tests",
    "CUSTOM_ENV_CI_JOB_TIMEOUT": "3600",
    "CUSTOM_ENV_CI_JOB_TOKEN": "glcbt-secret",
}


def test_identity_comes_from_the_payload_and_the_config():
    job = job_from_payload(PAYLOAD, SETTINGS)
    assert job.key == "t3sT1234-5005"
    assert (job.project_id, job.pipeline_id, job.project_path, job.job_name, job.timeout_seconds) == (
        "42",
        "900",
        "group/app",
        "unit tests",
        3600,
    )
    assert job.gitlab_url == "https://gitlab.example.com"
    assert TOKEN not in repr(job)  # repo_url carries the job token; the job keeps only the instance


def test_without_a_short_token_the_runner_is_named_after_the_gitlab_instance():
    expected = "u" + hashlib.sha256(b"https://gitlab.example.com").hexdigest()[:11]
    job = job_from_payload(PAYLOAD, settings())
    assert job.runner == expected and len(job.key) <= 32
    assert job_marker.valid_key(job.key)
    # A configured GitLabURL wins over the payload's repo_url.
    other = settings(GitLabURL="https://git.internal:8443/gl")
    assert job_from_payload(PAYLOAD, other).gitlab_url == "https://git.internal:8443/gl"
    assert runner_name(other, "https://git.internal:8443/gl") != expected


@pytest.mark.parametrize(
    ("repo_url", "path", "instance"),
    [
        (
            "https://gitlab-ci-token:tok@gitlab.example.com/group/app.git",
            "group/app",
            "https://gitlab.example.com",
        ),
        (
            "https://gitlab-ci-token:tok@example.com:8443/gitlab/g/sub/app.git",
            "g/sub/app",
            "https://example.com:8443/gitlab",
        ),
        ("http://gitlab-ci-token:tok@[::1]:8080/g/app.git", "g/app", "http://[::1]:8080"),
        ("https://gitlab-ci-token:tok@host/elsewhere.git", "g/app", "https://host"),
        ("ssh://git@host/g/app.git", "g/app", None),
        ("", "g/app", None),
        (None, "g/app", None),
        ("https://gitlab-ci-token:tok@host:notaport/g/app.git", "g/app", None),
    ],
)
def test_the_gitlab_instance_is_the_repo_url_without_credentials_or_project(repo_url, path, instance):
    assert gitlab_instance({"repo_url": repo_url}, path) == instance
    if instance:
        assert "tok" not in instance


def test_no_instance_and_no_short_token_is_a_config_error_naming_the_key():
    payload = copy.deepcopy(PAYLOAD)
    payload["git_info"]["repo_url"] = "git@host:g/app.git"
    with pytest.raises(ConfigError, match=r"set \[Runner\] ShortToken"):
        job_from_payload(payload, settings())


def _broken(path: str, value: object) -> dict:
    payload = copy.deepcopy(PAYLOAD)
    target = payload
    *parents, last = path.split(".")
    for name in parents:
        target = target[name]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return payload


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("id", "5005", "id is not a GitLab id .* got str"),
        ("id", True, "id is not a GitLab id .* got bool"),
        ("id", 0, "id is not a GitLab id .* got 0"),
        ("id", 2**63, "id is not a GitLab id"),
        ("id", KeyError, "id is not a GitLab id .* got NoneType"),
        ("job_info.project_id", 4.2, "job_info.project_id is not a GitLab id"),
        ("job_info.pipeline_id", KeyError, "job_info.pipeline_id is not a GitLab id"),
        ("job_info", [], "job_info is missing or not an object"),
        ("job_info.project_full_path", 7, "job_info.project_full_path is not a string"),
    ],
)
def test_a_malformed_payload_is_named(path, value, message):
    with pytest.raises(ConfigError, match=message):
        job_from_payload(_broken(path, value), SETTINGS)


def test_reading_the_payload_file(tmp_path):
    with pytest.raises(ConfigError, match="JOB_RESPONSE_FILE is not set"):
        read_job_payload({})
    with pytest.raises(ConfigError, match="cannot read the job payload"):
        read_job_payload({"JOB_RESPONSE_FILE": str(tmp_path / "missing.json")})
    for text, what in (("{not json", "not JSON"), ("[1]", "not a JSON object"), ("[" * 100000, "not JSON")):
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(ConfigError, match=what):
            read_job_payload({"JOB_RESPONSE_FILE": str(tmp_path / "bad.json")})
    assert read_job_payload({"JOB_RESPONSE_FILE": str(FIXTURE)}) == PAYLOAD


def test_the_emulators_payload_has_the_fixtures_shape():
    job = JobSpec(script=["true"], job_id=1, variables={"CI_JOB_ID": "999"})
    payload = job_payload(job, "https://gitlab.example.com", [Variable("CI_JOB_ID", "999")])

    def shape(value: object) -> object:
        if isinstance(value, dict):
            return {k: shape(v) for k, v in value.items()}
        return type(value).__name__ if not isinstance(value, list) else "list"

    assert shape(payload) == shape(PAYLOAD)
    assert payload["id"] == 1  # the job's own id, whatever its variables say


def test_disagreeing_job_variables_are_warned_about_and_lose():
    job = job_from_payload(PAYLOAD, SETTINGS)
    assert identity_warnings(job, ENV, SETTINGS) == []
    env = {
        **ENV,
        "CUSTOM_ENV_CI_JOB_ID": "4004",
        "CUSTOM_ENV_CI_PROJECT_ID": "1",
        "CUSTOM_ENV_CI_PIPELINE_ID": "2",
        "CUSTOM_ENV_CI_SERVER_URL": "https://evil.example.com",
        "CUSTOM_ENV_CI_RUNNER_SHORT_TOKEN": "victim01",
    }
    warnings = identity_warnings(job, env, SETTINGS)
    assert [w.split("=")[0] for w in warnings] == [
        "WARNING: job variable CI_JOB_ID",
        "WARNING: job variable CI_PROJECT_ID",
        "WARNING: job variable CI_PIPELINE_ID",
        "WARNING: job variable CI_SERVER_URL",
        "WARNING: job variable CI_RUNNER_SHORT_TOKEN",
    ]
    assert "'4004' disagrees with the job payload's id (5005): using 5005" in warnings[0]
    assert "[Runner] ShortToken (t3sT1234)" in warnings[4]
    assert job_from_payload(PAYLOAD, SETTINGS).key == "t3sT1234-5005"  # the variables change nothing
    # Without a configured short token there is nothing trusted to compare the variable with.
    assert not any("SHORT_TOKEN" in w for w in identity_warnings(job, env, settings()))
    # A long value is cut short, not copied whole into the log.
    long = identity_warnings(job, {"CUSTOM_ENV_CI_JOB_ID": "9" * 5000}, SETTINGS)[0]
    assert len(long) < 400


def test_the_job_marker_is_created_once_and_read_back(tmp_path):
    env = {"JOB_RESPONSE_FILE": str(tmp_path / "response.json")}
    assert job_marker.read(env) is None
    path = job_marker.write(env, "t3sT1234-5005")
    assert path == str(tmp_path / "fargate-driver-job")
    assert job_marker.read(env) == "t3sT1234-5005"
    job_marker.write(env, "t3sT1234-5005")  # the same key again: fine
    with pytest.raises(FileExistsError):
        job_marker.write(env, "t3sT1234-6006")  # never overwritten
    assert job_marker.read(env) == "t3sT1234-5005"
    (tmp_path / "fargate-driver-job").write_text("../../etc-1\n")
    assert job_marker.read(env) is None  # not a job key: not trusted as one
    assert job_marker.read({"JOB_RESPONSE_FILE": "relative/response.json"}) is None
    for key, ok in (
        ("a-1", True),
        ("abcdefghijkl-1", True),
        ("abcdefghijklm-1", False),
        ("a-", False),
        ("-1", False),
        ("a b-1", False),
        ("a-1x", False),
    ):
        assert job_marker.valid_key(key) is ok, key


def test_the_request_prefers_flag_then_job_variable_then_toml():
    assert task_request(ENV, SETTINGS).task_definition == "ci-coordinator"
    env = {
        **ENV,
        "CUSTOM_ENV_FARGATE_TASK_DEFINITION": "ci-node:4",
        "CUSTOM_ENV_FARGATE_PLATFORM_VERSION": "LATEST",
    }
    request = task_request(env, SETTINGS)
    assert (request.task_definition, request.platform_version) == ("ci-node:4", "LATEST")
    request = task_request(env, SETTINGS, task_def_flag="ci-flag:1", platform_version_flag="1.3.0")
    assert (request.task_definition, request.platform_version) == ("ci-flag:1", "1.3.0")


def test_cpu_and_memory_job_variables():
    request = task_request(
        {**ENV, "CUSTOM_ENV_FARGATE_CPU": "1024", "CUSTOM_ENV_FARGATE_MEMORY": "4096"}, SETTINGS
    )
    assert (request.cpu, request.memory) == (1024, 4096)
    with pytest.raises(JobInputError, match="FARGATE_MEMORY='100'"):
        task_request({**ENV, "CUSTOM_ENV_FARGATE_MEMORY": "100"}, SETTINGS)


def test_the_body_has_the_designs_fields_and_no_unset_ones():
    job = job_from_payload(PAYLOAD, SETTINGS)
    body = create_body(job, task_request(ENV, SETTINGS), "ssh-ed25519 AAAA c")
    assert body == {
        "runner": "t3sT1234",
        "job_id": "5005",
        "gitlab_url": "https://gitlab.example.com",
        "project_id": "42",
        "pipeline_id": "900",
        "project_path": "group/app",
        "job_name": "unit tests",
        "ssh_public_key": "ssh-ed25519 AAAA c",
        "timeout_seconds": 3600,
        "task_definition": "ci-coordinator",
        "platform_version": "1.4.0",
    }
    assert "glcbt-secret" not in repr(body)  # the job token never leaves the runner manager
    assert "PRIVATE KEY" not in repr(body)  # no private key either: the task makes its own host key


def test_generated_keys_are_ed25519_in_openssh_form_and_never_repr_their_secret():
    from fargate_ci_driver.keys import generate_ed25519

    pair = generate_ed25519("fargate-ci-t3sT1234-5005")
    assert pair.public_line.startswith("ssh-ed25519 ") and pair.public_line.endswith(
        " fargate-ci-t3sT1234-5005"
    )
    assert pair.private_pem.startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert "PRIVATE" not in repr(pair)
    assert generate_ed25519("x").public_line != pair.public_line


# --- the job key's shape: one home in the driver (job_marker), checked against the orchestrator's ----------

_KEYISH = st.text(alphabet="Aa9_-0.\n/ é", min_size=0, max_size=40)


def _orchestrator_accepts(key: str) -> bool:
    from chalicelib.errors import InvalidInput
    from chalicelib.jobs import validate_job_key

    try:
        validate_job_key(key)
    except InvalidInput:
        return False
    return True


@examples(max_examples=400)
@given(st.one_of(_KEYISH, st.builds(lambda r, n: f"{r}-{n}", _KEYISH, st.integers(0, 10**21))))
def test_the_driver_and_the_orchestrator_accept_the_same_job_keys(key):
    assert job_marker.valid_key(key) == _orchestrator_accepts(key)


@given(_KEYISH)
def test_a_short_token_is_valid_exactly_when_it_makes_valid_job_keys(name):
    assert job_marker.valid_runner(name) == _orchestrator_accepts(f"{name}-1")


def test_the_largest_gitlab_id_fits_the_key_and_a_derived_runner_name_is_a_runner():
    from fargate_ci_driver.job import MAX_ID

    assert job_marker.valid_key(f"r-{MAX_ID}") and len(str(MAX_ID)) == job_marker.ID_DIGITS_MAX
    assert job_marker.valid_runner(runner_name(settings(), "https://gitlab.example.com"))


@pytest.mark.parametrize("token", ["a" * 13, "has space", "dot.ted", "ünï"])
def test_a_bad_short_token_is_a_config_error_naming_the_key(token):
    with pytest.raises(ConfigError, match="ShortToken"):
        settings(ShortToken=token)
