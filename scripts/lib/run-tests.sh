#!/usr/bin/env bash
# Runs every test `cargo test --workspace` runs, test binaries in parallel lanes (WUKONG_TEST_LANES, default 2), and
# prints each binary's whole output when it ends, never interleaved. Usage: run-tests.sh LOG (the combined output is
# also written there, for test.sh's summary). Exits non-zero if any test binary failed; all of them run.
#
# Why lanes: the lab tests mostly wait (a guest booting, kube-apiserver answering, a Pod starting), and cargo test
# runs its test binaries one after another: alone, operator_cluster kept 2 cores about 60 % busy; two lanes keep
# them about 82 % busy. Each job is a `cargo test --workspace` limited to some targets, so features resolve as for
# the whole workspace and nothing is rebuilt. What the binaries share on the machine is made for it: loopback ports
# are reserved machine-wide (tests/src/ports.rs), the node lab is one per machine under its lock file, every other
# lab lives in its own temporary directory.
set -euo pipefail
cd "$(dirname "$0")/../.."

combined=${1:?usage: run-tests.sh LOG}
lanes=${WUKONG_TEST_LANES:-2}
logs=target/test-logs
rm -rf "$logs"
mkdir -p "$logs"

# Everything is built first, in one cargo run, so that the lanes only run.
cargo test --workspace --locked --no-run

# The jobs: unit tests of every library and binary, doc tests, then each integration test name (a name two packages
# share, like `release`, is one job that runs both). The longest binaries (from CI runs: minutes each) start first
# so that the lanes end together; the rest follow by name.
longest=(operator_cluster install_journey kubevirt_cluster chart systemd_guest node_lab restarts vsock guard_cluster)
mapfile -t names < <(cargo metadata --no-deps --format-version 1 --locked | python3 -c '
import json, sys
names = {t["name"] for p in json.load(sys.stdin)["packages"] for t in p["targets"] if "test" in t["kind"]}
print("\n".join(sorted(names)))')
jobs=()
for name in "${longest[@]}"; do
  printf '%s\n' "${names[@]}" | grep -qx "$name" && jobs+=("--test $name")
done
for name in "${names[@]}"; do
  [[ " ${longest[*]} " == *" $name "* ]] || jobs+=("--test $name")
done
jobs+=("--lib --bins" "--doc")

# One job: its output into its own log, then printed whole under a lock; its exit status in a file of its own.
run_job() {
  local args=$1 logs=$2 id
  id=$(printf '%s' "$args" | tr -c 'a-zA-Z0-9_' '_')
  local status=0
  # shellcheck disable=SC2086 # the job's arguments are words
  cargo test --workspace --locked --no-fail-fast $args >"$logs/$id.log" 2>&1 || status=$?
  echo "$status" >"$logs/$id.rc"
  flock "$logs/.print" cat "$logs/$id.log"
}
export -f run_job
: >"$combined"
printf '%s\n' "${jobs[@]}" | xargs -P "$lanes" -I{} bash -c 'run_job "$1" "$2"' _ {} "$logs" | tee -a "$combined"

failed=0
for rc in "$logs"/*.rc; do
  [ "$(cat "$rc")" = 0 ] || { echo "run-tests: $(basename "$rc" .rc) failed" >&2; failed=1; }
done
[ "$(find "$logs" -name '*.rc' | wc -l)" -eq "${#jobs[@]}" ] || {
  echo "run-tests: only $(find "$logs" -name '*.rc' | wc -l) of ${#jobs[@]} test jobs ran" >&2
  failed=1
}
exit "$failed"
