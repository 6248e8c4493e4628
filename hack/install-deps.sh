#!/usr/bin/env bash
# Installs, from Debian's packages, what building and testing csi-dmthin needs
# on a fresh Debian 12 machine. Idempotent: it installs only what is missing,
# and runs apt-get update only when it has to install something.
#
#   qemu-system-x86   runs Debian's kernel (which has dm-thin) for the kernel tests
#   busybox-static    the VM's userland
#   kmod              modinfo/depmod for kernel modules
#   gcc, libc6-dev, linux-libc-dev
#                     the ABI test checks our ioctl structs against dm-ioctl.h
#   dmsetup, lvm2     only copied into the VM for the benchmark's comparison
#   e2fsprogs, xfsprogs, thin-provisioning-tools
#                     mkfs/resize and thin_check, copied into the VM
#   cpio              cross-checks the harness's own initramfs writer
set -euo pipefail

need=()
have_cmd() { command -v "$1" >/dev/null 2>&1; }
have_file() { [ -e "$1" ]; }

have_cmd qemu-system-x86_64 || need+=(qemu-system-x86)
have_file /bin/busybox || need+=(busybox-static)
# busybox-static, not busybox: the VM has no libc. The static one is what
# `file` calls statically linked; a dynamic busybox installed instead would
# not run there.
if have_file /bin/busybox && ! dpkg -s busybox-static >/dev/null 2>&1; then need+=(busybox-static); fi
have_cmd modinfo || need+=(kmod)
have_cmd gcc || need+=(gcc)
have_file /usr/include/linux/dm-ioctl.h || need+=(linux-libc-dev)
have_file /usr/include/stdio.h || need+=(libc6-dev)
have_cmd dmsetup || need+=(dmsetup)
have_cmd lvm || need+=(lvm2)
have_cmd mkfs.ext4 || need+=(e2fsprogs)
have_cmd mkfs.xfs || need+=(xfsprogs)
have_cmd thin_check || need+=(thin-provisioning-tools)
have_cmd dpkg-deb || need+=(dpkg)
have_cmd cpio || need+=(cpio)
have_cmd apt-get || { echo "install-deps: this needs a Debian-like system with apt-get" >&2; exit 1; }

# The VM's kernel is found with apt-cache and fetched with apt-get download,
# which need package lists even when nothing is missing.
lists_missing=""
compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null || lists_missing=1

if [ ${#need[@]} -eq 0 ] && [ -z "$lists_missing" ]; then
	exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
	have_cmd sudo || { echo "install-deps: need root (or sudo) to install: ${need[*]}" >&2; exit 1; }
	sudo=sudo
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
if [ ${#need[@]} -gt 0 ]; then
	echo "install-deps: installing ${need[*]}"
	$sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
