#!/usr/bin/env bash
# Installs the host packages the build, the guest lab and the node lab need, on a fresh Debian bookworm machine
# (buildah, skopeo and umoci build and check the operator's image without a container daemon, scripts/build-image.sh;
# buildah also writes the node lab's local images, scripts/lab/build-pod-images.sh), and rpm (rpmbuild), lintian
# and rpmlint build and check the agent's packages (scripts/package-agent.sh; lintian brings ~127 packages, 18 s).
# clang and libbpf-dev (its headers) compile the agent's BPF iterators (agent/build.rs).
# qemu-user-static runs the aarch64 agent on this machine (scripts/lib/smoke-aarch64.sh); bookworm's own: user-mode
# QEMU shares nothing with the backports system emulator.
# QEMU must come from bookworm-backports: the image's qemu-utils comes from there and bookworm's own
# qemu-system-x86 (7.2) conflicts with it; qemu-system-arm (qemu-system-aarch64) is the aarch64 guest's.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=apt.sh
. "$here/apt.sh"

need_base=(gcc libc6-dev clang libbpf-dev curl libudev-dev pkg-config busybox-static udev kmod socat e2fsprogs xfsprogs btrfs-progs util-linux fdisk procps psmisc lsof fuse-overlayfs xz-utils lvm2 mdadm dmsetup python3 python3-yaml python3-venv python3-grpcio binutils debootstrap genisoimage file buildah skopeo umoci rpm lintian rpmlint qemu-user-static)
need_backports=(qemu-system-x86 qemu-system-arm)

missing() {
  local p out=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || out+=("$p")
  done
  echo "${out[*]:-}"
}

base=$(missing "${need_base[@]}")
backports=$(missing "${need_backports[@]}")
[ -z "$base" ] && [ -z "$backports" ] && exit 0
export DEBIAN_FRONTEND=noninteractive
apt_private_update
if [ -n "$base" ]; then
  echo "install-deps: installing $base"
  # shellcheck disable=SC2086
  apt_private install -y -qq --no-install-recommends $base
fi
if [ -n "$backports" ]; then
  echo "install-deps: installing $backports from bookworm-backports"
  # shellcheck disable=SC2086
  apt_private install -y -qq --no-install-recommends -t bookworm-backports $backports
fi
