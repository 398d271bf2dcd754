"""Orchestrator settings: validated once, each problem named by its variable."""

from __future__ import annotations

import pytest

from chalicelib.errors import ConfigurationError
from chalicelib.settings import CapacityShare, load_settings

BASE = {
    "FARGATE_CLUSTER": "ci",
    "FARGATE_SUBNETS": "subnet-a, subnet-b",
    "FARGATE_SECURITY_GROUPS": "sg-1",
    "FARGATE_TASK_DEFINITION": "ci-coordinator",
    "JOBS_TABLE": "jobs",
}


def test_defaults_and_lists():
    s = load_settings(BASE)
    assert s.subnets == ("subnet-a", "subnet-b")
    assert s.container_name == "ci-coordinator"
    assert s.address == "private"
    assert s.capacity_providers == ()
    assert s.launch_type == "FARGATE"


def test_registry_endpoints_point_registry_hosts_elsewhere():
    s = load_settings(
        {**BASE, "REGISTRY_ENDPOINTS": "docker.io=http://127.0.0.1:5000/, ghcr.io=https://mirror"}
    )
    assert s.registry_endpoints == (("docker.io", "http://127.0.0.1:5000"), ("ghcr.io", "https://mirror"))
    assert load_settings(BASE).registry_endpoints == ()


def test_capacity_providers_with_weights_and_base():
    s = load_settings({**BASE, "FARGATE_CAPACITY_PROVIDERS": "FARGATE_SPOT:3,FARGATE:1:1"})
    assert s.capacity_providers == (CapacityShare("FARGATE_SPOT", 3, 0), CapacityShare("FARGATE", 1, 1))


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"FARGATE_CLUSTER": ""}, "FARGATE_CLUSTER"),
        ({"FARGATE_SUBNETS": " , "}, "FARGATE_SUBNETS"),
        ({"FARGATE_SECURITY_GROUPS": ""}, "FARGATE_SECURITY_GROUPS"),
        ({"JOBS_TABLE": ""}, "JOBS_TABLE"),
        ({"FARGATE_CAPACITY_PROVIDERS": "EC2:1"}, "FARGATE_CAPACITY_PROVIDERS"),
        ({"FARGATE_CAPACITY_PROVIDERS": "FARGATE:x"}, "FARGATE_CAPACITY_PROVIDERS"),
        ({"FARGATE_CAPACITY_PROVIDERS": "FARGATE:0"}, "FARGATE_CAPACITY_PROVIDERS"),
        ({"FARGATE_ASSIGN_PUBLIC_IP": "maybe"}, "FARGATE_ASSIGN_PUBLIC_IP"),
        ({"FARGATE_ADDRESS": "public"}, "FARGATE_ADDRESS"),
        ({"FARGATE_ADDRESS": "ipv6"}, "FARGATE_ADDRESS"),
        ({"JOB_MAX_TIMEOUT": "ten"}, "JOB_MAX_TIMEOUT"),
        ({"JOB_DEFAULT_TIMEOUT": "7200", "JOB_MAX_TIMEOUT": "3600"}, "JOB_DEFAULT_TIMEOUT"),
        ({"TASK_EXTRA_TAGS": "team"}, "TASK_EXTRA_TAGS"),
        ({"FARGATE_LAUNCH_TYPE": "EC2"}, "FARGATE_LAUNCH_TYPE"),
        ({"REGISTRY_ENDPOINTS": "docker.io"}, "REGISTRY_ENDPOINTS"),
        ({"REGISTRY_ENDPOINTS": "docker.io=ftp://127.0.0.1:21"}, "REGISTRY_ENDPOINTS"),
        ({"REGISTRY_ENDPOINTS": "=http://127.0.0.1:5000"}, "REGISTRY_ENDPOINTS"),
    ],
)
def test_each_bad_setting_is_named(change, named):
    with pytest.raises(ConfigurationError, match=named):
        load_settings({**BASE, **change})


@pytest.mark.parametrize(
    ("entries", "asked", "allowed"),
    [
        ("", "ci-coordinator", True),
        ("", "ci-coordinator:7", True),
        ("big:3", "big:3", True),
        ("big:3", "big:4", False),
        ("big", "arn:aws:ecs:eu-west-1:123456789012:task-definition/big:9", True),
        ("", "other", False),
    ],
)
def test_task_definition_allowlist(entries, asked, allowed):
    s = load_settings({**BASE, "FARGATE_ALLOWED_TASK_DEFINITIONS": entries})
    assert s.is_allowed_task_definition(asked) is allowed
