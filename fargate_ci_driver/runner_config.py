"""`config`: the one JSON value GitLab Runner reads from config_exec's stdout (custom-executor protocol §4).

No network call and no heavy import: the runner runs this for every job attempt.
"""

from __future__ import annotations

import json
import socket

from fargate_ci_driver import DRIVER_NAME, __version__
from fargate_ci_driver.settings import Settings


def runner_config(settings: Settings) -> dict:
    config: dict = {
        "driver": {"name": DRIVER_NAME, "version": __version__},
        "hostname": socket.gethostname(),
        # Every job has its own task: nothing under builds_dir is shared between jobs.
        "builds_dir_is_shared": False,
    }
    if settings.builds_dir:
        config["builds_dir"] = settings.builds_dir
    if settings.cache_dir:
        config["cache_dir"] = settings.cache_dir
    return config


def render(settings: Settings) -> str:
    return json.dumps(runner_config(settings), separators=(",", ":")) + "\n"
