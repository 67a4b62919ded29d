#!/usr/bin/env bash
# Runs the aarch64 guest agent on this machine under user-mode QEMU (qemu-aarch64-static, Debian's
# qemu-user-static), with target/wukong-rust-aarch64/prefix as its arm64 sysroot (libc6, libgcc-s1, libudev1 and
# libcap2 for arm64, unpacked there by scripts/lib/rust-aarch64.sh): `--version` must print the workspace's version
# and `--help` the agent's usage. It proves that the binary loads (dynamic loader, libc, libudev), starts and
# parses its arguments on aarch64; the agent's work on disks is proven in the aarch64 guest of the lab.
#
#   smoke-aarch64.sh [BINARY]    (default: target/aarch64-unknown-linux-gnu/release/wukong-agent)
set -euo pipefail
cd "$(dirname "$0")/../.."

bin=${1:-target/aarch64-unknown-linux-gnu/release/wukong-agent}
[ -x "$bin" ] || { echo "smoke-aarch64: no agent binary at $bin; run scripts/lib/build-guest-agent.sh aarch64" >&2; exit 1; }
command -v qemu-aarch64-static >/dev/null \
  || { echo "smoke-aarch64: qemu-aarch64-static not found; run scripts/lib/install-deps.sh" >&2; exit 1; }
prefix=$(bash scripts/lib/rust-aarch64.sh)
version=$(awk '/^\[workspace.package\]/ {p = 1; next} /^\[/ {p = 0} p && $1 == "version" {gsub(/"/, "", $3); print $3}' Cargo.toml)

run() { timeout 60 qemu-aarch64-static -L "$prefix" "$bin" "$@"; }

out=$(run --version) || { echo "smoke-aarch64: $bin --version failed under qemu-aarch64-static" >&2; exit 1; }
[ "$out" = "wukong-agent $version" ] || { echo "smoke-aarch64: $bin --version printed '$out', not 'wukong-agent $version'" >&2; exit 1; }
help=$(run --help) || { echo "smoke-aarch64: $bin --help failed under qemu-aarch64-static" >&2; exit 1; }
grep -q '^Usage: wukong-agent' <<<"$help" || {
  echo "smoke-aarch64: $bin --help printed no usage:" >&2
  echo "$help" >&2
  exit 1
}
echo "smoke-aarch64: $bin runs under qemu-aarch64-static: $out; --help: $(grep -c . <<<"$help") lines"
