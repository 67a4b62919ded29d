#!/usr/bin/env bash
# Packages the guest agent (the glibc 2.17 builds of scripts/lib/build-guest-agent.sh) as a .deb and an .rpm for each
# architecture (x86_64: amd64 and x86_64; aarch64: arm64 and aarch64), laid out
# as distributions lay out their own guest agents (Debian's qemu-guest-agent): /usr/sbin/wukong-agent, the unit in
# /lib/systemd/system (deb) or /usr/lib/systemd/system (rpm), tmpfiles.d/wukong-agent.conf for /run/wukong-agent,
# and /etc/wukong-agent/agent.toml as a conffile (%config(noreplace)). The maintainer scripts are in packaging/.
# wukongctl is not packaged: it is the companion's tool (KubeVirt, QMP), not built for glibc 2.17, and nothing in a
# guest needs it.
#
#   scripts/package-agent.sh [--arch ARCH]... [--version V] [--binary FILE] [--out DIR]
#
# Writes DIR/wukong-agent_V_amd64.deb and DIR/wukong-agent-V-1.x86_64.rpm for x86_64, DIR/wukong-agent_V_arm64.deb
# and DIR/wukong-agent-V-1.aarch64.rpm for aarch64 (default: both architectures, or those of WUKONG_GUEST_ARCHES;
# the workspace's version; target/ARCH-unknown-linux-gnu/release/wukong-agent; target/wukong-packages). --binary
# packages that one file, for the architecture its ELF header names (or the one --arch, which must agree). Reproducible: every timestamp is SOURCE_DATE_EPOCH (default: the last
# commit's time), so two runs over one binary give identical files.
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(awk '/^\[workspace.package\]/ {p = 1; next} /^\[/ {p = 0} p && $1 == "version" {gsub(/"/, "", $3); print $3}' Cargo.toml)
binary=""
arches=()
out=target/wukong-packages
while [ $# -gt 0 ]; do
  case "$1" in
    --version | --binary | --out | --arch)
      [ $# -ge 2 ] || { echo "package-agent: $1 needs a value" >&2; exit 2; }
      case "$1" in --version) version=$2 ;; --binary) binary=$2 ;; --out) out=$2 ;; --arch) arches+=("$2") ;; esac
      shift 2
      ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "package-agent: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || { echo "package-agent: version '$version' is not MAJOR.MINOR.PATCH" >&2; exit 2; }
