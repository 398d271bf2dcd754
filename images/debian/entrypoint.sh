#!/bin/sh
# Task entrypoint (runs under tini in the image, under bubblewrap in the sandbox).
# It turns the job's per-task keys into an sshd that accepts only the job's client key and presents only
# the job's host key (the driver pins its public half), then execs sshd in the foreground so the task
# lives exactly as long as sshd does.
set -eu

die() {
  echo "entrypoint: $*" >&2
  exit 78 # EX_CONFIG: the task was started without what it needs
}

[ -n "${SSH_PUBLIC_KEY:-}" ] || die "SSH_PUBLIC_KEY is not set; refusing to start without the job's client key"
[ -n "${SSH_HOST_KEY:-}" ] || die "SSH_HOST_KEY is not set; refusing to start without the job's host key"

port="${SSH_PORT:-22}"
case "$port" in
  '' | *[!0-9]*) die "SSH_PORT must be a port number, got '$port'" ;;
esac

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
  echo "X11Forwarding no"
  echo "PrintMotd no"
  echo "PrintLastLog no"
  echo "MaxStartups 100:30:200"
  echo "ClientAliveInterval 30"
  echo "Subsystem sftp internal-sftp"
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

# Keys stay in files only sshd reads; nothing started from here inherits them.
unset SSH_PUBLIC_KEY SSH_HOST_KEY
exec /usr/sbin/sshd -D -e -f "$conf_dir/sshd_config"
