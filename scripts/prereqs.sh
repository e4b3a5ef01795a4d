#!/usr/bin/env bash
# Installs and starts what labgate's demo and tests need on a fresh Debian machine:
# the OpenSSH client, a static busybox (the demo/test image is built from it, no registry
# needed), a registry for the image tests (docker-registry, htpasswd), dpkg-dev for the
# package test, iproute2 and openssl for the swarm test rig, and a running Docker Engine.
# Safe to run again: it only acts on what is missing.
set -euo pipefail

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v ssh >/dev/null 2>&1 || missing+=(openssh-client)
command -v ssh-keygen >/dev/null 2>&1 || missing+=(openssh-client)
command -v ssh-keyscan >/dev/null 2>&1 || missing+=(openssh-client)
file_is_static() { [ -x "$1" ] && ! grep -q -a -m1 '/lib64/ld-linux' "$1"; }
file_is_static /bin/busybox || missing+=(busybox-static)
command -v docker >/dev/null 2>&1 || missing+=(docker.io)
command -v curl >/dev/null 2>&1 || missing+=(curl)
# The file-transfer tests drive the real tools from the host side.
command -v sftp >/dev/null 2>&1 || missing+=(openssh-client)
command -v rsync >/dev/null 2>&1 || missing+=(rsync)
command -v git >/dev/null 2>&1 || missing+=(git)
# The image tests run a real registry on a loopback port, some with basic auth (bcrypt htpasswd).
command -v docker-registry >/dev/null 2>&1 || missing+=(docker-registry)
command -v htpasswd >/dev/null 2>&1 || missing+=(apache2-utils)
# The package test builds the .deb (scripts/deb: cargo-deb, installed by it from crates.io, and
# dpkg-shlibdeps) and verifies its unit with systemd-analyze where systemd is installed.
command -v dpkg-shlibdeps >/dev/null 2>&1 || missing+=(dpkg-dev)
# The swarm test rig (tests/common/swarm/) runs three more dockerds in namespaces of their
# own: ip (iproute2), unshare/nsenter/setsid (util-linux), and its own TLS CA (openssl).
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v unshare >/dev/null 2>&1 || missing+=(util-linux)
command -v nsenter >/dev/null 2>&1 || missing+=(util-linux)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
# The dashboard test loads the lab page in a real headless browser (Debian's chromium).
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  echo "prereqs: installing ${missing[*]}" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
  echo "prereqs: starting dockerd" >&2
  as_root sh -c 'nohup dockerd >/var/log/dockerd.log 2>&1 &'
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 || { echo "prereqs: dockerd did not start; see /var/log/dockerd.log" >&2; exit 1; }
fi
