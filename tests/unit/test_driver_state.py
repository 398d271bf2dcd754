"""The per-job state on the runner manager and how a stopped task reads in the job log."""

from __future__ import annotations

import pytest

from fargate_ci_driver.errors import StateError, StateExists
from fargate_ci_driver.metadata import JobState, MetadataDir
from fargate_ci_driver.report import stop_summary, task_gone


def test_state_and_key_are_private_and_round_trip(tmp_path):
    directory = tmp_path / "meta"
    directory.mkdir(mode=0o755)
    store = MetadataDir(str(directory))
    store.ensure()
    assert directory.stat().st_mode & 0o777 == 0o700  # tightened: it holds private keys
    state = JobState("t3sT1234-1", 22, "root", "ssh-ed25519 AAAA host")
    store.claim(state, "-----BEGIN OPENSSH PRIVATE KEY-----\n")
    assert store.load("t3sT1234-1") == state
    state.attempt, state.task_arn = 1, "arn:x"
    store.save(state)  # the job's own later updates replace its file
    assert store.load("t3sT1234-1") == state
    for name in ("t3sT1234-1.json", "t3sT1234-1.key"):
        assert (directory / name).stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in directory.iterdir()) == [
        "t3sT1234-1.json",
        "t3sT1234-1.key",
    ]  # no temp files
    assert len(store.remove("t3sT1234-1")) == 2
    assert store.load("t3sT1234-1") is None
    assert store.remove("t3sT1234-1") == []


def test_claiming_never_overwrites_another_jobs_files(tmp_path):
    store = MetadataDir(str(tmp_path))
    theirs = JobState("t3sT1234-1", 22, "root", "ssh-ed25519 THEIRS", attempt=4, address="10.0.0.4")
    store.claim(theirs, "THEIR KEY")
    ours = JobState("t3sT1234-1", 22, "root", "ssh-ed25519 OURS")
    with pytest.raises(StateExists, match=r"t3sT1234-1\.json already exists"):
        store.claim(ours, "OUR KEY")
    assert store.load("t3sT1234-1") == theirs
    assert store.load_client_key("t3sT1234-1") == "THEIR KEY"
    # Only the key left behind (say, a prepare killed between its two writes): the state claim is undone.
    (tmp_path / "t3sT1234-2.key").write_text("STRAY")
    with pytest.raises(StateExists, match=r"t3sT1234-2\.key already exists"):
        store.claim(JobState("t3sT1234-2", 22, "root", "x"), "OUR KEY")
    assert store.load("t3sT1234-2") is None
    assert (tmp_path / "t3sT1234-2.key").read_text() == "STRAY"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "t3sT1234-1.json",
        "t3sT1234-1.key",
        "t3sT1234-2.key",
    ]


def test_a_corrupt_state_file_is_a_clear_error(tmp_path):
    (tmp_path / "k-1.json").write_text("{not json")
    with pytest.raises(StateError, match=r"k-1\.json is unreadable"):
        MetadataDir(str(tmp_path)).load("k-1")


def test_stop_summary_gives_awss_reasons_once():
    view = {
        "state": "STOPPED",
        "task_arn": "arn:t",
        "stop_code": "EssentialContainerExited",
        "stopped_reason": "Essential container in task exited",
        "container_reason": "OutOfMemoryError: Container killed due to memory usage",
        "exit_code": 137,
    }
    assert stop_summary(view) == [
        "task arn:t is STOPPED, stop code EssentialContainerExited",
        "stopped reason: Essential container in task exited",
        "container: OutOfMemoryError: Container killed due to memory usage (exit code 137)",
    ]
    assert task_gone(view)


def test_a_spot_notice_counts_as_gone_while_the_task_still_runs():
    view = {
        "state": "RUNNING",
        "stop_code": "TerminationNotice",
        "stopped_reason": "Your Spot Task was interrupted.",
    }
    assert task_gone(view)
    assert stop_summary(view)[-1] == "AWS reclaimed the Fargate Spot capacity; retry the job"
    assert not task_gone({"state": "RUNNING", "stop_code": None})
