#!/bin/sh
# Task entrypoint (runs under tini in the image, under bubblewrap in the sandbox).
# It makes the task's own ed25519 host key (the private half never leaves the task), publishes the public half
# to the orchestrator signed with the task role's credentials (whose session ECS names after the task id), and
# from the answer learns the SSH user CA it must trust: sshd then accepts only a certificate of that CA for
# this task (principal = the task id), and presents only this host key (the driver pins what the
# orchestrator shows). The publish runs in the background while sshd starts (sshd trusts no CA until the
# answer is in); a refused key stops the task. It starts the orphan watchdog, then execs sshd in the
# foreground so the task lives exactly as long as sshd does. Nothing secret comes in through the environment.
#
# sshd here is a job runner, not a general SSH server: exec sessions only (no TTY, no sftp, no forwarding of
# any kind), two authentication attempts, 20 s to log in, and client-alive probes that drop a runner
# manager's connection once the manager stops answering (its machine gone: no FIN ever arrives).
#
# The watchdog stops the task when no runner manager is connected: it SIGTERMs sshd (the container exits,
# so ECS stops the task: "Essential container in task exited") once no authenticated SSH connection has
# existed for WATCHDOG_IDLE_SECONDS, or none has come within WATCHDOG_START_SECONDS of the start.
#
# Inputs (environment): FARGATE_CI_API_URL (the orchestrator, from RunTask's overrides or the task
# definition), AWS_REGION, ECS_CONTAINER_METADATA_URI_V4 (the task's id) and the task role's credentials
# endpoint (AWS_CONTAINER_CREDENTIALS_RELATIVE_URI on 169.254.170.2, or AWS_CONTAINER_CREDENTIALS_FULL_URI
# with AWS_CONTAINER_AUTHORIZATION_TOKEN), all set by ECS; needs curl (--aws-sigv4) and ssh-keygen.
#   HOST_KEY_PUBLISH_SECONDS     how long to keep trying to publish the host key (60)
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

setting port SSH_PORT 22 1
[ "$port" -le 65535 ] || die "SSH_PORT must be a port number, got $port"
setting idle_limit WATCHDOG_IDLE_SECONDS 60 0
setting start_limit WATCHDOG_START_SECONDS 120 1
setting interval WATCHDOG_INTERVAL_SECONDS 2 1
setting alive_interval SSHD_CLIENT_ALIVE_INTERVAL 10 1
setting alive_count SSHD_CLIENT_ALIVE_COUNT_MAX 3 1
setting publish_limit HOST_KEY_PUBLISH_SECONDS 60 1
[ -n "${FARGATE_CI_API_URL:-}" ] || die "FARGATE_CI_API_URL is not set; the task cannot publish its host key"
[ -n "${ECS_CONTAINER_METADATA_URI_V4:-}" ] || die "ECS_CONTAINER_METADATA_URI_V4 is not set (not on ECS?)"
region=${AWS_REGION:-${AWS_DEFAULT_REGION:-}}
[ -n "$region" ] || die "AWS_REGION is not set"
if [ -n "${AWS_CONTAINER_CREDENTIALS_FULL_URI:-}" ]; then
  credentials_url=$AWS_CONTAINER_CREDENTIALS_FULL_URI
elif [ -n "${AWS_CONTAINER_CREDENTIALS_RELATIVE_URI:-}" ]; then
  # ECS's task credentials endpoint (AWS: "Using IAM roles with Amazon ECS tasks", best practices guide).
  credentials_url="http://169.254.170.2$AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"
else
  die "the task has no task role credentials (AWS_CONTAINER_CREDENTIALS_RELATIVE_URI is not set)"
fi

if [ -n "${CI_JOB_CONTAINER:-}" ]; then
  job_shell="$(dirname "$0")/job-shell.sh"
  [ -x "$job_shell" ] || [ -r "$job_shell" ] || die "CI_JOB_CONTAINER is set but $job_shell is missing"
fi

# Everything sshd needs lives under /run: writable in Docker and in the sandbox, gone with the task.
conf_dir=/run/ci-sshd
umask 077
mkdir -p "$conf_dir" /run/sshd
chmod 0755 /run/sshd # sshd's privilege-separation directory

