"""Job identity and the POST /jobs body from the runner's environment (design.md "Job identity")."""

from __future__ import annotations

import hashlib

import pytest

from local_driver.errors import ConfigError, JobInputError
from local_driver.job import create_body, job_from_environ, runner_name, task_request
from local_driver.settings import parse

SETTINGS = parse(
    {
        "Fargate": {"Region": "eu-west-1", "TaskDefinition": "ci-coordinator", "PlatformVersion": "1.4.0"},
        "TaskMetadata": {"Directory": "/m"},
        "Orchestrator": {"URL": "http://127.0.0.1:1"},
    }
)
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


def test_identity_from_the_runners_variables():
    job = job_from_environ(ENV)
    assert job.key == "t3sT1234-5005"
    assert (job.project_id, job.pipeline_id, job.job_name, job.timeout_seconds) == (
        "42",
        "900",
        "unit tests",
        3600,
    )


def test_without_a_short_token_the_runner_is_named_after_the_server():
    env = {k: v for k, v in ENV.items() if k != "CUSTOM_ENV_CI_RUNNER_SHORT_TOKEN"}
    expected = "u" + hashlib.sha256(b"https://gitlab.example.com").hexdigest()[:11]
    assert runner_name(env) == expected
    assert len(job_from_environ(env).key) <= 32


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("CI_JOB_ID", "12a", "CUSTOM_ENV_CI_JOB_ID '12a' is not a GitLab id"),
        ("CI_JOB_ID", "1" * 20, "is not a GitLab id"),
        ("CI_RUNNER_SHORT_TOKEN", "has space", "CUSTOM_ENV_CI_RUNNER_SHORT_TOKEN 'has space'"),
        ("CI_JOB_TIMEOUT", "1h", "CUSTOM_ENV_CI_JOB_TIMEOUT '1h'"),
    ],
)
def test_malformed_identity_is_named(name, value, message):
    with pytest.raises(ConfigError, match=message):
        job_from_environ({**ENV, f"CUSTOM_ENV_{name}": value})


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
    job = job_from_environ(ENV)
    body = create_body(
        job, task_request(ENV, SETTINGS), "ssh-ed25519 AAAA c", "-----BEGIN OPENSSH PRIVATE KEY-----"
    )
    assert body == {
        "runner": "t3sT1234",
        "job_id": "5005",
        "gitlab_url": "https://gitlab.example.com",
        "project_id": "42",
        "pipeline_id": "900",
        "project_path": "group/app",
        "job_name": "unit tests",
        "ssh_public_key": "ssh-ed25519 AAAA c",
        "ssh_host_key": "-----BEGIN OPENSSH PRIVATE KEY-----",
        "timeout_seconds": 3600,
        "task_definition": "ci-coordinator",
        "platform_version": "1.4.0",
    }
    assert "glcbt-secret" not in repr(body)  # the job token never leaves the runner manager


def test_generated_keys_are_ed25519_in_openssh_form_and_never_repr_their_secret():
    from local_driver.keys import generate_ed25519

    pair = generate_ed25519("fargate-ci-t3sT1234-5005")
    assert pair.public_line.startswith("ssh-ed25519 ") and pair.public_line.endswith(
        " fargate-ci-t3sT1234-5005"
    )
    assert pair.private_pem.startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert "PRIVATE" not in repr(pair)
    assert generate_ed25519("x").public_line != pair.public_line
