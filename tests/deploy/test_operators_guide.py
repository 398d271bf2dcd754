"""The operator's guide: its configuration snippets are ones the driver and the runner accept, and it
answers every failure the driver reports."""

from __future__ import annotations

import json
import re
import tomllib

import pytest

from fargate_ci_driver import settings as driver_settings
from infra import generate
from tests.deploy.conftest import ROOT

GUIDE = (ROOT / "docs" / "operators-guide.md").read_text()
STAGES = ("config", "prepare", "run", "cleanup")


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", GUIDE, flags=re.DOTALL)


def _toml(marker: str) -> dict:
    (block,) = [b for b in _blocks("toml") if marker in b]
    return tomllib.loads(block)


def _section(title: str) -> str:
    return GUIDE.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_fargate_toml_is_one_the_driver_accepts():
    document = _toml("[Orchestrator]")
    settings = driver_settings.parse(document, "guide's fargate.toml")
    assert settings.orchestrator_url.endswith("/" + generate.API_STAGE)
    assert (settings.ssh_user, settings.ssh_port, settings.ssh_shell) == ("root", 22, "bash")
    assert settings.notes == (), "the example should not use keys that moved to the orchestrator"


def test_runner_config_calls_the_driver_for_every_stage():
    runner = _toml("[[runners]]")["runners"][0]
    assert runner["executor"] == "custom" and runner["shell"] == "bash"
    assert runner["builds_dir"] and runner["cache_dir"]
    custom = runner["custom"]
    for stage in STAGES:
        assert custom[f"{stage}_exec"] == "fargate-driver"
        assert custom[f"{stage}_args"] == ["--config", "/etc/gitlab-runner/fargate.toml", "custom", stage]
    # The runner must not kill prepare before the driver's own, explained, timeout.
    assert custom["prepare_exec_timeout"] > _toml("[Orchestrator]")["Job"]["PrepareTimeout"]


def test_every_stack_parameter_is_documented():
    table = _section("Deploy to AWS").split("### Stack parameters", 1)[1]
    for parameter in generate.parameters():
        assert f"`{parameter}`" in table, f"stack parameter {parameter} is missing from the guide"


def test_every_moved_go_driver_key_is_in_the_migration_table():
    migration = _section("Migrating from the Go Fargate driver")
    for key, setting in driver_settings.MOVED_TO_ORCHESTRATOR.items():
        assert f"] {key}`" in migration or f"`{key}`" in migration, key
        if setting:
            assert setting in migration, setting


def test_every_per_job_variable_is_documented():
    variables = _section("Per-job variables")
    for name in ("FARGATE_TASK_DEFINITION", "FARGATE_PLATFORM_VERSION", "FARGATE_CPU", "FARGATE_MEMORY"):
        assert f"`{name}`" in variables


@pytest.mark.parametrize(
    "failure",
    [
        "CannotPullContainerError",
        "TaskFailedToStart",
        "ResourceInitializationError",
        "NoCapacity",
        "FARGATE_SPOT",
        "SpotInterruption",
        "EssentialContainerExited",
        "SSH host key mismatch",
        "SSH not ready in time",
        "HTTP 403",
        "HTTP 409",
        "HTTP 503",
        "Task definition not allowed",
        "not a Fargate size",
        "The reaper stopped the task",
        "passed its deadline",
        "stopped sending heartbeats",
        "no CI job claims this task",
    ],
)
def test_troubleshooting_answers(failure):
    assert failure in _section("Troubleshooting")


def test_architecture_diagram_names_the_deployed_parts():
    (diagram,) = _blocks("mermaid")
    for part in (
        "fargate-driver",
        "API Gateway",
        "DynamoDB",
        "EventBridge",
        "reaper",
        "ci-coordinator",
        "SSH",
    ):
        assert part in diagram


def test_reaper_reasons_quoted_are_the_orchestrators():
    reaper = (ROOT / "chalicelib" / "reaper.py").read_text()
    quoted = re.findall(r'^- "([^"]+)"', _section("Troubleshooting"), flags=re.MULTILINE)
    assert quoted, "the guide quotes no reaper reason"
    for reason in quoted:
        assert reason in reaper, f"the reaper never says {reason!r}"


def test_settings_the_guide_names_exist():
    documented = set(re.findall(r"`((?:FARGATE|JOB|HEARTBEAT|TASK)_[A-Z_]+)`", GUIDE))
    per_job = {"FARGATE_TASK_DEFINITION", "FARGATE_PLATFORM_VERSION", "FARGATE_CPU", "FARGATE_MEMORY"}
    design = (ROOT / "docs" / "design.md").read_text()
    for name in documented - per_job:
        assert f"`{name}`" in design, f"the guide names {name}, which design.md does not define"
    assert "FARGATE_MAX_CPU" in documented  # the scan found the settings the guide names


def test_cache_bucket_rights_go_to_the_runner_manager_not_the_task_role():
    # GitLab Runner pre-signs S3 cache URLs on the manager; S3 rights on the task role would only hand
    # every job's script credentials for the bucket.
    paragraph = [p for p in GUIDE.split("\n\n") if "[runners.cache]" in p]
    assert paragraph, "the guide should say how to configure the S3 cache"
    text = " ".join(paragraph)
    assert "pre-sign" in text and "runner manager" in text
    assert not re.search(r"give the task role the bucket rights", text)
    task_role = json.dumps(generate.infra_resources()["TaskRole"])
    assert "s3:" not in task_role
