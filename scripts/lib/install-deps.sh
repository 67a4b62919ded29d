#!/usr/bin/env bash
# Installs the host packages the build and the guest lab need, on a fresh Debian bookworm machine.
# Mirrors are taken from the machine's own apt configuration; bookworm-backports is added in a private
# apt configuration so /etc/apt is never modified (QEMU must come from backports: the image's qemu-utils
# comes from there and bookworm's qemu-system-x86 7.2 conflicts with it).
set -euo pipefail

need_build=(libudev-dev pkg-config)
need_lab=(busybox-static udev kmod cpio e2fsprogs util-linux procps psmisc lsof)
need_qemu=(qemu-system-x86)

missing() {
  local out=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || out+=("$p")
  done
  echo "${out[@]:-}"
}

apt_private_dir=/var/cache/wukong/apt
setup_backports() {
  mkdir -p "$apt_private_dir/sources" "$apt_private_dir/lists/partial"
  cp /etc/apt/sources.list.d/*.sources "$apt_private_dir/sources/" 2>/dev/null || true
  local uri
  uri=$(awk '/^URIs:/ {print $2}' /etc/apt/sources.list.d/*.sources | grep -v security | head -n1)
  [ -n "$uri" ] || { echo "install-deps: no Debian mirror found in /etc/apt/sources.list.d" >&2; exit 1; }
  cat > "$apt_private_dir/sources/backports.sources" <<SRC
Types: deb
URIs: $uri
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
}

apt_opts() {
  echo "-o Dir::Etc::sourcelist=- -o Dir::Etc::sourceparts=$apt_private_dir/sources -o Dir::State::Lists=$apt_private_dir/lists"
}

base_missing=$(missing "${need_build[@]}" "${need_lab[@]}")
qemu_missing=$(missing "${need_qemu[@]}")
if [ -z "$base_missing" ] && [ -z "$qemu_missing" ]; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
setup_backports
# shellcheck disable=SC2046
apt-get $(apt_opts) update -qq
if [ -n "$base_missing" ]; then
  echo "install-deps: installing $base_missing"
  # shellcheck disable=SC2046,SC2086
  apt-get $(apt_opts) install -y -qq --no-install-recommends $base_missing
fi
if [ -n "$qemu_missing" ]; then
  echo "install-deps: installing $qemu_missing from bookworm-backports"
  # shellcheck disable=SC2046,SC2086
  apt-get $(apt_opts) install -y -qq --no-install-recommends -t bookworm-backports $qemu_missing
fi
