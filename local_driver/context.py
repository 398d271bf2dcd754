"""What every stage works with: settings, the runner's environment, the two output streams (httpie's
Environment idea: tests hand in their own)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TextIO

from local_driver.api import ApiClient
from local_driver.job import PREFIX, runner_name
from local_driver.logs import JobLog
from local_driver.metadata import MetadataDir
from local_driver.settings import Settings


@dataclass
class StageContext:
    settings: Settings
    environ: Mapping[str, str]
    stdout: TextIO = field(default_factory=lambda: sys.stdout)
    stderr: TextIO = field(default_factory=lambda: sys.stderr)
    task_def_flag: str | None = None
    platform_version_flag: str | None = None

    def __post_init__(self) -> None:
        self.job_log = JobLog(self.stdout)
        self.metadata = MetadataDir(self.settings.metadata_dir)

    def api(self, timeout: float | None = None) -> ApiClient:
        s = self.settings
        return ApiClient(
            s.orchestrator_url,
            s.region,
            profile=s.profile,
            credentials_file=s.credentials_file,
            timeout=s.api_timeout if timeout is None else min(timeout, s.api_timeout),
        )

    def job_key(self) -> str:
        """run and cleanup need only the key; it comes from the same variables prepare used."""
        from local_driver.errors import ConfigError
        from local_driver.job import DIGITS_RE

        job_id = self.environ.get(PREFIX + "CI_JOB_ID", "").strip()
        if not DIGITS_RE.match(job_id):
            raise ConfigError(
                f"{PREFIX}CI_JOB_ID {job_id!r} is not a GitLab job id: is GitLab Runner running this?"
            )
        return f"{runner_name(self.environ)}-{job_id}"
