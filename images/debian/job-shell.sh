#!/bin/bash
# job-shell: sshd's ForceCommand when the job runs in an image of its own (design.md "Per-job images").
#
# The task then has two containers (and one per service): this image's, running sshd (the driver's way in),
# and the job's, running the job's image as is with a command that only waits (`sh -c ... fargate-ci-job`).
# The task shares one PID namespace (`pidMode: task`), so every SSH session (a stage, prepare's `true`,
# a cancel's `kill`) is run by this script inside the job container: its root filesystem
# (chroot /proc/PID/root), its environment, its working directory and its user, with the session's
# command given to the job image's /bin/sh, as `docker exec` would.
#
# Inputs (the task definition's environment of this container): CI_SERVICE_HOSTS, the service aliases to
# add to the job container's /etc/hosts (they share the task's network: 127.0.0.1); CI_SERVICE_WAIT,
# `alias:port ...` to wait for before the first stage, at most CI_SERVICE_WAIT_SECONDS (30, GitLab's
# wait_for_services_timeout) in all, with a warning in the job log for each that does not answer; and
# CI_JOB_WAIT_SECONDS (10), how long a session waits for the job container's process to appear.
set -u

fail() {
  echo "fargate-ci: $*" >&2
  exit 1
}

# The job container's waiting process: the job container's command itself, `<sh> -c <wait> fargate-ci-job`
# (taskdefs.JOB_WAIT_COMMAND), once the image's entrypoint has exec'd it or started it. The entrypoint
# before that has the marker in its arguments too, but not yet the environment and working directory it sets
# up. The pattern's brackets keep grep from finding itself.
find_job() {
  local file
  local -a argv
  for file in $(grep -lsa -- 'fargate-ci-jo[b]' /proc/[0-9]*/cmdline); do
    mapfile -d '' -t argv <"$file" 2>/dev/null || continue
    if [ "${#argv[@]}" = 4 ] && [ "${argv[1]}" = -c ] && [ "${argv[3]}" = fargate-ci-job ]; then
      file=${file#/proc/}
      echo "${file%%/*}"
    fi
  done | sort -n | head -1
}

# The task's settings, as the entrypoint wrote them (name=value lines, checked there).
CI_SERVICE_HOSTS="" CI_SERVICE_WAIT="" CI_SERVICE_WAIT_SECONDS="" CI_JOB_WAIT_SECONDS=""
while IFS='=' read -r name value; do
  case "$name" in
    CI_SERVICE_HOSTS | CI_SERVICE_WAIT | CI_SERVICE_WAIT_SECONDS | CI_JOB_WAIT_SECONDS) printf -v "$name" '%s' "$value" ;;
  esac
done </run/ci-sshd/job-shell.conf

wait_seconds=${CI_JOB_WAIT_SECONDS:-10}
case "$wait_seconds" in '' | *[!0-9]*) wait_seconds=10 ;; esac
pid=$(find_job)
tries=$((wait_seconds * 10))
while [ -z "$pid" ] && [ "$tries" -gt 0 ]; do
  sleep 0.1
  tries=$((tries - 1))
  pid=$(find_job)
done
[ -n "$pid" ] || fail "the job container's command is not running (waited ${wait_seconds}s): the container" \
  "stopped, or its image's entrypoint does not run the command it is given (it must, as in GitLab;" \
  "entrypoint: [\"\"] disables it)"
root=/proc/$pid/root
[ -x "$root/bin/sh" ] || fail "the job's image has no /bin/sh: it needs a POSIX shell"

uid=$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")
gid=$(awk '/^Gid:/ {print $2}' "/proc/$pid/status")

