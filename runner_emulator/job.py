"""A CI job as GitLab hands it to a runner, and the runner-side settings that shape how it is driven."""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass, field

_job_ids = itertools.count(int.from_bytes(secrets.token_bytes(3), "big") * 1000)


@dataclass(frozen=True)
class Variable:
    key: str
    value: str
    public: bool = True
    file: bool = False
    masked: bool = False


@dataclass
class JobSpec:
    """One job of a .gitlab-ci.yml, with the ids GitLab would give it."""

    script: list[str]
    after_script: list[str] = field(default_factory=list)
    variables: dict[str, str] = field(default_factory=dict)
    file_variables: dict[str, str] = field(default_factory=dict)
    timeout: float = 3600.0  # seconds: runner_info.timeout
    name: str = "test-job"
    stage: str = "test"
    job_id: int = field(default_factory=lambda: next(_job_ids))
    project_id: int = 4242
    project_path: str = "group/project"
    pipeline_id: int = 777
    token: str = field(default_factory=lambda: "glcbt-" + secrets.token_hex(10))
    # Optional stages: present only when the job has them (the runner skips empty stage scripts).
    extra_steps: dict[str, list[str]] = field(default_factory=dict)  # e.g. {"release": [...]}
    cache_paths: list[str] = field(default_factory=list)
    artifact_paths: list[str] = field(default_factory=list)
    has_dependencies: bool = False
    image: str | None = None
    image_entrypoint: list[str] | None = None  # `image: {entrypoint: [...]}`
    # `services:` as the Custom executor passes them: {name, alias, entrypoint, command, variables}
    services: list[dict] = field(default_factory=list)

    @property
    def namespace(self) -> str:
        return self.project_path.rsplit("/", 1)[0] if "/" in self.project_path else ""

    @property
    def project_name(self) -> str:
        return self.project_path.rsplit("/", 1)[-1]


@dataclass
class RunnerConfig:
    """`[[runners]]` and `[runners.custom]` of config.toml, plus the emulator's knobs."""

    run_exec: list[str]
    config_exec: list[str] | None = None
    prepare_exec: list[str] | None = None
    cleanup_exec: list[str] | None = None
    builds_dir: str | None = None
    cache_dir: str | None = None
    short_token: str = "t3sT1234"  # noqa: S105 - an id, not a secret
    server_url: str = "https://gitlab.example.com"
    hostname: str = "runner-emulator"
    environment: dict[str, str] = field(default_factory=dict)  # [[runners]] environment = [...]
    # Extra variables for the driver processes' own environment (AWS credentials and the like).
    process_env: dict[str, str] = field(default_factory=dict)
    graceful_kill_timeout: float = 600.0
    force_kill_timeout: float = 10.0
    config_exec_timeout: float = 3600.0
    prepare_exec_timeout: float = 3600.0
    cleanup_exec_timeout: float = 3600.0
    after_script_timeout: float = 300.0
    preparation_retries: int = 3
    preparation_retry_delay: float = 3.0
    # GitLab Runner's constants; changeable here only to prove a driver reads them from the environment.
    build_failure_exit_code: int = 1
    system_failure_exit_code: int = 2

    @classmethod
    def for_driver(cls, driver: list[str], **knobs: object) -> RunnerConfig:
        """The four execs of a Go-driver-style CLI: `<driver...> custom config|prepare|run|cleanup`."""
        return cls(
            config_exec=[*driver, "custom", "config"],
            prepare_exec=[*driver, "custom", "prepare"],
            run_exec=[*driver, "custom", "run"],
            cleanup_exec=[*driver, "custom", "cleanup"],
            **knobs,
        )
