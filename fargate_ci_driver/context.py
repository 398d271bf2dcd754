"""What every stage works with: settings, the runner's environment, the two output streams (httpie's
Environment idea: tests hand in their own)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

from fargate_ci_driver import job_marker
from fargate_ci_driver.errors import StateError
from fargate_ci_driver.logs import JobLog
from fargate_ci_driver.metadata import MetadataDir
from fargate_ci_driver.settings import Settings

if TYPE_CHECKING:
    from fargate_ci_driver.agent.protocol import StageResult
    from fargate_ci_driver.api import ApiClient
    from fargate_ci_driver.transport import Transport


@dataclass
class StageContext:
    settings: Settings
    environ: Mapping[str, str]
    stdout: TextIO = field(default_factory=lambda: sys.stdout)
    stderr: TextIO = field(default_factory=lambda: sys.stderr)
    task_def_flag: str | None = None
    platform_version_flag: str | None = None
    # What the stage fast path (`agent.fastpath`) made of this process's `run` before the full driver loaded:
    # None (not tried), a result the agent served, or `unavailable` (no agent could serve: go direct).
    fast_path: StageResult | None = None

    def __post_init__(self) -> None:
        self.job_log = JobLog(self.stdout)
        self.metadata = MetadataDir(self.settings.metadata_dir)
        self._transport: Transport | None = None

    @property
    def transport(self) -> Transport:
        """The one way this stage reaches the task and signs (`transport`), chosen here, once:
        the session agent unless agents are off, the config cannot be read, or the fast path found no agent
        able to serve."""
        if self._transport is None:
            from fargate_ci_driver.agent.protocol import Spot, enabled
            from fargate_ci_driver.transport import AgentTransport, DirectTransport

            direct = DirectTransport(self.settings, self.metadata, self.api, self.stdout, self.stderr)
            spot = None
            if enabled(self.environ) and (self.fast_path is None or self.fast_path.unavailable is None):
                spot = Spot.read(self.settings.path, self.environ, self.settings.metadata_dir)
            self._transport = (
                direct if spot is None else AgentTransport(spot, self.environ, direct, served=self.fast_path)
            )
        return self._transport

    def api(self, timeout: float | None = None) -> ApiClient:
        # Imported here: a stage served by the session agent never talks to the API (http.client, ssl).
        from fargate_ci_driver.api import ApiClient

        s = self.settings
        return ApiClient(
            s.orchestrator_url,
            s.region,
            profile=s.profile,
            credentials_file=s.credentials_file,
            timeout=s.api_timeout if timeout is None else min(timeout, s.api_timeout),
            remote_signer=self.transport.signer(),
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
