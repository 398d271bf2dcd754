"""Reading one job of a .gitlab-ci.yml file (PyYAML, YAML 1.1 as GitLab's parser reads it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner_emulator.gitlab_ci import PipelineError, job_from_document, load_job, parse_duration, parse_yaml

REPO = Path(__file__).resolve().parents[2]


def test_the_demo_job_reads_as_gitlab_would():
    name, job = load_job(str(REPO / "examples" / "demo-job.yml"))
    assert name == "demo"
    assert job.variables == {"GREETING": "Hello from a Fargate task", "DEPLOY_ENV": "sandbox"}
    assert job.timeout == 600
    assert job.script[0] == 'echo "$GREETING (job $CI_JOB_ID, environment $DEPLOY_ENV)"'
    assert job.script[-1].startswith("for step in build test package; do\n")
    assert job.after_script[-1] == "exit 3"


def test_the_subset():
    doc = parse_yaml(
        """
# comment
variables:
  PLAIN: some value   # trailing comment
  QUOTED: "a # not a comment\\tand a tab"
  SINGLE: 'it''s'
  NUMBER: 42
  FLAG: true
default:
  before_script: [echo one, "echo two"]
build:
  timeout: 1h 30m
  script:
    - make
    - >
      folded
      line
    - |-
      literal
        indented
"""
    )
    name, job = job_from_document(doc)
    assert name == "build"
    assert job.variables == {
        "PLAIN": "some value",
        "QUOTED": "a # not a comment\tand a tab",
        "SINGLE": "it's",
        "NUMBER": "42",
        "FLAG": "true",
    }
    assert job.script == ["echo one", "echo two", "make", "folded line\n", "literal\n  indented"]
    assert job.timeout == 5400


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("3600", 3600), ("10m", 600), ("1h 30m", 5400), ("2 hours", 7200), ("45 seconds", 45)],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a:\n  script: [x]\nb:\n  script: [y]\n", "several jobs"),
        ("variables:\n  A: 1\n", "no job with a `script:`"),
        ("job:\n  script: x\n   bad: indent\n", "line 3"),
        ("job:\n  timeout: soon\n  script: x\n", "timeout 'soon'"),
        ("job:\n  script:\n    - a: b\n", "a script must be a string or a list of strings"),
        ("job:\n  script: [x\n", "line 3"),
        ("job:\n  script:\n    - !reference [.setup, script]\n", "line 3: !reference tags are not supported"),
    ],
)
def test_what_it_cannot_read_is_named(text, message):
    with pytest.raises(PipelineError, match=message):
        job_from_document(parse_yaml(text))


def test_anchors_merge_keys_and_yaml_11_booleans_read_as_gitlab_reads_them():
    doc = parse_yaml(
        """
.common: &common
  variables:
    SHARED: "yes"
    ON_FLAG: on
  before_script: [echo common]
job:
  <<: *common
  script:
    - echo job
"""
    )
    name, job = job_from_document(doc)
    assert name == "job"
    assert job.variables == {"SHARED": "yes", "ON_FLAG": "true"}  # quoted stays text; `on` is a boolean
    assert job.script == ["echo common", "echo job"]
