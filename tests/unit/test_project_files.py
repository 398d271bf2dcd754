"""What makes the project adoptable (issue 17): an MIT licence, and a changelog whose newest version is the
one the driver reports (`fargate-driver --version`, `custom config`'s `driver.version`, the wheel's)."""

from __future__ import annotations

import json
import re
import tomllib

from fargate_ci_driver import __version__
from fargate_ci_driver.runner_config import runner_config
from fargate_ci_driver.settings import parse
from tests.conftest import REPO_ROOT


def test_the_licence_is_mit():
    text = (REPO_ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Permission is hereby granted, free of charge" in text


def test_the_changelogs_newest_version_is_the_one_custom_config_reports(tmp_path):
    changelog = (REPO_ROOT / "CHANGELOG.md").read_text()
    versions = re.findall(r"^## (\d+\.\d+\.\d+)\b", changelog, re.MULTILINE)
    assert versions, "CHANGELOG.md has no `## X.Y.Z` entry"
    settings = parse(
        {
            "Fargate": {"Region": "eu-west-1"},
            "TaskMetadata": {"Directory": str(tmp_path)},
            "Orchestrator": {"URL": "http://127.0.0.1:1"},
        }
    )
    reported = json.loads(json.dumps(runner_config(settings)))["driver"]["version"]
    wheel = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert versions[0] == reported == __version__ == wheel
    assert len(versions) == len(set(versions))
