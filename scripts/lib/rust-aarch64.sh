#!/usr/bin/env bash
# The Rust toolchain for the aarch64 guest agent (issue 27), set up once per machine in target/wukong-rust-aarch64
# and reused: no Rust target can be downloaded here, but Debian bookworm-security ships rustc-web and cargo-web for
# amd64 and their standard library for arm64 (libstd-rust-web-dev:arm64). They are fetched with `apt-get download`
# through the project's private apt configuration (scripts/lib/apt.sh) with the arm64 architecture added, and
# unpacked with `dpkg-deb -x` into target/wukong-rust-aarch64/prefix: nothing is installed, /etc/apt and the
# machine's dpkg are untouched. The same prefix is the arm64 sysroot: libc6, libgcc-s1, libudev1 and libudev-dev
# (the linker reads libudev.so; qemu-aarch64-static runs the agent with -L prefix).
#
#   rust-aarch64.sh            sets the toolchain up if it is missing, prints the prefix's path
#
# After it: prefix/bin/{rustc,cargo,rustdoc} are wrappers that run Debian's binaries with LD_LIBRARY_PATH (they have
# no RUNPATH), and `rustc --target aarch64-unknown-linux-gnu` finds prefix/usr/lib/rustlib/aarch64-unknown-linux-gnu
# by itself. A stamp records what was unpacked; delete target/wukong-rust-aarch64 to start again.
set -euo pipefail
cd "$(dirname "$0")/../.."
here=scripts/lib

dir=$PWD/target/wukong-rust-aarch64
prefix=$dir/prefix
stamp=$dir/stamp
# The compiler for this machine; its versioned libraries (libstd-rust-web-1.NN, libllvmNN, libgit2) come as its
# dependencies.
host_pkgs=(rustc-web cargo-web)
# The arm64 sysroot: the standard library and what the agent links and runs against.
arm64_pkgs=(libstd-rust-web-dev libc6 libgcc-s1 libudev1 libudev-dev libcap2)

if [ -f "$stamp" ] && [ -x "$prefix/bin/rustc" ] && "$prefix/bin/rustc" --version >/dev/null 2>&1; then
  echo "$prefix"
  exit 0
fi
for tool in apt-get dpkg-deb; do
  command -v "$tool" >/dev/null || { echo "rust-aarch64: $tool not found (a Debian machine is needed)" >&2; exit 1; }
done

echo "rust-aarch64: setting up Debian's Rust for aarch64 in $dir (once per machine)" >&2
rm -rf "$prefix" "$stamp"
mkdir -p "$prefix"
export WUKONG_APT_DIR=$dir/apt WUKONG_APT_ARCHES="amd64 arm64"
# shellcheck source=apt.sh
. "$here/apt.sh"
apt_private_update

# The host packages and those of their dependencies that this machine lacks, as apt would install them; packages
# this machine has in another version ("Inst NAME [OLD] (NEW ...)") are left out: their libraries are already here,
# and a newer libc or libstdc++ beside the machine's own must not reach LD_LIBRARY_PATH.
mapfile -t host_list < <(
  apt_private -s install --no-install-recommends "${host_pkgs[@]}" |
    awk '$1 == "Inst" && $3 !~ /^\[/ { print $2 }'
)
[ ${#host_list[@]} -gt 0 ] || { echo "rust-aarch64: apt found none of ${host_pkgs[*]}" >&2; exit 1; }
# The standard library's runtime package is versioned (libstd-rust-web-1.96): the arm64 one matches the host's.
libstd=$(printf '%s\n' "${host_list[@]}" | grep -E '^libstd-rust-web-[0-9.]+(:amd64)?$' | sed 's/:amd64$//' | head -n1)
[ -n "$libstd" ] || { echo "rust-aarch64: no libstd-rust-web-1.NN among rustc-web's dependencies" >&2; exit 1; }
arm64_list=()
for p in "${arm64_pkgs[@]}" "$libstd"; do arm64_list+=("$p:arm64"); done
# Host packages as name:amd64: with two architectures configured, a bare name is the native one anyway.
list=()
for p in "${host_list[@]}"; do list+=("${p%%:*}:amd64"); done
list+=("${arm64_list[@]}")

apt_private_unpack "$prefix" "${list[@]}"

# Debian's binaries look for their libraries (libLLVM, librustc_driver, libgit2) in the system's paths only.
mkdir -p "$prefix/bin"
for tool in rustc cargo rustdoc; do
  cat >"$prefix/bin/$tool" <<WRAP
#!/bin/sh
# Debian's $tool from $prefix (no RUNPATH in its binaries: its libraries come by LD_LIBRARY_PATH).
LD_LIBRARY_PATH="$prefix/usr/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$prefix/usr/bin/$tool" "\$@"
WRAP
  chmod 0755 "$prefix/bin/$tool"
done
"$prefix/bin/rustc" --version >&2
[ -d "$prefix/usr/lib/rustlib/aarch64-unknown-linux-gnu/lib" ] \
  || { echo "rust-aarch64: no aarch64 standard library in $prefix/usr/lib/rustlib" >&2; exit 1; }
printf '%s\n' "${list[@]}" >"$stamp"
echo "$prefix"
