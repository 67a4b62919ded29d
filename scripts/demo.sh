#!/usr/bin/env bash
# The product's main job, end to end: boots a throwaway guest with wukong-agent, hot-plugs a disk over QMP, and
# shows what the agent reports through wukongctl; then the declarative story (a Wukong gains a disk, a refused removal
# with the reasons, a safe one) with wukong-operator on a genuine kube-apiserver. Needs root (QEMU) and installs what
# a fresh machine lacks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/lib/install-deps.sh
bash scripts/lib/install-kube.sh
bash scripts/lib/build-guest-agent.sh
cargo build --locked -p wukong-controller-client -p wukong-operator
cargo run --locked -q -p wukong-e2e --bin wukong-demo