# The boot is on every cold job's critical path (prepare waits for the published key, then logs in), so what
# can overlap does: the key is made while the task's id and credentials are fetched, and sshd listens while
# the key is being published. Answers are parsed with the shell's own expansions, not a process per field.
ssh-keygen -q -t ed25519 -N '' -C "fargate-ci-task" -f "$conf_dir/host_ed25519_key" </dev/null &
keygen=$!

# json_field NAME JSON: $field becomes the string value of "NAME" in JSON, a flat object whose values need
# no unescaping (ARNs, base64 keys and tokens); "" when there is no such string.
json_field() {
  field=""
  case "$2" in *"\"$1\""*) ;; *) return 0 ;; esac
  _rest=${2#*"\"$1\""}
  _rest=${_rest#"${_rest%%[![:space:]]*}"}
  case "$_rest" in :*) _rest=${_rest#:} ;; *) return 0 ;; esac
  _rest=${_rest#"${_rest%%[![:space:]]*}"}
  case "$_rest" in \"*) _rest=${_rest#\"} ;; *) return 0 ;; esac
  field=${_rest%%\"*}
}

# fetch_credentials: the task role's temporary credentials into access_key, secret_key and token (shell
# variables, never exported; fetched afresh for each attempt: they rotate). Fails without a key pair.
fetch_credentials() {
  _answer=$(curl -fsS --max-time 5 ${AWS_CONTAINER_AUTHORIZATION_TOKEN:+-H "Authorization: $AWS_CONTAINER_AUTHORIZATION_TOKEN"} \
    "$credentials_url") || _answer=""
  json_field AccessKeyId "$_answer"
  access_key=$field
  json_field SecretAccessKey "$_answer"
  secret_key=$field
  json_field Token "$_answer"
  token=$field
  _answer="" field=""
  [ -n "$access_key" ] && [ -n "$secret_key" ]
}

# The task's id (the last part of its ARN, from the task metadata endpoint v4) and the first attempt's
# credentials (the publisher asks again if there are none), both fetched while the key is being made.
curl -fsS --max-time 5 --retry 5 --retry-connrefused -o "$conf_dir/task.json" \
  "$ECS_CONTAINER_METADATA_URI_V4/task" </dev/null &
metadata_fetch=$!
fetch_credentials || access_key=""
wait "$metadata_fetch" || true
metadata=""
if [ -s "$conf_dir/task.json" ]; then
  while IFS= read -r line || [ -n "$line" ]; do metadata="$metadata$line"; done <"$conf_dir/task.json"
fi
json_field TaskARN "$metadata"
task_id=${field##*/}
case "$task_id" in
  '' | *[!0-9a-f-]*) die "cannot read the task's id from the task metadata endpoint" ;;
esac
wait "$keygen" || die "cannot make the task's host key"
read -r key_type key_base64 _ <"$conf_dir/host_ed25519_key.pub" || die "cannot read the task's host key"
host_public="$key_type $key_base64"

# sshd accepts certificates for this task only (principal: the task id), and of no CA at all until the
# orchestrator has answered the publish: TrustedUserCAKeys starts empty and there are no authorized keys.
# sshd reads both files at each authentication, so it can listen meanwhile.
printf '%s\n' "$task_id" >"$conf_dir/principals"
: >"$conf_dir/user_ca_keys"

# publish: PUT the host public key to the orchestrator, signed with the task role's credentials; the answer
# goes to publish.json. Returns 1 on a refusal (4xx), 2 for what may pass on a retry.
publish() {
  if [ -z "$access_key" ] && ! fetch_credentials; then return 2; fi
  answer=$conf_dir/publish.json
  status=$(curl -sS --max-time 10 -o "$answer" -w '%{http_code}' -X PUT \
    --aws-sigv4 "aws:amz:$region:execute-api" --user "$access_key:$secret_key" \
    ${token:+-H "x-amz-security-token: $token"} -H "content-type: application/json" \
    --data "{\"host_key\": \"$host_public\"}" "${FARGATE_CI_API_URL%/}/tasks/$task_id/host-key") || status=000
  access_key="" secret_key="" token=""
  case "$status" in
    200) return 0 ;;
    4??) echo "entrypoint: the orchestrator refused the host key ($status): $(cat "$answer")" >&2 && return 1 ;;
    *) return 2 ;;
  esac
}

