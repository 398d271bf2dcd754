"""What an operator gets from each orchestrator setting: its default, the value it takes, and the exact
message that names a bad one (the Lambda refuses to start with it)."""

from __future__ import annotations

import os

import pytest

from chalicelib import settings as settings_module
from chalicelib.errors import ConfigurationError
from chalicelib.settings import CapacityShare, Settings, current_settings, load_settings

BASE = {
    "FARGATE_CLUSTER": "ci",
    "FARGATE_SUBNETS": "subnet-a, subnet-b",
    "FARGATE_SECURITY_GROUPS": "sg-1,sg-2",
    "FARGATE_TASK_DEFINITION": "ci-coordinator",
    "JOBS_TABLE": "jobs",
}


def refused(**change: str) -> str:
    with pytest.raises(ConfigurationError) as caught:
        load_settings({**BASE, **change})
    return str(caught.value)


def test_the_minimal_configuration_takes_every_documented_default():
    assert load_settings(BASE) == Settings(
        cluster="ci",
        subnets=("subnet-a", "subnet-b"),
        security_groups=("sg-1", "sg-2"),
        table="jobs",
        default_task_definition="ci-coordinator",
        allowed_task_definitions=(),
        container_name="ci-coordinator",
        assign_public_ip=False,
        address="private",
        platform_version="LATEST",
        capacity_providers=(),
        launch_type="FARGATE",
        max_cpu=4096,
        max_memory=16384,
        default_timeout=3600,
        max_timeout=86400,
        grace_seconds=600,
        heartbeat_timeout=900,
        retention_days=7,
        refresh_after=10,
        launch_lease=30,
        extra_tags=(),
        region="",
    )


def test_every_setting_takes_its_variables_value():
    s = load_settings(
        {
            **BASE,
            "FARGATE_CLUSTER": " prod-ci ",
            "JOBS_TABLE": " jobs-prod ",
            "FARGATE_ALLOWED_TASK_DEFINITIONS": "big, huge:3",
            "FARGATE_CONTAINER_NAME": " runner ",
            "FARGATE_ASSIGN_PUBLIC_IP": "true",
            "FARGATE_ADDRESS": " PUBLIC ",
            "FARGATE_PLATFORM_VERSION": " 1.4.0 ",
            "FARGATE_CAPACITY_PROVIDERS": "FARGATE_SPOT:3:1, FARGATE",
            "FARGATE_LAUNCH_TYPE": " FARGATE ",
            "FARGATE_MAX_CPU": "2048",
            "FARGATE_MAX_MEMORY": "8192",
            "JOB_DEFAULT_TIMEOUT": "600",
            "JOB_MAX_TIMEOUT": "7200",
            "JOB_GRACE_SECONDS": "0",
            "HEARTBEAT_TIMEOUT": "5",
            "JOB_RETENTION_DAYS": "1",
            "JOB_REFRESH_AFTER": "0",
            "TASK_EXTRA_TAGS": " team = ci , cost-centre=42,empty=",
            "AWS_REGION": " eu-west-1 ",
        }
    )

    assert s.cluster == "prod-ci" and s.table == "jobs-prod"
    assert s.allowed_task_definitions == ("big", "huge:3")
    assert s.container_name == "runner"
    assert s.assign_public_ip is True and s.address == "public"
    assert s.platform_version == "1.4.0"
    assert s.capacity_providers == (CapacityShare("FARGATE_SPOT", 3, 1), CapacityShare("FARGATE", 1, 0))
    assert s.launch_type == "FARGATE"
    assert (s.max_cpu, s.max_memory) == (2048, 8192)
    assert (s.default_timeout, s.max_timeout, s.grace_seconds) == (600, 7200, 0)
    assert (s.heartbeat_timeout, s.retention_days, s.refresh_after) == (5, 1, 0)
    assert s.extra_tags == (("team", "ci"), ("cost-centre", "42"), ("empty", ""))
    assert s.region == "eu-west-1"


def test_the_region_falls_back_to_aws_default_region():
    assert load_settings({**BASE, "AWS_DEFAULT_REGION": "us-east-2"}).region == "us-east-2"
    assert load_settings({**BASE, "AWS_REGION": "eu-north-1", "AWS_DEFAULT_REGION": "us-east-2"}).region == (
        "eu-north-1"
    )


@pytest.mark.parametrize("blank", ["", "   "])
def test_blank_optional_values_mean_the_default(blank):
    s = load_settings(
        {
            **BASE,
            "FARGATE_ADDRESS": blank,
            "FARGATE_LAUNCH_TYPE": blank,
            "FARGATE_CONTAINER_NAME": blank,
            "FARGATE_PLATFORM_VERSION": blank,
            "FARGATE_ASSIGN_PUBLIC_IP": blank,
            "FARGATE_MAX_CPU": blank,
            "JOB_RETENTION_DAYS": blank,
        }
    )

    assert (s.address, s.launch_type, s.container_name, s.platform_version) == (
        "private",
        "FARGATE",
        "ci-coordinator",
        "LATEST",
    )
    assert (s.assign_public_ip, s.max_cpu, s.retention_days) == (False, 4096, 7)


