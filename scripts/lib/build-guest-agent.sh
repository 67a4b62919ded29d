#!/usr/bin/env bash
# Builds the release agent for guests: one x86_64 binary that runs on every distribution with glibc >= 2.17 (issue
# 16). It links against glibc 2.17's symbol versions through cargo-zigbuild and Zig, both installed here once and
# cached in target/wukong-zig (Zig from PyPI's `ziglang` in a venv, cargo-zigbuild with `cargo install`); a later run
# reuses them and only rebuilds what changed.
#
# Output: target/x86_64-unknown-linux-gnu/release/wukong-agent (zigbuild's usual place; the host build stays in
# target/release). scripts/lib/check-glibc.sh proves the result.
set -euo pipefail
cd "$(dirname "$0")/../.."

zig_version='0.17.*'
zigbuild_version=0.24.1
tools=target/wukong-zig
target=x86_64-unknown-linux-gnu

if ! "$tools/venv/bin/python" -m ziglang version >/dev/null 2>&1; then
  echo "build-guest-agent: installing Zig ($zig_version, PyPI ziglang) in $tools/venv"
  rm -rf "$tools/venv"
  python3 -m venv "$tools/venv"
  # pip's cache beside the tools, not in ~/.cache.
  PIP_CACHE_DIR="$tools/pip-cache" "$tools/venv/bin/pip" install --quiet "ziglang==$zig_version"
fi
if [ "$("$tools/bin/cargo-zigbuild" --version 2>/dev/null)" != "cargo-zigbuild $zigbuild_version" ]; then
  echo "build-guest-agent: installing cargo-zigbuild $zigbuild_version in $tools"
  cargo install --quiet cargo-zigbuild --version "$zigbuild_version" --locked --root "$tools"
fi

# cargo-zigbuild finds Zig as `python3 -m ziglang` when `zig` is not on PATH; the venv's python comes first.
export PATH="$PWD/$tools/venv/bin:$PWD/$tools/bin:$PATH"
# Their caches beside them, not in ~/.cache: cargo-zigbuild's linker wrappers and Zig's compiled C runtime.
export CARGO_ZIGBUILD_CACHE_DIR="$PWD/$tools/zigbuild-cache"
export ZIG_GLOBAL_CACHE_DIR="$PWD/$tools/zig-cache" ZIG_LOCAL_CACHE_DIR="$PWD/$tools/zig-cache"

# For the glibc 2.17 target only (the host build is untouched): the host's libudev.so, which the linker reads to
# resolve udev_* symbols, itself references newer glibc symbols (pthread_once@GLIBC_2.34, ...), and lld refuses
# those by default. That is sound to allow: the binary records only libudev.so.1 as NEEDED and at run time uses the
# guest's own libudev, built for the guest's glibc. The agent's own references stay at GLIBC_2.17 (checked by
# scripts/lib/check-glibc.sh).
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C link-arg=-Wl,--allow-shlib-undefined"

cargo zigbuild --release --locked -p wukong-agent --target "$target.2.17"
echo "build-guest-agent: target/$target/release/wukong-agent"
