#!/usr/bin/env bash
# Installs the Debian packages the sandbox needs (sshd for the emulated tasks, bubblewrap to confine them,
# a static busybox for the sandbox's `busybox` image). The only step that needs root: the sandbox itself,
# `make demo` and `make test` then run as any user. Does nothing when they are already there.
set -euo pipefail
need=()
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v bwrap >/dev/null || need+=(bubblewrap)
command -v git >/dev/null || need+=(git)
# busybox-static, not busybox: the image's root filesystem holds this one binary and no libraries.
if ! dpkg-query -W -f '${Status}' busybox-static 2>/dev/null | grep -q 'ok installed'; then
  need+=(busybox-static)
fi
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: missing ${need[*]}; install them (as root: apt-get install -y ${need[*]})" >&2
    exit 1
  fi
  echo "setup: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# sshd refuses to start without its privilege-separation directory, which only the package's service start
# makes; /run may have been emptied since it was installed (a container image, a reboot).
if [ "$(id -u)" = 0 ] && [ ! -d /run/sshd ]; then
  install -d -m 0755 /run/sshd
fi