# stop_task SSHD_PID WHY: the task must not live on with a host key nobody can trust. SIGINT rather than
# SIGTERM: sshd handles SIGTERM and exits 0, but not SIGINT, so the container ends by the signal (exit code
# 130, as when the shell gets it before it has exec'd sshd) and its exit code says the start failed. Were
# SIGINT ignored (inherited so), SIGTERM a second later stops it anyway.
stop_task() {
  echo "entrypoint: $2; stopping the task" >&2
  kill -INT "$1" 2>/dev/null || exit 1
  sleep 1
  kill -TERM "$1" 2>/dev/null || true
  exit 1
}

# publisher SSHD_PID: publish the host key (retrying for HOST_KEY_PUBLISH_SECONDS), then trust the CA keys
# the orchestrator named; runs in the background while sshd listens. Nothing logs in before the CA keys
# are written (the driver would not try: it needs the published key first, and its certificate).
publisher() {
  read -r _up _ </proc/uptime
  started=${_up%%.*}
  while :; do
    if publish; then break; else outcome=$?; fi
    [ "$outcome" = 2 ] || stop_task "$1" "the task's host key was not accepted"
    read -r _up _ </proc/uptime
    [ $((${_up%%.*} - started)) -lt "$publish_limit" ] ||
      stop_task "$1" "could not publish the task's host key to $FARGATE_CI_API_URL within $publish_limit s"
    sleep 1
  done
  # Replaced in one rename: sshd never reads half a file.
  grep -o 'ecdsa-sha2-nistp256 [A-Za-z0-9+/=]*' "$conf_dir/publish.json" >"$conf_dir/user_ca_keys.new" ||
    stop_task "$1" "the orchestrator named no SSH user CA key"
  mv -f "$conf_dir/user_ca_keys.new" "$conf_dir/user_ca_keys" || stop_task "$1" "cannot write the CA keys"
  echo "entrypoint: host key published ($(ssh-keygen -l -f "$conf_dir/host_ed25519_key.pub" | cut -d' ' -f2))" >&2
}

# job-shell.sh's settings: sshd gives sessions a fresh environment, so they go into a file it reads.
if [ -n "${CI_JOB_CONTAINER:-}" ]; then
  for name in CI_SERVICE_HOSTS CI_SERVICE_WAIT CI_SERVICE_WAIT_SECONDS CI_JOB_WAIT_SECONDS; do
    eval "value=\${$name:-}"
    case "$value" in
      *[!A-Za-z0-9_.:\ -]*) die "$name has unexpected characters: '$value'" ;;
    esac
    printf '%s=%s\n' "$name" "$value"
  done >"$conf_dir/job-shell.conf"
  chmod 0644 "$conf_dir/job-shell.conf"
fi

# Every check that can refuse the start has passed: publish while sshd starts.
publisher $$ &
access_key="" secret_key="" token="" # the publisher has its own copy; sshd never gets them (not exported)

{
  echo "Port $port"
  if [ -n "${SSHD_LISTEN_ADDRESS:-}" ]; then echo "ListenAddress $SSHD_LISTEN_ADDRESS"; fi
  echo "HostKey $conf_dir/host_ed25519_key"
  # Only a certificate of the orchestrator's CA for this task (principal: the task id) logs in.
  echo "AuthorizedKeysFile none"
  echo "TrustedUserCAKeys $conf_dir/user_ca_keys"
  echo "AuthorizedPrincipalsFile $conf_dir/principals"
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
    eval "value=\${$name:-}" # a fixed list of names: no process per variable
    case "$value" in
      '') ;;
      *[!A-Za-z0-9_./:=+@,-]*) echo "entrypoint: not passing $name to SSH sessions: unexpected characters" >&2 ;;
      *) setenv="$setenv $name=$value" ;;
    esac
  done
  if [ -n "$setenv" ]; then echo "SetEnv$setenv"; fi
} >"$conf_dir/sshd_config"

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

# The host key stays in a file only sshd reads.
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