# GitLab's builds and cache directories are task volumes in the job container (taskdefs.JOB_DIRS): Fargate
# makes an empty one root's, 0755, so a job image whose USER is not root could not write its checkout. Once
# per task, before the first session, they become the job's user's, as GitLab's Docker executor chowns the
# build directory to the image's user (FF_DISABLE_UMASK_FOR_DOCKER_EXECUTOR). Only the directory itself,
# never a symlink's target (-h): the image is the job author's.
if [ "$uid" != 0 ] && [ ! -e /run/ci-sshd/job-dirs-owned ]; then
  owned=1
  for dir in /builds /cache; do
    if [ -d "$root$dir" ] && [ ! -L "$root$dir" ] && ! chown -h "$uid:$gid" "$root$dir"; then
      echo "fargate-ci: WARNING: cannot give $dir to the job's user ($uid:$gid)" >&2
      owned=0
    fi
  done
  [ "$owned" = 0 ] || : >/run/ci-sshd/job-dirs-owned
fi

# Service aliases, once per task, where the job container resolves names.
if [ -n "${CI_SERVICE_HOSTS:-}" ] && [ ! -e /run/ci-sshd/hosts-written ]; then
  if printf '127.0.0.1\t%s\n' "$CI_SERVICE_HOSTS" >>"$root/etc/hosts" 2>/dev/null; then
    : >/run/ci-sshd/hosts-written
  else
    echo "fargate-ci: WARNING: cannot write the service aliases into the job container's /etc/hosts" >&2
  fi
fi

# Before the first stage (the driver's stage command starts with its PID marker): the services' ports, as
# GitLab's wait-for-service does. They share this container's network, so bash's /dev/tcp reaches them.
wait_for_services() {
  local limit=${CI_SERVICE_WAIT_SECONDS:-30} start entry host port
  case "$limit" in '' | *[!0-9]*) limit=30 ;; esac
  start=$SECONDS
  echo "Waiting for services to be up and running (timeout $limit seconds)..." >&2
  for entry in $CI_SERVICE_WAIT; do
    host=${entry%:*} port=${entry##*:}
    until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
      if [ $((SECONDS - start)) -ge "$limit" ]; then
        echo "*** WARNING: Service $host probably didn't start properly: nothing answers on port $port" >&2
        break
      fi
      sleep 0.2
    done
  done
}
case "${SSH_ORIGINAL_COMMAND:-}" in
  "echo fargate-ci-stage-pid="*)
    if [ -n "${CI_SERVICE_WAIT:-}" ] && mkdir /run/ci-sshd/services-waited 2>/dev/null; then
      wait_for_services
    fi
    ;;
esac

# Its environment, as the container's main process has it (the image's ENV, ECS's variables, HOME).
env_args=()
while IFS= read -r -d '' var; do
  env_args+=("$var")
done <"/proc/$pid/environ"
env_args+=("SSH_CONNECTION=${SSH_CONNECTION:-}" "SSH_CLIENT=${SSH_CLIENT:-}")
# The kernel shows the job's working directory from this container's root: from the job container's own
# root (a container runtime's pivot_root, as on Fargate) that is the path itself; under a chroot (a
# runtime that only chroots, or the test) it starts with the root's path, which is taken off.
cwd=$(readlink "/proc/$pid/cwd") || cwd=/
job_root=$(readlink "/proc/$pid/root") || job_root=/
if [ "$job_root" != / ]; then
  case "$cwd" in
    "$job_root") cwd=/ ;;
    "$job_root"/*) cwd=${cwd#"$job_root"} ;;
  esac
fi
user_args=()
if [ "$uid" != 0 ] || [ "$gid" != 0 ]; then
  user_args=("--userspec=$uid:$gid")
fi
# The job container's working directory, then the session's command (sshd sets SSH_ORIGINAL_COMMAND; none
# means a login shell was asked for, which the driver never does). chroot by its path in this image: env
# would look it up in the job's PATH, which need not name /usr/sbin.
chroot=$(command -v chroot) || fail "this image has no chroot"
# shellcheck disable=SC2016 # expanded by the job image's shell
exec env -i "${env_args[@]}" "$chroot" "${user_args[@]}" "$root" /bin/sh -c 'cd "$1" 2>/dev/null || cd /; exec /bin/sh -c "$2"' \
  job-shell "$cwd" "${SSH_ORIGINAL_COMMAND:-exit 0}"
