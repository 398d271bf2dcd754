#!/bin/sh
# Task entrypoint (runs under tini in the image, under bubblewrap in the sandbox).
# It turns the job's per-task keys into an sshd that accepts only the job's client key and presents only
# the job's host key (the driver pins its public half), starts the orphan watchdog, then execs sshd in the
# foreground so the task lives exactly as long as sshd does.
#
# sshd here is a job runner, not a general SSH server: exec sessions only (no TTY, no sftp, no forwarding of
# any kind), two authentication attempts, 20 s to log in, and client-alive probes that drop a runner
# manager's connection once the manager stops answering (its machine gone: no FIN ever arrives).
#
# The watchdog stops the task when no runner manager is connected: it SIGTERMs sshd (the container exits,
# so ECS stops the task: "Essential container in task exited") once no authenticated SSH connection has
# existed for WATCHDOG_IDLE_SECONDS, or none has come within WATCHDOG_START_SECONDS of the start.
#
# Settings (the task definition's environment; whole seconds):
#   SSH_PORT                     sshd's port (22)
#   WATCHDOG_IDLE_SECONDS        no runner connection for this long stops the task (60; 0 turns the watchdog off)
#   WATCHDOG_START_SECONDS       no first runner connection within this long stops the task (120)
#   WATCHDOG_INTERVAL_SECONDS    how often the watchdog looks (2) for open connections; shorter ones are
#                                counted from sshd's log, so none is missed
#   SSHD_CLIENT_ALIVE_INTERVAL   a silent manager is probed after this long (10)
#   SSHD_CLIENT_ALIVE_COUNT_MAX  unanswered probes before sshd drops its connection (3). OpenSSH 9.2 (Debian 12)
#                                probes every other interval: a dead manager is dropped after
#                                2 x interval x (count + 1) = 80 s (measured; 40 s on paper)
#   CI_JOB_CONTAINER             set (to the job container's name) when the job runs in an image of its own:
#                                every SSH session then runs inside that container (job-shell.sh, next to
#                                this file, as sshd's ForceCommand)
set -eu

die() {
  echo "entrypoint: $*" >&2
  exit 78 # EX_CONFIG: the task was started without what it needs
}

# setting VAR NAME DEFAULT MIN: VAR becomes $NAME (or DEFAULT), which must be a whole number >= MIN.
setting() {
  eval "_value=\${$2:-$3}"
  case "$_value" in
    '' | *[!0-9]* | ??????????*) die "$2 must be a whole number (at most 9 digits), got '$_value'" ;;
  esac
  [ "$_value" -ge "$4" ] || die "$2 must be at least $4, got $_value"
  eval "$1=\$_value"
}

[ -n "${SSH_PUBLIC_KEY:-}" ] || die "SSH_PUBLIC_KEY is not set; refusing to start without the job's client key"
[ -n "${SSH_HOST_KEY:-}" ] || die "SSH_HOST_KEY is not set; refusing to start without the job's host key"

setting port SSH_PORT 22 1
[ "$port" -le 65535 ] || die "SSH_PORT must be a port number, got $port"
setting idle_limit WATCHDOG_IDLE_SECONDS 60 0
setting start_limit WATCHDOG_START_SECONDS 120 1
setting interval WATCHDOG_INTERVAL_SECONDS 2 1
setting alive_interval SSHD_CLIENT_ALIVE_INTERVAL 10 1
setting alive_count SSHD_CLIENT_ALIVE_COUNT_MAX 3 1

if [ -n "${CI_JOB_CONTAINER:-}" ]; then
  job_shell="$(dirname "$0")/job-shell.sh"
  [ -x "$job_shell" ] || [ -r "$job_shell" ] || die "CI_JOB_CONTAINER is set but $job_shell is missing"
fi

# Everything sshd needs lives under /run: writable in Docker and in the sandbox, gone with the task.
conf_dir=/run/ci-sshd
umask 077
mkdir -p "$conf_dir" /run/sshd
chmod 0755 /run/sshd # sshd's privilege-separation directory
printf '%s\n' "$SSH_HOST_KEY" >"$conf_dir/host_ed25519_key"
printf '%s\n' "$SSH_PUBLIC_KEY" >"$conf_dir/authorized_keys"

key_type=$(ssh-keygen -l -f "$conf_dir/host_ed25519_key" 2>/dev/null | awk '{print $NF}')
[ "$key_type" = "(ED25519)" ] || die "SSH_HOST_KEY must be an OpenSSH ed25519 private key"
ssh-keygen -l -f "$conf_dir/authorized_keys" >/dev/null 2>&1 ||
  die "SSH_PUBLIC_KEY is not an authorized_keys line"
[ "$(grep -c . "$conf_dir/authorized_keys")" = 1 ] || die "SSH_PUBLIC_KEY must be exactly one key"