@pytest.mark.parametrize("word", ["true", "1", "yes", "enabled", "TRUE", " Yes "])
def test_true_is_spelled_several_ways(word):
    assert load_settings({**BASE, "FARGATE_ASSIGN_PUBLIC_IP": word}).assign_public_ip is True


@pytest.mark.parametrize("word", ["false", "0", "no", "disabled", "FALSE"])
def test_false_is_spelled_several_ways(word):
    assert load_settings({**BASE, "FARGATE_ASSIGN_PUBLIC_IP": word}).assign_public_ip is False


# -- the messages ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["FARGATE_CLUSTER", "JOBS_TABLE", "FARGATE_TASK_DEFINITION"])
def test_a_missing_required_setting_is_named(name):
    env = {k: v for k, v in BASE.items() if k != name}

    with pytest.raises(ConfigurationError) as caught:
        load_settings(env)

    assert str(caught.value) == f"orchestrator setting {name} is required"


@pytest.mark.parametrize("name", ["FARGATE_SUBNETS", "FARGATE_SECURITY_GROUPS"])
def test_a_list_without_values_is_named(name):
    assert (
        refused(**{name: " , ,"}) == f"orchestrator setting {name} needs at least one value (comma-separated)"
    )


def test_a_number_that_is_no_integer_is_named_with_the_value():
    assert (
        refused(JOB_MAX_TIMEOUT="ten") == "orchestrator setting JOB_MAX_TIMEOUT must be an integer, got 'ten'"
    )


@pytest.mark.parametrize(
    ("name", "minimum"),
    [
        ("FARGATE_MAX_CPU", 256),
        ("FARGATE_MAX_MEMORY", 512),
        ("JOB_DEFAULT_TIMEOUT", 60),
        ("JOB_MAX_TIMEOUT", 60),
        ("HEARTBEAT_TIMEOUT", 5),
        ("JOB_RETENTION_DAYS", 1),
        ("JOB_GRACE_SECONDS", 0),
        ("JOB_REFRESH_AFTER", 0),
    ],
)
def test_each_number_has_a_minimum_it_names_and_accepts(name, minimum):
    assert refused(**{name: str(minimum - 1)}) == (
        f"orchestrator setting {name} must be at least {minimum}, got {minimum - 1}"
    )
    fits = {"JOB_DEFAULT_TIMEOUT": "60"} if name == "JOB_MAX_TIMEOUT" else {}
    value = getattr(load_settings({**BASE, **fits, name: str(minimum)}), _FIELDS[name])
    assert value == minimum


_FIELDS = {
    "FARGATE_MAX_CPU": "max_cpu",
    "FARGATE_MAX_MEMORY": "max_memory",
    "JOB_DEFAULT_TIMEOUT": "default_timeout",
    "JOB_MAX_TIMEOUT": "max_timeout",
    "HEARTBEAT_TIMEOUT": "heartbeat_timeout",
    "JOB_RETENTION_DAYS": "retention_days",
    "JOB_GRACE_SECONDS": "grace_seconds",
    "JOB_REFRESH_AFTER": "refresh_after",
}


def test_a_word_that_is_neither_true_nor_false_is_named():
    assert refused(FARGATE_ASSIGN_PUBLIC_IP="Maybe") == (
        "orchestrator setting FARGATE_ASSIGN_PUBLIC_IP must be true or false, got 'maybe'"
    )


def test_an_unknown_capacity_provider_is_named():
    assert refused(FARGATE_CAPACITY_PROVIDERS="FARGATE,EC2:1") == (
        "orchestrator setting FARGATE_CAPACITY_PROVIDERS: unknown provider 'EC2' (FARGATE or FARGATE_SPOT)"
    )


@pytest.mark.parametrize("item", ["FARGATE:x", "FARGATE:1:y"])
def test_a_capacity_share_that_does_not_parse_is_named(item):
    assert refused(FARGATE_CAPACITY_PROVIDERS=item) == (
        f"orchestrator setting FARGATE_CAPACITY_PROVIDERS: {item!r} is not PROVIDER:WEIGHT[:BASE]"
    )


def test_capacity_shares_all_weighing_nothing_are_refused():
    assert refused(FARGATE_CAPACITY_PROVIDERS="FARGATE:0,FARGATE_SPOT:0:2") == (
        "orchestrator setting FARGATE_CAPACITY_PROVIDERS needs one weight above 0"
    )


