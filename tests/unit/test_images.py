"""Image references, service aliases, the allowlist, and the sandbox's image store."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from chalicelib.taskdefs import (
    InvalidImage,
    JobImages,
    allowed,
    parse_container_image,
    parse_image,
    service_aliases,
    task_definition,
)
from fargate_ci_driver.errors import JobInputError
from fargate_ci_driver.job import job_images, with_job_variables
from fargate_ci_driver.ssh import shell_exec
from runner_emulator import RunnerConfig, RunnerEmulator
from runner_emulator.job import JobSpec
from runner_emulator.payload import job_payload
from sandbox.images import BUSYBOX, ImageStore
from sandbox.layout import IMAGE


@pytest.mark.parametrize(
    ("reference", "registry", "repository", "tag", "digest"),
    [
        ("busybox", "docker.io", "library/busybox", "latest", ""),
        ("busybox:1.36", "docker.io", "library/busybox", "1.36", ""),
        ("docker.io/library/busybox:1.36", "docker.io", "library/busybox", "1.36", ""),
        ("index.docker.io/library/busybox", "docker.io", "library/busybox", "latest", ""),
        ("bitnami/redis:7.2", "docker.io", "bitnami/redis", "7.2", ""),
        ("localhost:5000/team/app", "localhost:5000", "team/app", "latest", ""),
        (
            "registry.example.com:4999/tutum/wordpress:1",
            "registry.example.com:4999",
            "tutum/wordpress",
            "1",
            "",
        ),
        ("postgres@sha256:" + "a" * 64, "docker.io", "library/postgres", "", "sha256:" + "a" * 64),
        (IMAGE, "123456789012.dkr.ecr.eu-west-1.amazonaws.com", "fargate-ci/debian", "latest", ""),
    ],
)
def test_image_references_parse_as_docker_does(reference, registry, repository, tag, digest):
    ref = parse_image(reference)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repository, tag, digest)


@pytest.mark.parametrize(
    "reference",
    [
        "",
        "Busybox",
        "busybox:",
        "busybox:bad tag",
        "a//b",
        "-x",
        "busybox\n",
        "busybox@sha256:short",
        "x" * 300,
    ],
)
def test_what_is_not_an_image_reference_is_refused(reference):
    with pytest.raises(InvalidImage):
        parse_image(reference)


def test_ecr_images_are_told_apart():
    assert parse_image(IMAGE).is_ecr
    assert not parse_image("busybox").is_ecr
    assert not parse_image("evil.com/123456789012.dkr.ecr.eu-west-1.amazonaws.com/x").is_ecr


def test_service_aliases_follow_gitlabs_rules():
    # docs/executors/docker.md "Accessing the services" (tests/fixtures/README.md)
    assert service_aliases("tutum/wordpress:latest") == ("tutum__wordpress", "tutum-wordpress")
    assert service_aliases("registry.gitlab-wp.com:4999/tutum/wordpress") == (
        "registry.gitlab-wp.com__tutum__wordpress",
        "registry.gitlab-wp.com-tutum-wordpress",
    )
    assert service_aliases("postgres:16") == ("postgres", "postgres")


def test_the_allowlist_matches_registry_and_repository_globs():
    patterns = ("busybox", "library/alpine*", "123456789012.dkr.ecr.*.amazonaws.com/*", "ghcr.io/acme/*")
    assert allowed(parse_image("busybox:1.36"), patterns)
    assert allowed(parse_image("docker.io/library/alpine3"), patterns)
    assert allowed(parse_image(IMAGE), patterns)
    assert allowed(parse_image("ghcr.io/acme/tools/builder:2"), patterns)  # * spans /
    assert not allowed(parse_image("ghcr.io/other/x"), patterns)
    assert not allowed(parse_image("evil/busybox"), patterns)
    assert not allowed(parse_image("busybox"), ())


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ImageStore:
    store = ImageStore(tmp_path_factory.mktemp("images"))
    store.build()
    return store


def test_the_store_knows_busybox_by_any_spelling_and_tag_and_nothing_unknown(store):
    for name in ("busybox", "busybox:1.36", "docker.io/library/busybox:latest"):
        image = store.resolve(name)
        assert image is not None and image.cmd == ("sh",) and image.entrypoint == ()
    assert store.resolve("alpine") is None
    assert store.resolve("evil/busybox") is None
    assert store.resolve("NOT A NAME") is None
    assert store.resolve(IMAGE.replace(":latest", ":v2")) is not None


def test_busybox_holds_only_a_static_busybox(store):
    files = sorted(p for p in store.busybox_root.rglob("*") if not p.is_symlink() and p.is_file())
    assert files == [store.busybox_root / "bin" / "busybox"]
    links = {os.readlink(p) for p in (store.busybox_root / "bin").iterdir() if p.is_symlink()}
    assert links == {"busybox"}
    for absent in ("bash", "sshd", "python3", "git"):
        assert not (store.busybox_root / "bin" / absent).exists()
    banner = subprocess.run([store.busybox_root / "bin" / "busybox"], capture_output=True, text=True).stdout
    assert banner.startswith("BusyBox v")
    assert BUSYBOX.read_bytes() == (store.busybox_root / "bin" / "busybox").read_bytes()


def test_the_task_images_etc_holds_nothing_private(store):
    etc = store.task_etc
    assert not list(etc.rglob("ssh_host_*_key"))
    assert not (etc / "gshadow").exists()
    shadow = (etc / "shadow").read_text().splitlines()
    assert shadow and all(line.split(":")[1] == "*" for line in shadow)
    sshd = next(line for line in (etc / "passwd").read_text().splitlines() if line.startswith("sshd:"))
    assert sshd.split(":")[2:4] == ["0", "0"]
    for path in etc.rglob("*"):
        if not path.is_symlink() and path.is_file():
            assert Path("/etc", path.relative_to(etc)).stat().st_mode & 0o004 or path.name in (
                "shadow",
                "passwd",
            )


# --- the driver: what it sends, and the job's shell -----------------------------------------------------


def test_the_driver_takes_the_image_from_ci_job_image_and_its_entrypoint_from_the_payload():
    environ = {
        "CUSTOM_ENV_CI_JOB_IMAGE": "busybox:1.36",
        "CUSTOM_ENV_CI_JOB_SERVICES": json.dumps(
            [{"name": "postgres:16", "alias": "db", "entrypoint": None, "command": ["postgres"]}]
        ),
    }
    payload = {"image": {"name": "busybox:1.36", "entrypoint": [""]}}
    image, services = job_images(environ, payload)
    assert image == {"name": "busybox:1.36", "entrypoint": [""]}
    assert services == [{"name": "postgres:16", "alias": "db", "command": ["postgres"]}]
    assert job_images({"CUSTOM_ENV_CI_JOB_SERVICES": ""}, {}) == (None, None)


@pytest.mark.parametrize("services", ["{not json", '{"name": "x"}', '["x"]'])
def test_malformed_ci_job_services_is_the_jobs_error_naming_the_variable(services):
    with pytest.raises(JobInputError, match="CI_JOB_SERVICES"):
        job_images({"CUSTOM_ENV_CI_JOB_SERVICES": services}, {})


@pytest.mark.parametrize(
    ("present", "runs"),
    [({"/bin/bash", "/bin/sh"}, "/bin/bash"), ({"/bin/sh"}, "/bin/sh"), ({"/busybox/sh"}, "/busybox/sh")],
)
def test_the_stage_shell_is_bash_where_present_else_sh(tmp_path, present, runs):
    """The command the driver sends, run by sh with `[ -x ]` and `exec` stubbed to a fake root."""
    command = shell_exec("bash")
    root = tmp_path / "root"
    for path in present:
        (root / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / path.lstrip("/")).write_text("")
    # POSIX sh cannot redefine `[` or `exec`: the test rewrites them to functions over a fake root.
    script = command.replace("[ -x ", "present ").replace(" ] &&", " &&")
    script = script.replace("exec ", "run ")
    prelude = f'present() {{ test -e "{root}$1"; }}; run() {{ echo "ran $1"; exit 0; }}; '
    out = subprocess.run(["sh", "-c", prelude + script], capture_output=True, text=True).stdout
    assert out.strip() == f"ran {runs}"
    assert shell_exec("zsh") == "exec zsh"


def test_the_runner_emulator_passes_image_and_services_as_gitlab_runner_does(tmp_path):
    spec = JobSpec(
        ["true"],
        image="busybox:1.36",
        image_entrypoint=[""],
        services=[{"name": "postgres:16", "alias": "db", "entrypoint": None, "command": None}],
    )
    payload = job_payload(spec, "https://gitlab.example.com", [])
    assert payload["image"]["name"] == "busybox:1.36" and payload["image"]["entrypoint"] == [""]
    assert payload["services"] == [{"name": "postgres:16", "alias": "db"}]
    emulator = RunnerEmulator(RunnerConfig.for_driver(["true"]))
    emulator._job = spec
    env = emulator._env(str(tmp_path), emulator._variables("", "", "running"), {})
    assert env["CUSTOM_ENV_CI_JOB_IMAGE"] == "busybox:1.36"
    assert json.loads(env["CUSTOM_ENV_CI_JOB_SERVICES"]) == [
        {"name": "postgres:16", "alias": "db", "entrypoint": None, "command": None}
    ]


# --- the per-job task definition ------------------------------------------------------------------------

BASE = {
    "family": "fargate-ci-dev-coordinator",
    "taskRoleArn": "arn:aws:iam::123456789012:role/task",
    "executionRoleArn": "arn:aws:iam::123456789012:role/execution",
    "cpu": "1024",
    "memory": "2048",
    "containerDefinitions": [
        {"name": "ci-coordinator", "image": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/ci:1",
         "memory": 2048, "environment": [{"name": "WATCHDOG_IDLE_SECONDS", "value": "60"}]},
    ],
}  # fmt: skip


def _definition(image: str, *services: str, credentials: str = "") -> dict:
    images = JobImages(
        image=parse_container_image(image, "image", service=False),
        services=tuple(parse_container_image(s, "services[0]", service=True) for s in services),
    )
    return task_definition(
        images, BASE, container_name="ci-coordinator", cpu=None, memory=None, credentials_arn=credentials
    )


def test_the_family_is_a_content_hash_after_the_bases_family():
    one, again, other = _definition("busybox:1"), _definition("busybox:1"), _definition("busybox:2")
    assert one == again
    assert one["family"].startswith("fargate-ci-dev-coordinator-job-") and one["family"] != other["family"]
    assert _definition("busybox:1", "postgres:16")["family"] != one["family"]


def test_private_registries_get_the_credentials_and_ecr_does_not():
    arn = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:registry-AbCdEf"
    definition = _definition(
        "ghcr.io/acme/app:1", "123456789012.dkr.ecr.eu-west-1.amazonaws.com/db:2", credentials=arn
    )
    containers = {c["name"]: c for c in definition["containerDefinitions"]}
    assert containers["job"]["repositoryCredentials"] == {"credentialsParameter": arn}
    assert "repositoryCredentials" not in containers["service-0"]
    assert "repositoryCredentials" not in containers["ci-coordinator"]  # the project's own image: ECR
    # The base's environment (the watchdog) stays; the job container's size is a soft share of the task's.
    assert {"name": "WATCHDOG_IDLE_SECONDS", "value": "60"} in containers["ci-coordinator"]["environment"]
    assert "memory" not in containers["ci-coordinator"] and definition["memory"] == "2048"


def test_the_job_container_mounts_the_builds_and_cache_dirs_on_task_volumes():
    definition = _definition("busybox:1", "postgres:16")
    containers = {c["name"]: c for c in definition["containerDefinitions"]}
    # Empty task volumes (Fargate's task storage: no host), in the job container only.
    assert definition["volumes"] == [{"name": "fargate-ci-builds"}, {"name": "fargate-ci-cache"}]
    assert containers["job"]["mountPoints"] == [
        {"sourceVolume": "fargate-ci-builds", "containerPath": "/builds", "readOnly": False},
        {"sourceVolume": "fargate-ci-cache", "containerPath": "/cache", "readOnly": False},
    ]
    assert "mountPoints" not in containers["ci-coordinator"] and "mountPoints" not in containers["service-0"]


def test_a_volume_the_base_mounts_at_cache_is_the_job_containers_too():
    efs = {"name": "cache", "efsVolumeConfiguration": {"fileSystemId": "fs-12345678"}}
    base = {
        **BASE,
        # The base's own volume named like ours is another one: ours gets another name.
        "volumes": [efs, {"name": "fargate-ci-builds"}],
        "containerDefinitions": [
            {**BASE["containerDefinitions"][0],
             "mountPoints": [{"sourceVolume": "cache", "containerPath": "/cache/", "readOnly": False}]},
        ],
    }  # fmt: skip
    images = JobImages(image=parse_container_image("busybox", "image", service=False))
    definition = task_definition(images, base, container_name="ci-coordinator", cpu=None, memory=None)
    containers = {c["name"]: c for c in definition["containerDefinitions"]}
    assert definition["volumes"] == [efs, {"name": "fargate-ci-builds"}, {"name": "fargate-ci-builds-job"}]
    assert containers["job"]["mountPoints"] == [
        {"sourceVolume": "fargate-ci-builds-job", "containerPath": "/builds", "readOnly": False},
        {"sourceVolume": "cache", "containerPath": "/cache", "readOnly": False},
    ]
    assert containers["ci-coordinator"]["mountPoints"] == base["containerDefinitions"][0]["mountPoints"]


def test_services_get_the_jobs_public_variables_expanded_and_never_a_secret():
    payload = {
        "variables": [
            {"key": "CI_PROJECT_NAME", "value": "shop", "public": True},
            {"key": "CI_JOB_TOKEN", "value": "glcbt-secret", "public": False, "masked": True},
            {"key": "DB_PASSWORD", "value": "project-secret", "public": False},
            {"key": "SHOWN", "value": "masked-but-public", "public": True, "masked": True},
            {"key": "CONFIG", "value": "/tmp/file", "public": True, "file": True},
            {"key": "POSTGRES_DB", "value": "${CI_PROJECT_NAME}_test", "public": True},
            {"key": "DSN", "value": "pg://u:$DB_PASSWORD@db/$POSTGRES_DB", "public": True},
            {"key": "MODE", "value": "job", "public": True},
        ]
    }
    services = [
        {"name": "postgres:16", "variables": [{"key": "MODE", "value": "service"}]},
        {"name": "redis"},
    ]
    merged, dropped = with_job_variables(services, payload)
    assert dropped == []
    first = {v["key"]: v["value"] for v in merged[0]["variables"]}
    second = {v["key"]: v["value"] for v in merged[1]["variables"]}
    # public variables, expanded against public ones only (a secret reference expands to nothing, as
    # GitLab's PublicOrInternal().Expand() does, in one pass); the service's own value wins; predefined
    # CI_* left out
    assert first == {
        "MODE": "service",
        "POSTGRES_DB": "shop_test",
        "DSN": "pg://u:@db/${CI_PROJECT_NAME}_test",
    }
    assert second == {"MODE": "job", "POSTGRES_DB": "shop_test", "DSN": "pg://u:@db/${CI_PROJECT_NAME}_test"}
    assert "secret" not in json.dumps(merged)


def test_job_variables_beyond_what_a_service_takes_are_named_not_sent():
    payload = {"variables": [{"key": f"V{n}", "value": "x", "public": True} for n in range(70)]}
    payload["variables"].append({"key": "BIG", "value": "y" * 5000, "public": True})
    merged, dropped = with_job_variables([{"name": "redis"}], payload)
    assert len(merged[0]["variables"]) == 64
    assert "BIG" in dropped and len(dropped) == 70 + 1 - 64