{
  echo "Port $port"
  if [ -n "${SSHD_LISTEN_ADDRESS:-}" ]; then echo "ListenAddress $SSHD_LISTEN_ADDRESS"; fi
  echo "HostKey $conf_dir/host_ed25519_key"
  echo "AuthorizedKeysFile $conf_dir/authorized_keys"
  echo "AuthorizedPrincipalsFile none"
  echo "PidFile none"
  echo "UsePAM no"
  echo "PermitRootLogin prohibit-password"
  echo "AuthenticationMethods publickey"
  echo "PubkeyAuthentication yes"
  echo "PasswordAuthentication no"
  echo "KbdInteractiveAuthentication no"
  echo "HostbasedAuthentication no"
  echo "PermitEmptyPasswords no"
  echo "PermitUserEnvironment no"
  echo "MaxAuthTries 2"
  echo "LoginGraceTime 20"
  # The driver runs each stage as `bash` with the script on stdin over an exec channel: it asks for no
  # TTY, no subsystem, no environment and no forwarding, so none is offered (no Subsystem line: no sftp).
  echo "PermitTTY no"
  echo "DisableForwarding yes"
  echo "AllowTcpForwarding no"
  echo "AllowAgentForwarding no"
  echo "AllowStreamLocalForwarding no"
  echo "X11Forwarding no"
  echo "PermitTunnel no"
  echo "PrintMotd no"
  if [ -n "${CI_JOB_CONTAINER:-}" ]; then
    echo "ForceCommand /bin/bash $job_shell"
  fi
  echo "PrintLastLog no"
  echo "MaxStartups 100:30:200"
  # A manager that stops answering (machine gone, network cut) loses its connection (after 80 s with the
  # defaults); then the watchdog's idle timer runs.
  echo "ClientAliveInterval $alive_interval"
  echo "ClientAliveCountMax $alive_count"
  # The ECS variables reach the container's main process only; SSH sessions get a fresh environment, so
  # hand them on explicitly (jobs need them for task-role credentials and the metadata endpoint). sshd
  # honours only the first SetEnv line, so they all go on one.
  setenv=""
  for name in AWS_CONTAINER_CREDENTIALS_RELATIVE_URI AWS_CONTAINER_CREDENTIALS_FULL_URI \
    AWS_CONTAINER_AUTHORIZATION_TOKEN ECS_CONTAINER_METADATA_URI ECS_CONTAINER_METADATA_URI_V4 \
    ECS_AGENT_URI AWS_REGION AWS_DEFAULT_REGION AWS_EXECUTION_ENV; do
    value=$(printenv "$name" || true)
    case "$value" in
      '') ;;
      *[!A-Za-z0-9_./:=+@,-]*) echo "entrypoint: not passing $name to SSH sessions: unexpected characters" >&2 ;;
      *) setenv="$setenv $name=$value" ;;
    esac
  done
  if [ -n "$setenv" ]; then echo "SetEnv$setenv"; fi
} >"$conf_dir/sshd_config"

# job-shell.sh's settings: sshd gives sessions a fresh environment, so they go into a file it reads.
if [ -n "${CI_JOB_CONTAINER:-}" ]; then
  for name in CI_SERVICE_HOSTS CI_SERVICE_WAIT CI_SERVICE_WAIT_SECONDS CI_JOB_WAIT_SECONDS; do
    value=$(printenv "$name" || true)
    case "$value" in
      *[!A-Za-z0-9_.:\ -]*) die "$name has unexpected characters: '$value'" ;;
    esac
    printf '%s=%s\n' "$name" "$value"
  done >"$conf_dir/job-shell.conf"
  chmod 0644 "$conf_dir/job-shell.conf"
fi

# Seconds since boot: a clock that neither NTP nor the wall clock can step.
seconds() {
  read -r _up _ </proc/uptime
  echo "${_up%%.*}"
}

# Whether a runner manager is logged in now. sshd titles a connection's process "sshd: USER" or
# "sshd: USER@notty" once it has authenticated; the listener ("... [listener] ...") and connections still
# authenticating ("[accepted]", "[net]", "USER [priv]") carry brackets, so a stranger knocking does not count.
runner_connected() {
  grep -aqs '^sshd: [^][]*$' /proc/[0-9]*/cmdline
}

# log_relay: sshd's log (through a FIFO) on to the container's stderr, counting the logins in $logins_file.
# A connection shorter than the watchdog's interval (prepare's check, a quick stage without the session
# agent) is missed by runner_connected, but never by this count. It never stops over a failed write (a full
# disk); were it gone anyway, sshd carries on (it ignores SIGPIPE) and only short connections go unseen.
log_relay() {
  logins=0
  while IFS= read -r line; do
    printf '%s\n' "$line" >&2 || true
    case "$line" in
      "Accepted publickey for "*)
        logins=$((logins + 1))
        echo "$logins" >"$logins_file" || true
        ;;
    esac
  done
}

# watchdog SSHD_PID: SIGTERM sshd when no runner manager has been connected for too long.
watchdog() {
  limit=$start_limit
  why="no runner manager connected in the ${start_limit} s since the task started"
  since=$(seconds)
  seen=0
  while sleep "$interval"; do
    kill -0 "$1" 2>/dev/null || return 0
    logins=$(cat "$logins_file" 2>/dev/null || echo 0)
    if [ "$logins" != "$seen" ] || runner_connected; then
      seen=$logins
      since=$(seconds)
      limit=$idle_limit
      why="no runner manager connected for ${idle_limit} s"
    elif [ $(($(seconds) - since)) -ge "$limit" ]; then
      echo "watchdog: $why; stopping the task (its runner manager is gone or its cleanup never ran)" >&2
      kill -TERM "$1" 2>/dev/null || true
      return 0
    fi
  done
}

# Keys stay in files only sshd reads; nothing started from here inherits them (the watchdog included).
unset SSH_PUBLIC_KEY SSH_HOST_KEY
if [ "$idle_limit" -eq 0 ]; then
  echo "entrypoint: watchdog off (WATCHDOG_IDLE_SECONDS=0): only the orchestrator stops this task" >&2
  exec /usr/sbin/sshd -D -e -f "$conf_dir/sshd_config"
fi
echo "entrypoint: watchdog on: idle ${idle_limit} s, first connection within ${start_limit} s" >&2
logins_file=$conf_dir/logins
log_fifo=$conf_dir/log
mkfifo "$log_fifo"
log_relay <"$log_fifo" &
watchdog $$ </dev/null &
# sshd stays the container's main process: when it ends, the task ends.
exec /usr/sbin/sshd -D -e -f "$conf_dir/sshd_config" 2>"$log_fifo"
