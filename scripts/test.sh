#!/usr/bin/env bash
# The one test command. On a fresh Debian bookworm machine it installs what is missing (libudev-dev, QEMU from
# bookworm-backports, busybox, ...) and builds a real kube-apiserver once (scripts/lib/install-kube.sh), then runs
# the format check, clippy, unit tests, host integration tests and the guest-lab end-to-end tests (real QEMU
# guests: x86_64 ones, and tests/tests/aarch64_guest.rs's aarch64 guest with the aarch64 agent, under
# qemu-system-aarch64; a missing QEMU fails them, it never skips them), and ends with one summary line.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "test.sh: the tests need root (loop devices, mounts, QEMU); run it as root" >&2
  exit 1
fi
bash scripts/lib/install-deps.sh
bash scripts/lib/install-kube.sh
bash scripts/lib/install-helm.sh
# The guest lab's vsock backend (about 3 min once per machine), before the tests that boot vsock guests wait for it.
bash scripts/lib/install-vhost-vsock.sh >/dev/null

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== release agents for guests (glibc 2.17), x86_64 and aarch64: the binaries the guest labs install"
bash scripts/lib/build-guest-agent.sh x86_64 aarch64
echo "== the guest agents run on glibc >= 2.17"
bash scripts/lib/check-glibc.sh target/x86_64-unknown-linux-gnu/release/wukong-agent
bash scripts/lib/check-glibc.sh target/aarch64-unknown-linux-gnu/release/wukong-agent
echo "== the aarch64 agent starts (--version, --help) under qemu-aarch64-static"
bash scripts/lib/smoke-aarch64.sh
# The checker itself: a program linked on this machine (glibc 2.36) must be refused, naming its symbol.
fixture=$(mktemp -d)
printf 'int main(void) { return 0; }\n' >"$fixture/new.c"
gcc -o "$fixture/new" "$fixture/new.c"
if bash scripts/lib/check-glibc.sh "$fixture/new" 2>"$fixture/err"; then
  echo "test.sh: check-glibc.sh accepted a binary linked against this machine's glibc" >&2
  exit 1
fi
grep -q '__libc_start_main@GLIBC_2\.3[0-9]* is newer than GLIBC_2\.17' "$fixture/err" || {
  echo "test.sh: check-glibc.sh did not name the newer symbol:" >&2
  cat "$fixture/err" >&2
  exit 1
}
rm -rf "$fixture"
echo "== the agent's .deb and .rpm for x86_64 and aarch64 (target/wukong-packages), linted"
# Emptied first, so that the lints see this version's packages only.
rm -rf target/wukong-packages
bash scripts/package-agent.sh --arch x86_64 --arch aarch64
# Overrides, each with its reason: packaging/deb/lintian-overrides (shipped in the .deb), packaging/rpm/*.rpmlintrc.
# lintian leaves files in its TMPDIR (mldbm-elf-*): a scratch one under target/, emptied each run.
rm -rf target/lintian-tmp
mkdir -p target/lintian-tmp
TMPDIR="$PWD/target/lintian-tmp" lintian --fail-on error,warning,info,pedantic --pedantic \
  target/wukong-packages/wukong-agent_*_amd64.deb target/wukong-packages/wukong-agent_*_arm64.deb
# rpmlint's rpm opens ~/.rpmdb: a scratch HOME under target/, so that nothing is written outside the checkout.
mkdir -p target/rpmlint-home
HOME="$PWD/target/rpmlint-home" rpmlint -r packaging/rpm/wukong-agent.rpmlintrc \
  target/wukong-packages/wukong-agent-*-1.x86_64.rpm target/wukong-packages/wukong-agent-*-1.aarch64.rpm
echo "== the Helm chart: helm lint --strict, and its manifests validated against Kubernetes 1.31's schemas"
# With the default values and with each values file under ci/ (cert-manager, a ServiceMonitor, an image by digest;
# no guard). Custom resources (cert-manager's, the ServiceMonitor) have no schema there: kubernetes-validate only
# warns about them. tests/tests/chart.rs checks that deploy/*.yaml are the chart's rendering.
(
  # shellcheck source=/dev/null
  . target/wukong-helm/bin/helm-env
  chart=deploy/chart/wukong-operator
  rendered=$(mktemp)
  trap 'rm -f "$rendered"' EXIT
  for values in "" "$chart"/ci/*.yaml; do
    set -- ${values:+--values "$values"}
    helm lint --strict --quiet "$chart" --namespace wukong-system "$@" >/dev/null
    helm template wukong-operator "$chart" --namespace wukong-system --kube-version 1.31.0 --include-crds "$@" \
      >"$rendered"
    kubernetes-validate --quiet --strict -k 1.31.0 "$rendered" || {
      echo "test.sh: the chart's manifests ${values:+with $values }are not valid for Kubernetes 1.31" >&2
      exit 1
    }
  done
)
echo "== wukong-operator's image (static binary, OCI archive under target/wukong-image)"
bash scripts/build-image.sh
echo "== binaries the end-to-end tests run (cargo test builds a package's binaries only for its own tests)"
cargo build --workspace --locked --bins
echo "== cargo test (test binaries in parallel lanes: scripts/lib/run-tests.sh)"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
bash scripts/lib/run-tests.sh "$log" || status=$?
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
