#!/usr/bin/env bash
# Installs, from Debian's packages, what `make e2e` needs beyond
# hack/install-deps.sh (which it runs first). Idempotent.
#
#   debootstrap      builds the node's root filesystem (minbase)
#   qemu-utils       qemu-img: a throwaway qcow2 overlay per node boot
#   util-linux       unshare/nsenter: the isolated network namespace
#   iproute2         ip: sets up loopback in that namespace
set -euo pipefail
"$(dirname "$0")/install-deps.sh"

need=()
have_cmd() { command -v "$1" >/dev/null 2>&1; }
have_cmd debootstrap || need+=(debootstrap)
have_cmd qemu-img || need+=(qemu-utils)
have_cmd nsenter || need+=(util-linux)
have_cmd ip || need+=(iproute2)
[ ${#need[@]} -eq 0 ] && exit 0
sudo=""
if [ "$(id -u)" -ne 0 ]; then
	command -v sudo >/dev/null || { echo "install-e2e-deps: need root (or sudo) to install: ${need[*]}" >&2; exit 1; }
	sudo=sudo
fi
echo "install-e2e-deps: installing ${need[*]}"
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
