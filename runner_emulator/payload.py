"""The job payload GitLab Runner writes to `JOB_RESPONSE_FILE` for a custom-executor driver.

The shape is gitlab-runner's `spec.Job` (`common/spec/spec.go`, JSON-encoded by `executors/custom/custom.go`
`createJobResponseFile` with `json.NewEncoder`, file mode 0600 in the per-job temp directory): every field
the runner encodes is present, with Go's zero values where GitLab sent nothing. ids are JSON integers
(int64); `git_info.repo_url` carries the job token as `gitlab-ci-token:<token>@`, as GitLab sends it. The
payload always names the job's own id, project and pipeline, whatever the job's `.gitlab-ci.yml` variables
say: those only override the `CI_*` variables. `tests/fixtures/job_response.json` is one such payload.
"""

from __future__ import annotations

import json
import os
from urllib.parse import urlsplit

from runner_emulator.job import JobSpec, Variable


def repo_url(server_url: str, project_path: str, token: str) -> str:
    """`https://gitlab-ci-token:<job token>@host[/root]/<project>.git`, as GitLab hands it to the runner."""
    parts = urlsplit(server_url)
    return (
        f"{parts.scheme}://gitlab-ci-token:{token}@{parts.netloc}{parts.path.rstrip('/')}/{project_path}.git"
    )


def job_payload(job: JobSpec, server_url: str, variables: list[Variable]) -> dict:
    steps = [{"name": "script", "script": job.script, "timeout": int(job.timeout), "when": "on_success"}]
    steps += [
        {"name": n, "script": s, "timeout": int(job.timeout), "when": "on_success"}
        for n, s in job.extra_steps.items()
    ]
    if job.after_script:
        steps.append({"name": "after_script", "script": job.after_script, "timeout": 300, "when": "always"})
    for step in steps:
        step["allow_failure"] = False
    return {
        "id": job.job_id,
        "token": job.token,
        "allow_git_fetch": True,
        "job_info": {
            "name": job.name,
            "stage": job.stage,
            "pipeline_id": job.pipeline_id,
            "project_id": job.project_id,
            "project_name": job.project_name,
            "project_full_path": job.project_path,
            "namespace_id": 0,
            "root_namespace_id": 0,
            "organization_id": 1,
            "instance_id": "",
            "instance_uuid": "",
            "user_id": 1,
            "time_in_queue_seconds": 0.5,
            "project_jobs_running_on_instance_runners_count": "0",
            "queue_size": 0,
            "queue_depth": 0,
        },
        "git_info": {
            "repo_url": repo_url(server_url, job.project_path, job.token),
            "repo_object_format": "sha1",
            "ref": "main",
            "sha": "0" * 40,
            "before_sha": "0" * 40,
            "ref_type": "branch",
            "refspecs": ["+refs/heads/main:refs/remotes/origin/main"],
            "depth": 20,
            "protected": False,
        },
        "runner_info": {"timeout": int(job.timeout)},
        "inputs": None,
        "variables": [
            {
                "key": x.key,
                "value": x.value,
                "public": x.public,
                "file": x.file,
                "masked": x.masked,
                "raw": False,
            }
            for x in variables
        ],
        "steps": steps,
        "image": {
            "name": job.image or "",
            **({"entrypoint": job.image_entrypoint} if job.image_entrypoint is not None else {}),
            "executor_opts": {"docker": {}, "kubernetes": {}},
        },
        "services": [{k: v for k, v in s.items() if v not in (None, "")} for s in job.services],
        "artifacts": [{"name": "", "untracked": False, "paths": job.artifact_paths, "when": "on_success"}]
        if job.artifact_paths
        else [],
        "cache": [{"key": "default", "paths": job.cache_paths, "policy": "pull-push"}]
        if job.cache_paths
        else [],
        "credentials": [],
        "dependencies": [{"id": 1, "token": job.token, "name": "build"}] if job.has_dependencies else [],
        "features": {
            "trace_sections": True,
            "token_mask_prefixes": [],
            "failure_reasons": [],
            "tracing": None,
        },
        "policy_options": {"execution_policy_job": False, "policy_name": ""},
        "suspend_options": {},
    }


def write_job_payload(directory: str, payload: dict) -> str:
    """`<directory>/response.json`, 0600, created exclusively (custom.go creates it in a fresh temp dir)."""
    path = os.path.join(directory, "response.json")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f)
        f.write("\n")  # json.Encoder.Encode ends the value with a newline
    return path
