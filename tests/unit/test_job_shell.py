"""images/debian/job-shell.sh against a real job container process: its image's user, working directory and
environment, and the builds directory it may write.

The sandbox maps only uid 0 (it runs unprivileged), so it cannot show a job image whose USER is not root.
Here, as root (CI runs as root), a "job container" is a process chroot'ed into a busybox root filesystem as
the image's user, in its WORKDIR, with its environment and the job container's waiting command line; the
real job-shell.sh then runs a session as sshd's ForceCommand would. A private PID namespace stands for the
task's shared one (`pidMode: task`: job-shell.sh finds the job's process in /proc) and keeps other tasks'
processes on this machine out of sight; a private mount namespace gives it its own /run (its settings file,
/run/ci-sshd/job-shell.conf, is a fixed path).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from chalicelib.taskdefs import JOB_WAIT_COMMAND
from sandbox.images import BUSYBOX, ImageStore, _is_static
from tests.conftest import REPO_ROOT

JOB_SHELL = REPO_ROOT / "images" / "debian" / "job-shell.sh"
WORKDIR = "/srv/app"  # the image's WORKDIR
SESSION = (
    'id -u; id -g; pwd; echo "mark=$JOB_MARK home=$HOME sidecar=${SIDECAR_ONLY:-none}"; '
    "touch /builds/x && ls -ln /builds; touch /cache/y && ls -ln /cache"
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a process of another user, chroot, namespaces"),
    pytest.mark.skipif(not (shutil.which("unshare") and shutil.which("chroot")), reason="no unshare, chroot"),
    pytest.mark.skipif(not _is_static(BUSYBOX), reason=f"needs a static {BUSYBOX} (busybox-static)"),
]

# Runs as PID 1 of a new PID and mount namespace; its exit ends every process in it. The job container's
# command line shows the marker only once it has its image's root, user and working directory: the marker is
# written split here, so job-shell.sh cannot find an earlier stage of it (env, chroot) instead.
HARNESS = r"""
set -eu
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -m 0700 /run/ci-sshd
printf '%s\n' "$CONF" >/run/ci-sshd/job-shell.conf
mount --bind /dev "$ROOTFS/dev"  # a container runtime's /dev (the image's shell opens /dev/null)
chroot=$(command -v chroot)
set --
if [ -n "${ENTRYPOINT:-}" ]; then
  set -- "$IMAGE_SH" -c "$ENTRYPOINT" entrypoint
fi
env -i PATH=/usr/bin:/bin HOME=/home/app JOB_MARK=from-the-image \
  "$chroot" --userspec="$JOB_USER" "$ROOTFS" "$IMAGE_SH" -c 'cd "$1" && shift && exec "$@" "fargate-ci-"job' \
  container "$WORKDIR" "$@" "$IMAGE_SH" -c "$WAIT" &
status=0
env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin SIDECAR_ONLY=sidecar-secret SSH_ORIGINAL_COMMAND="$SESSION" \
  SSH_CONNECTION="192.0.2.1 50000 192.0.2.2 22" /bin/bash "$JOB_SHELL" || status=$?
exit "$status"
"""


@pytest.fixture(scope="module")
def busybox_root(tmp_path_factory) -> Path:
    """The sandbox's busybox image: a root filesystem holding only the static busybox and its applets."""
    store = ImageStore(tmp_path_factory.mktemp("images"))
    store.build()
    return store.busybox_root


def image(busybox_root: Path, tmp_path: Path) -> Path:
    """A job image's root: busybox, its WORKDIR, and /builds and /cache as Fargate mounts an empty task
    volume (root's, 0755; AWS ECS developer guide, "Use bind mounts with Amazon ECS")."""
    rootfs = tmp_path / "rootfs"
    shutil.copytree(busybox_root, rootfs, symlinks=True)
    for directory in ("builds", "cache", WORKDIR.strip("/"), "tmp", "dev"):
        (rootfs / directory).mkdir(parents=True)
        (rootfs / directory).chmod(0o755)
    return rootfs


