"""What every stage works with: settings, the runner's environment, the two output streams (httpie's
Environment idea: tests hand in their own)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

from local_driver.job import job_key
from local_driver.logs import JobLog
from local_driver.metadata import MetadataDir
from local_driver.settings import Settings

if TYPE_CHECKING:
    from local_driver.api import ApiClient


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
        # Imported here: a stage served by the session agent never talks to the API (http.client, ssl).
        from local_driver import agent_client
        from local_driver.api import ApiClient

        s = self.settings
        signer = None
        if agent_client.enabled(self.environ):

            def signer(method: str, path: str, data: bytes) -> dict[str, str] | None:
                return agent_client.sign(s.metadata_dir, s.path, method, path, data)

        return ApiClient(
            s.orchestrator_url,
            s.region,
            profile=s.profile,
            credentials_file=s.credentials_file,
            timeout=s.api_timeout if timeout is None else min(timeout, s.api_timeout),
            remote_signer=signer,
        )

    def job_key(self) -> str:
        return job_key(self.environ)