def test_one_share_weighing_something_is_enough():
    s = load_settings({**BASE, "FARGATE_CAPACITY_PROVIDERS": "FARGATE:0:1,FARGATE_SPOT:1"})
    assert s.capacity_providers == (CapacityShare("FARGATE", 0, 1), CapacityShare("FARGATE_SPOT", 1, 0))


@pytest.mark.parametrize("item", ["team", "=ci", " =ci"])
def test_a_tag_that_is_not_key_equals_value_is_named(item):
    assert refused(TASK_EXTRA_TAGS=f"ok=1,{item}") == (
        f"orchestrator setting TASK_EXTRA_TAGS: {item.strip()!r} is not KEY=VALUE"
    )


@pytest.mark.parametrize(
    "name", ["ci coordinator", "arn:aws:ecs:eu-west-1:12345:task-definition/x", "x:y", "a" * 256]
)
def test_a_task_definition_that_is_no_name_or_arn_is_named(name):
    assert refused(FARGATE_TASK_DEFINITION=name) == (
        f"orchestrator setting: {name!r} is not a task definition name or ARN"
    )
    assert refused(FARGATE_ALLOWED_TASK_DEFINITIONS=f"ok,{name}") == (
        f"orchestrator setting: {name!r} is not a task definition name or ARN"
    )


@pytest.mark.parametrize(
    "name",
    ["ci-coordinator", "ci_2:13", "arn:aws:ecs:eu-west-1:123456789012:task-definition/ci:4", "a" * 255],
)
def test_task_definition_names_and_arns_are_taken(name):
    assert load_settings({**BASE, "FARGATE_TASK_DEFINITION": name}).default_task_definition == name


def test_an_unknown_address_kind_is_named():
    assert refused(FARGATE_ADDRESS="IPv6") == (
        "orchestrator setting FARGATE_ADDRESS must be private or public, got 'ipv6'"
    )


def test_a_public_address_needs_a_public_ip():
    assert refused(FARGATE_ADDRESS="public") == (
        "orchestrator setting FARGATE_ADDRESS=public needs FARGATE_ASSIGN_PUBLIC_IP=true"
    )


def test_another_launch_type_is_named():
    assert refused(FARGATE_LAUNCH_TYPE="EC2") == (
        "orchestrator setting FARGATE_LAUNCH_TYPE must be FARGATE, got 'EC2'"
    )


def test_a_default_timeout_above_the_maximum_is_refused_and_equal_is_fine():
    assert refused(JOB_DEFAULT_TIMEOUT="3601", JOB_MAX_TIMEOUT="3600") == (
        "orchestrator setting JOB_DEFAULT_TIMEOUT is above JOB_MAX_TIMEOUT"
    )
    assert (
        load_settings({**BASE, "JOB_DEFAULT_TIMEOUT": "3600", "JOB_MAX_TIMEOUT": "3600"}).max_timeout == 3600
    )


# -- the task definition allowlist -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("default", "entries", "asked", "allowed"),
    [
        ("ci-coordinator", "", "ci-coordinator", True),
        ("ci-coordinator:3", "", "ci-coordinator:3", True),
        ("ci-coordinator:3", "", "ci-coordinator:4", False),
        ("ci-coordinator:3", "", "ci-coordinator", False),
        ("ci-coordinator", "big", "big:12", True),
        ("ci-coordinator", "big", "bigger", False),
        ("ci-coordinator", "big", "bi", False),
        ("ci-coordinator", "arn:aws:ecs:eu-west-1:123456789012:task-definition/big:2", "big:2", True),
        ("ci-coordinator", "arn:aws:ecs:eu-west-1:123456789012:task-definition/big", "big:7", True),
        (
            "ci-coordinator",
            "",
            "arn:aws:ecs:us-east-1:999999999999:task-definition/ci-coordinator:1",
            True,
        ),
        ("ci-coordinator", "small,big:2", "big:2", True),
        ("ci-coordinator", "small,big:2", "big:1", False),
    ],
)
def test_the_allowlist_takes_families_revisions_and_arns(default, entries, asked, allowed):
    s = load_settings(
        {**BASE, "FARGATE_TASK_DEFINITION": default, "FARGATE_ALLOWED_TASK_DEFINITIONS": entries}
    )

    assert s.is_allowed_task_definition(asked) is allowed


def test_the_lambdas_settings_are_read_from_its_environment_once(monkeypatch):
    for name, value in BASE.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("FARGATE_CLUSTER", "from-the-environment")
    current_settings.cache_clear()
    try:
        first = current_settings()
        monkeypatch.setenv("FARGATE_CLUSTER", "changed-later")
        assert first.cluster == "from-the-environment"
        assert current_settings() is first
    finally:
        current_settings.cache_clear()
    assert settings_module.os is os