def run_session(
    rootfs: Path, user: str, image_sh: str = "/bin/sh", entrypoint: str = "", conf: str = ""
) -> subprocess.CompletedProcess:
    """The job container (`entrypoint`: the image's, a shell script given the container's command), then one
    session by job-shell.sh (`conf`: the task's settings, as the entrypoint writes them)."""
    env = {
        "CONF": conf,
        "ENTRYPOINT": entrypoint,
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "ROOTFS": str(rootfs),
        "JOB_USER": user,
        "IMAGE_SH": image_sh,
        "WORKDIR": WORKDIR,
        "WAIT": JOB_WAIT_COMMAND[2],
        "SESSION": SESSION,
        "JOB_SHELL": str(JOB_SHELL),
    }
    return subprocess.run(
        ["unshare", "--mount", "--pid", "--fork", "--mount-proc", "bash", "-c", HARNESS],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def owners(listing: str, name: str) -> tuple[str, str]:
    """`ls -ln`'s owner and group of `name`."""
    for line in listing.splitlines():
        fields = line.split()
        if fields and fields[-1] == name:
            return fields[2], fields[3]
    raise AssertionError(f"{name} not listed in:\n{listing}")


def test_a_session_runs_as_the_images_user_in_its_workdir_and_may_write_the_builds_and_cache_dirs(
    busybox_root, tmp_path
):
    rootfs = image(busybox_root, tmp_path)
    done = run_session(rootfs, "1000:1000")
    assert done.returncode == 0, done.stdout + done.stderr
    # the image's user and WORKDIR, the job process's environment and none of the sidecar's
    expected = ["1000", "1000", WORKDIR, "mark=from-the-image home=/home/app sidecar=none"]
    assert done.stdout.splitlines()[:4] == expected, done.stdout
    assert owners(done.stdout, "x") == ("1000", "1000")
    assert owners(done.stdout, "y") == ("1000", "1000")
    for directory in ("builds", "cache"):
        info = (rootfs / directory).stat()
        assert (info.st_uid, info.st_gid, info.st_mode & 0o7777) == (1000, 1000, 0o755)


def test_a_root_image_still_runs_as_root_and_its_dirs_stay_roots(busybox_root, tmp_path):
    rootfs = image(busybox_root, tmp_path)
    done = run_session(rootfs, "0:0")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[:3] == ["0", "0", WORKDIR], done.stdout
    assert owners(done.stdout, "x") == ("0", "0")
    assert (rootfs / "builds").stat().st_uid == 0


def test_a_builds_dir_that_is_a_symlink_is_left_alone(busybox_root, tmp_path):
    rootfs = image(busybox_root, tmp_path)
    (rootfs / "builds").rmdir()
    (rootfs / "builds").symlink_to("/bin")  # from the sidecar, /proc/PID/root/builds would reach its /bin
    done = run_session(rootfs, "1000:1000")
    assert (rootfs / "bin").stat().st_uid == 0 and os.stat("/bin").st_uid == 0
    assert done.stdout.splitlines()[:3] == ["1000", "1000", WORKDIR], done.stdout + done.stderr
    assert owners(done.stdout, "y") == ("1000", "1000")  # the real directory still became the user's


def test_an_image_without_bin_sh_gets_a_clear_error(busybox_root, tmp_path):
    rootfs = image(busybox_root, tmp_path)
    (rootfs / "bin" / "sh").unlink()  # busybox's other shell starts the job container's process
    done = run_session(rootfs, "1000:1000", image_sh="/bin/ash")
    assert done.returncode == 1
    assert done.stderr.strip() == "fargate-ci: the job's image has no /bin/sh: it needs a POSIX shell"
    assert done.stdout == ""


def test_a_session_runs_where_the_images_entrypoint_leaves_the_job_container(busybox_root, tmp_path):
    # An entrypoint that sets up before it execs the container's command (docker-entrypoint.sh style): its
    # arguments end in the marker too, but the session waits for the command itself.
    rootfs = image(busybox_root, tmp_path)
    (rootfs / "srv" / "ep").mkdir()
    setup = 'sleep 1; export JOB_MARK=from-the-entrypoint; cd /srv/ep && exec "$@"'
    done = run_session(rootfs, "1000:1000", entrypoint=setup)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[:4] == ["1000", "1000", "/srv/ep", "mark=from-the-entrypoint home=/home/app sidecar=none"]


def test_an_entrypoint_that_does_not_run_its_command_gets_a_clear_error(busybox_root, tmp_path):
    # its own arguments still end in the marker: it is not taken for the job container's command
    rootfs = image(busybox_root, tmp_path)
    done = run_session(rootfs, "1000:1000", entrypoint="sleep 600", conf="CI_JOB_WAIT_SECONDS=1")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("fargate-ci: the job container's command is not running (waited 1s)")
    assert "entrypoint does not run the command it is given" in done.stderr
