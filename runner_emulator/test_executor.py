"""A tiny custom-executor driver that runs stage scripts with the local bash, like GitLab Runner's
own `executors/custom/testdata/test_executor`. It speaks the real protocol, so the emulator's tests
drive it as they would drive fargate-driver:

    python -m runner_emulator.test_executor custom config|prepare|run SCRIPT STAGE|cleanup

Knobs (process environment):
    TEST_EXECUTOR_RECORD        append one JSON line per call (command, stage, selected env) to this file
    TEST_EXECUTOR_PREPARE_EXIT  prepare's exit code: a number, or "build"/"system" (the runner's codes)
    TEST_EXECUTOR_FAIL_STAGE    `stage=code`: exit with that code for that run stage instead of running it
    TEST_EXECUTOR_CONFIG        `json` (default), `garbage`, or `no-dirs`
    TEST_EXECUTOR_IGNORE_TERM   ignore SIGTERM (to exercise the runner's SIGKILL)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

RECORDED_ENV = (
    "BUILD_FAILURE_EXIT_CODE",
    "SYSTEM_FAILURE_EXIT_CODE",
    "BUILD_EXIT_CODE_FILE",
    "JOB_RESPONSE_FILE",
    "TMPDIR",
    "CUSTOM_ENV_CI_JOB_ID",
    "CUSTOM_ENV_CI_JOB_STATUS",
    "CUSTOM_ENV_CI_JOB_TOKEN",
    "CUSTOM_ENV_CI_BUILDS_DIR",
    "CUSTOM_ENV_CI_PROJECT_DIR",
    "CUSTOM_ENV_CI_RUNNER_SHORT_TOKEN",
    "CUSTOM_ENV_CI_JOB_SERVICES",
)


def _code(value: str) -> int:
    if value == "build":
        return int(os.environ["BUILD_FAILURE_EXIT_CODE"])
    if value == "system":
        return int(os.environ["SYSTEM_FAILURE_EXIT_CODE"])
    return int(value)


def _record(command: str, stage: str | None = None) -> None:
    path = os.environ.get("TEST_EXECUTOR_RECORD")
    if not path:
        return
    entry = {
        "command": command,
        "stage": stage,
        "cwd": os.getcwd(),
        "pgid_is_own": os.getpgid(0) == os.getpid(),
    }
    entry["env"] = {k: os.environ.get(k) for k in RECORDED_ENV}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def main(argv: list[str]) -> int:
    if os.environ.get("TEST_EXECUTOR_IGNORE_TERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if len(argv) < 2 or argv[0] != "custom":
        print("usage: test_executor custom config|prepare|run SCRIPT STAGE|cleanup", file=sys.stderr)
        return int(os.environ.get("SYSTEM_FAILURE_EXIT_CODE", "2"))
    command = argv[1]
    if command == "config":
        _record("config")
        mode = os.environ.get("TEST_EXECUTOR_CONFIG", "json")
        if mode == "garbage":
            print("this is not JSON")
            return 0
        config = {"driver": {"name": "test-executor", "version": "1.0"}, "hostname": "test-host"}
        if mode != "no-dirs":
            base = os.path.join(os.environ["TMPDIR"], "task")
            config.update(builds_dir=f"{base}/builds", cache_dir=f"{base}/cache", builds_dir_is_shared=False)
        print("config: diagnostics go to stderr", file=sys.stderr)
        print(json.dumps(config))
        return 0
    if command == "prepare":
        _record("prepare")
        print("test executor: prepared")
        return _code(os.environ.get("TEST_EXECUTOR_PREPARE_EXIT", "0"))
    if command == "run":
        script, stage = argv[2], argv[3]
        _record("run", stage)
        fail = os.environ.get("TEST_EXECUTOR_FAIL_STAGE", "")
        if fail.partition("=")[0] == stage:
            return _code(fail.partition("=")[2])
        # Like fargate-driver: the script on the shell's stdin, not as an argument.
        with open(script, "rb") as f:
            status = subprocess.call(["bash"], stdin=f)
        if status == 0:
            return 0
        with open(os.environ["BUILD_EXIT_CODE_FILE"], "w") as f:
            f.write(f"{status if status > 0 else 1}\n")
        return int(os.environ["BUILD_FAILURE_EXIT_CODE"])
    if command == "cleanup":
        _record("cleanup")
        print("test executor: cleaned up")
        return 0
    print(f"unknown command {command}", file=sys.stderr)
    return int(os.environ.get("SYSTEM_FAILURE_EXIT_CODE", "2"))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
