"""What every stage works with: settings, the runner's environment, the two output streams (httpie's
Environment idea: tests hand in their own)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

from local_driver import job_marker
from local_driver.errors import StateError
from local_driver.logs import JobLog
from local_driver.metadata import MetadataDir
from local_driver.settings import Settings

if TYPE_CHECKING:
    from local_driver.agent_client import Spot
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
        self._spot: Spot | None = None

    def agent_spot(self) -> Spot | None:
        """Where the session agent for this config and environment lives; None when agents are off."""
        from local_driver import agent_client

        if self._spot is None and agent_client.enabled(self.environ):
            self._spot = agent_client.Spot.read(self.settings.path, self.environ, self.settings.metadata_dir)
        return self._spot

    def api(self, timeout: float | None = None) -> ApiClient:
        # Imported here: a stage served by the session agent never talks to the API (http.client, ssl).
        from local_driver import agent_client
        from local_driver.api import ApiClient

        s = self.settings
        signer = None
        spot = self.agent_spot()
        if spot is not None:

            def signer(method: str, path: str, data: bytes) -> dict[str, str] | None:
                return agent_client.sign(spot, method, path, data)

        return ApiClient(
            s.orchestrator_url,
            s.region,
            profile=s.profile,
            credentials_file=s.credentials_file,
            timeout=s.api_timeout if timeout is None else min(timeout, s.api_timeout),
            remote_signer=signer,
        )

    def recorded_job_key(self) -> str | None:
        """The job key prepare recorded in the runner's per-job directory (`job_marker`); None when it
        recorded none (it did not run, or failed before it had a key to record)."""
        return job_marker.read(self.environ)

    def job_key(self) -> str:
        key = self.recorded_job_key()
        if key is None:
            where = job_marker.marker_path(self.environ) or "the job's directory (no JOB_RESPONSE_FILE)"
            raise StateError(
                f"prepare recorded no job in {where}: it did not run for this job, or failed before "
                "starting it"
            )
        return key
