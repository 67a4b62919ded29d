#!/usr/bin/env bash
# Benchmarks, each compared with its peer in the same run (run as root):
#   1. usage scan vs `fuser -m` and `lsof` on N processes x M fds (loop-mounted ext4 on this machine);
#   2. hot-plug latency in the guest lab: QMP device_add -> the agent's ADDED event vs udev's by-id link;
#   3. what a safe detach adds over a raw unplug (QEMU device_del alone), and where the time goes;
#   4. attach and safe detach through a real kube-apiserver with the lab's KubeVirt vs the same over QMP directly;
#   5. wukong-operator with 500, 2,000, 5,000 and 10,000 Wukong objects (WUKONG_SCALE_SIZES): time to converge,
#      peak RSS, API requests by verb and resource, idle writes, and the curve;
#   6. what the admission guard adds to a VM update (nothing removed; a disk released) vs the release alone;
#   7. the ways to reach the agent: TCP vs plain vsock vs KubeVirt's vsock subresource (both TLS modes), and the
#      agent's memory with all its listeners.
#   8. the fault soak: WUKONG_SOAK_ROUNDS (default 200) seeded rounds of work with faults at random moments, and
#      its invariants after every round (WUKONG_SOAK_SEED replays a run's choices).
# Arguments are passed to the usage benchmark, e.g. `scripts/bench.sh 2000x20 4000x20`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/lib/install-deps.sh
bash scripts/lib/install-kube.sh
# The usage benchmark runs on this machine (a host build); the lab guests get the release agent for guests.
cargo build --release --locked -p wukong-agent --example usage_bench
bash scripts/lib/build-guest-agent.sh
target/release/examples/usage_bench "$@"
cargo run --locked -q -p wukong-e2e --bin hotplug-latency
cargo run --locked -q -p wukong-e2e --bin detach-overhead
cargo run --locked -q -p wukong-e2e --bin kubevirt-overhead
cargo run --locked -q -p wukong-e2e --bin transport-latency
cargo build --release --locked -p wukong-operator
read -ra sizes <<< "${WUKONG_SCALE_SIZES:-500 2000 5000 10000}"
cargo run --release --locked -q -p wukong-e2e --bin operator-scale -- "${sizes[@]}"
cargo run --release --locked -q -p wukong-e2e --bin guard-latency
cargo build --locked -p wukong-operator
seed=()
if [[ -n "${WUKONG_SOAK_SEED:-}" ]]; then seed=(--seed "$WUKONG_SOAK_SEED"); fi
cargo run --locked -q -p wukong-e2e --bin fault-soak -- --rounds "${WUKONG_SOAK_ROUNDS:-200}" "${seed[@]}"
