#!/usr/bin/env bash
# Builds the release agent for guests: one binary per architecture that runs on every distribution with glibc >= 2.17
# (issues 16 and 27). Each links against glibc 2.17's symbol versions through cargo-zigbuild and Zig, both installed
# here once and cached in target/wukong-zig (PyPI's `ziglang` and `cargo-zigbuild` wheels in a venv); a later run
# reuses them and only rebuilds what changed.
#
#   build-guest-agent.sh [ARCH...]      ARCH: x86_64, aarch64 (default: $WUKONG_GUEST_ARCHES, else both)
#
# x86_64 is built with the machine's Rust (rustup). aarch64 is built with Debian's rustc-web/cargo-web and its arm64
# standard library, set up once in target/wukong-rust-aarch64 by scripts/lib/rust-aarch64.sh (no Rust target can be
# downloaded here); that prefix is also the arm64 sysroot the linker reads libudev.so from.
#
# Output: target/x86_64-unknown-linux-gnu/release/wukong-agent and target/aarch64-unknown-linux-gnu/release/
# wukong-agent (zigbuild's usual places; the host build stays in target/release). scripts/lib/check-glibc.sh proves
# them; scripts/lib/smoke-aarch64.sh runs the aarch64 one under qemu-aarch64-static.
set -euo pipefail
cd "$(dirname "$0")/../.."

zig_version='0.17.*'
zigbuild_version=0.24.1
tools=target/wukong-zig

arches=("$@")
[ ${#arches[@]} -gt 0 ] || read -r -a arches <<<"${WUKONG_GUEST_ARCHES:-x86_64 aarch64}"
for arch in "${arches[@]}"; do
  case $arch in
    x86_64 | aarch64) ;;
    *) echo "build-guest-agent: unknown architecture '$arch' (x86_64, aarch64)" >&2; exit 2 ;;
  esac
done

if ! "$tools/venv/bin/python" -m ziglang version >/dev/null 2>&1 \
  || [ "$("$tools/venv/bin/cargo-zigbuild" --version 2>/dev/null)" != "cargo-zigbuild $zigbuild_version" ]; then
  echo "build-guest-agent: installing Zig ($zig_version) and cargo-zigbuild $zigbuild_version (PyPI) in $tools/venv"
  rm -rf "$tools/venv"
  python3 -m venv "$tools/venv"
  # pip's cache beside the tools, not in ~/.cache. Both are prebuilt wheels: nothing compiles.
  PIP_CACHE_DIR="$PWD/$tools/pip-cache" "$tools/venv/bin/pip" install --quiet --disable-pip-version-check \
    "ziglang==$zig_version" "cargo-zigbuild==$zigbuild_version"
fi

# cargo-zigbuild finds Zig as `python3 -m ziglang` when `zig` is not on PATH; the venv's python comes first.
export PATH="$PWD/$tools/venv/bin:$PATH"
# Every cache of the build beside the tools, not in ~/.cache: cargo-zigbuild writes its linker wrappers and Zig its
# compiled C runtime under XDG_CACHE_HOME whatever ZIG_GLOBAL_CACHE_DIR says, and another process cleaning ~/.cache
# mid-build once took the wrappers away from a CI run ("linker ... zigcc-....sh not found").
export XDG_CACHE_HOME="$PWD/$tools/cache"
export CARGO_ZIGBUILD_CACHE_DIR="$XDG_CACHE_HOME/cargo-zigbuild"
export ZIG_GLOBAL_CACHE_DIR="$XDG_CACHE_HOME/zig" ZIG_LOCAL_CACHE_DIR="$XDG_CACHE_HOME/zig"
mkdir -p "$XDG_CACHE_HOME"

# For the glibc 2.17 targets only (the host build is untouched): libudev.so, which the linker reads to resolve udev_*
# symbols, itself references newer glibc symbols (pthread_once@GLIBC_2.34, ...), and lld refuses those by default.
# That is sound to allow: the binary records only libudev.so.1 as NEEDED and at run time uses the guest's own
# libudev, built for the guest's glibc. The agent's own references stay at GLIBC_2.17 (checked by
# scripts/lib/check-glibc.sh).
allow_shlib='-C link-arg=-Wl,--allow-shlib-undefined'

build_x86_64() {
  CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="$allow_shlib" \
    cargo zigbuild --release --locked -p wukong-agent --target x86_64-unknown-linux-gnu.2.17
}

build_aarch64() {
  local prefix dir path=""
  prefix=$(bash scripts/lib/rust-aarch64.sh)
  # Debian's cargo and rustc, never rustup's proxies: no PATH entry that holds rustup, and none of the variables
  # that would send cargo to another compiler.
  IFS=: read -r -a dirs <<<"$PATH"
  for dir in "${dirs[@]}"; do
    [ -n "$dir" ] && [ ! -e "$dir/rustup" ] && path=${path:+$path:}$dir
  done
  # libudev-sys finds libudev with pkg-config: the arm64 one in the prefix (its -L is then prefix/usr/lib/...).
  env -u RUSTC -u RUSTDOC -u RUSTUP_TOOLCHAIN -u RUSTUP_HOME -u CARGO -u RUSTC_WRAPPER -u RUSTFLAGS \
    PATH="$prefix/bin:$path" \
    PKG_CONFIG_ALLOW_CROSS=1 PKG_CONFIG_SYSROOT_DIR="$prefix" \
    PKG_CONFIG_LIBDIR="$prefix/usr/lib/aarch64-linux-gnu/pkgconfig" \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS="$allow_shlib" \
    cargo zigbuild --release --locked -p wukong-agent --target aarch64-unknown-linux-gnu.2.17
}

for arch in "${arches[@]}"; do
  echo "build-guest-agent: $arch"
  "build_$arch"
  echo "build-guest-agent: target/$arch-unknown-linux-gnu/release/wukong-agent"
done
