#!/usr/bin/env bash
# The one test command. On a fresh Debian bookworm machine it installs what is missing (libudev-dev, QEMU from
# bookworm-backports, busybox, ...) and builds a real kube-apiserver once (scripts/lib/install-kube.sh), then runs
# the format check, clippy, unit tests, host integration tests and the guest-lab end-to-end tests (real QEMU
# guests), and ends with one summary line.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "test.sh: the tests need root (loop devices, mounts, QEMU); run it as root" >&2
  exit 1
fi
bash scripts/lib/install-deps.sh
bash scripts/lib/install-kube.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== release agent for the guest lab"
cargo build --release --locked -p wukong-agent
echo "== cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log" || status=$?
passed=$(awk '/^test result:/ {for (i = 1; i <= NF; i++) if ($(i+1) ~ /^passed/) s += $i} END {print s + 0}' "$log")
failed=$(awk '/^test result:/ {for (i = 1; i <= NF; i++) if ($(i+1) ~ /^failed/) s += $i} END {print s + 0}' "$log")
ignored=$(awk '/^test result:/ {for (i = 1; i <= NF; i++) if ($(i+1) ~ /^ignored/) s += $i} END {print s + 0}' "$log")
if [ "$ignored" -ne 0 ]; then
  echo "test.sh: $ignored tests were ignored; every test must run" >&2
  status=1
fi
if [ "$passed" -eq 0 ]; then
  echo "test.sh: no test ran" >&2
  status=1
fi
echo "tests: $passed passed, $failed failed, $ignored skipped"
exit "$status"