command -v readelf >/dev/null || { echo "package-agent: readelf not found; run scripts/lib/install-deps.sh" >&2; exit 1; }
# shellcheck source=lib/elf.sh
. scripts/lib/elf.sh
if [ -n "$binary" ]; then
  [ -x "$binary" ] || { echo "package-agent: no agent binary at $binary; run scripts/lib/build-guest-agent.sh first" >&2; exit 1; }
  # --binary alone packages it for its own architecture.
  [ ${#arches[@]} -gt 0 ] || arches=("$(elf_arch "$binary")")
  [ ${#arches[@]} -eq 1 ] || { echo "package-agent: --binary takes one --arch, the binary's" >&2; exit 2; }
fi
[ ${#arches[@]} -gt 0 ] || read -r -a arches <<<"${WUKONG_GUEST_ARCHES:-x86_64 aarch64}"
for arch in "${arches[@]}"; do
  case $arch in
    x86_64 | aarch64) ;;
    *) echo "package-agent: architecture '$arch' is neither x86_64 nor aarch64" >&2; exit 2 ;;
  esac
  b=${binary:-target/$arch-unknown-linux-gnu/release/wukong-agent}
  [ -x "$b" ] || { echo "package-agent: no agent binary at $b; run scripts/lib/build-guest-agent.sh $arch first" >&2; exit 1; }
  [ "$(elf_arch "$b")" = "$arch" ] || { echo "package-agent: $b is not an $arch binary" >&2; exit 1; }
done
for tool in dpkg-deb rpmbuild; do
  command -v "$tool" >/dev/null || { echo "package-agent: $tool not found; run scripts/lib/install-deps.sh" >&2; exit 1; }
done
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
  SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null) \
    || { echo "package-agent: not a git checkout; set SOURCE_DATE_EPOCH to the release's time" >&2; exit 1; }
fi
export SOURCE_DATE_EPOCH
maintainer="Wukong disk agent maintainers <wukong-disk-agent@users.noreply.github.com>"
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
umask 022

# One architecture's .deb and .rpm: $arch (x86_64, aarch64), $deb_arch (amd64, arm64), $binary.
package() {
  local arch=$1 deb_arch binary=$2 root src size deb rpm
  case $arch in x86_64) deb_arch=amd64 ;; aarch64) deb_arch=arm64 ;; esac
  # --- .deb
  root=$work/deb-$arch
  install -D -m 0755 "$binary" "$root/usr/sbin/wukong-agent"
  install -D -m 0644 systemd/wukong-agent.service "$root/lib/systemd/system/wukong-agent.service"
  install -D -m 0644 systemd/wukong-agent.tmpfiles "$root/usr/lib/tmpfiles.d/wukong-agent.conf"
  install -D -m 0600 systemd/agent.toml "$root/etc/wukong-agent/agent.toml"
  chmod 0700 "$root/etc/wukong-agent"
  install -D -m 0644 packaging/deb/copyright "$root/usr/share/doc/wukong-agent/copyright"
  # A native package's changelog, in Debian's format; CHANGELOG.md in the source says what changed.
  cat > "$work/changelog" <<CHANGELOG
wukong-agent ($version) unstable; urgency=medium

  * Release $version; see CHANGELOG.md in the source.

 -- $maintainer  $(LC_ALL=C date -u -R -d "@$SOURCE_DATE_EPOCH")
CHANGELOG
  gzip -n -9 -c "$work/changelog" > "$root/usr/share/doc/wukong-agent/changelog.gz"
  chmod 0644 "$root/usr/share/doc/wukong-agent/changelog.gz"
  install -d -m 0755 "$root/usr/share/lintian/overrides"
  install -m 0644 packaging/deb/lintian-overrides "$root/usr/share/lintian/overrides/wukong-agent"
  install -d -m 0755 "$root/DEBIAN"
  install -m 0755 packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm "$root/DEBIAN/"
  echo /etc/wukong-agent/agent.toml > "$root/DEBIAN/conffiles"
  chmod 0644 "$root/DEBIAN/conffiles"
  size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
  cat > "$root/DEBIAN/control" <<CONTROL
Package: wukong-agent
Version: $version
Architecture: $deb_arch
Maintainer: $maintainer
Installed-Size: $size
Depends: libc6 (>= 2.17), libudev1, init-system-helpers (>= 1.52)
Section: admin
Priority: optional
Homepage: https://github.com/wukong-disk-agent/wukong
Description: releases disks safely before they are hot-unplugged from a VM
 The guest agent of Wukong: it knows every disk of the guest by its serial,
 tells who uses one (mounts, swap, holders, open files) and releases it
 (unmount, flush, fence) before KubeVirt or QEMU unplugs it, or refuses and
 says why. Configure it in /etc/wukong-agent/agent.toml (mutual TLS).
CONTROL
  chmod 0644 "$root/DEBIAN/control"
  # dpkg-deb clamps file times to SOURCE_DATE_EPOCH; the ones older than it are set too, so the files' times on this
  # machine never reach the package.
  find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
  deb=$out/wukong-agent_${version}_${deb_arch}.deb
  dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
  echo "package-agent: $deb"

  # --- .rpm
  src=$work/rpm-src-$arch
  mkdir -p "$src"
  cp "$binary" "$src/wukong-agent"
  cp systemd/wukong-agent.service systemd/wukong-agent.tmpfiles systemd/agent.toml LICENSE README.md "$src/"
  # xz payload and SHA-256 digests: what rpm 4.11 (CentOS 7, Amazon Linux 2) still reads (not rpm 4.18's zstd).
  # Debian's rpm keeps its database in ~/.rpmdb: a private one, so that nothing is written outside the build.
  rpmbuild -bb --quiet \
    --dbpath "$work/rpmdb" \
    --define "_topdir $work/rpmbuild" \
    --target "$arch" \
    --define "_build_id_links none" \
    --define "_buildhost wukong-build" \
    --define "use_source_date_epoch_as_buildtime 1" \
    --define "clamp_mtime_to_source_date_epoch 1" \
    --define "_binary_payload w9.xzdio" \
    --define "_binary_filedigest_algorithm 8" \
    --define "wukong_version $version" \
    --define "wukong_maintainer $maintainer" \
    --define "wukong_changelog_date $(LC_ALL=C date -u -d "@$SOURCE_DATE_EPOCH" '+%a %b %d %Y')" \
    --define "wukong_src $src" \
    --define "wukong_arch $arch" \
    packaging/rpm/wukong-agent.spec >/dev/null # "Building for target ARCH": its errors go to stderr
  rpm=$out/wukong-agent-${version}-1.$arch.rpm
  cp "$work/rpmbuild/RPMS/$arch/wukong-agent-${version}-1.$arch.rpm" "$rpm"
  echo "package-agent: $rpm"
}

for arch in "${arches[@]}"; do
  package "$arch" "${binary:-target/$arch-unknown-linux-gnu/release/wukong-agent}"
done
