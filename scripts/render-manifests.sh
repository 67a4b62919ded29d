#!/usr/bin/env bash
# Renders deploy/*.yaml from the chart deploy/chart/wukong-operator, the one source of the cluster manifests, with
# its default values (release wukong-operator in namespace wukong-system), for `kubectl apply` users and the tests
# that read them: crd.yaml (the chart's crds/), operator.yaml, guard.yaml, network-policy.yaml, companion-rbac.yaml,
# and operator-namespaced.yaml (operator.yaml and guard.yaml of a namespaced install, watchNamespace=prod).
# companion-rbac.yaml also gets the example bindings (companion.bindings of the service account wukong-companion
# in namespace prod, as its comment says: change both), which the chart does not install by default.
# tests/tests/chart.rs fails when the committed files differ from a fresh render. Needs scripts/lib/install-helm.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
helm_bin=${CARGO_TARGET_DIR:-target}/wukong-helm/bin
[ -x "$helm_bin/helm" ] || bash scripts/lib/install-helm.sh >/dev/null
# shellcheck source=/dev/null
. "$helm_bin/helm-env"

chart=deploy/chart/wukong-operator
out=${1:-deploy}
header="# generated from deploy/chart by scripts/render-manifests.sh; do not edit"
mkdir -p "$out"

# Writes to FILE the header, $note if set, and the documents of helm template's output on stdin (install order, as
# helm applies them) without the `# Source:` lines, separated by ---.
write() {
  local file=$1
  { echo "$header"; [ -z "$note" ] || echo "$note"; sed -e '1{/^---$/d}' -e '/^# Source: /d'; } >"$out/$file.tmp"
  mv "$out/$file.tmp" "$out/$file"
}

# For Kubernetes 1.31 (the version scripts/test.sh validates against), not whatever helm's own default is: the chart
# renders per server version (policy/v1 from 1.21, matchConditions from 1.28).
render() {
  helm template wukong-operator "$chart" --namespace wukong-system --kube-version 1.31.0 "$@"
}

helm show crds "$chart" | { echo "$header"; sed '1{/^---$/d}'; } >"$out/crd.yaml.tmp"
mv "$out/crd.yaml.tmp" "$out/crd.yaml"
note="# Without Helm: create the namespace wukong-system and the Secrets first (README, \"Declarative disks\"), then
# kubectl apply -f deploy/crd.yaml and this file."
for name in operator guard network-policy; do
  render --show-only "templates/$name.yaml" | write "$name.yaml"
done
# The namespaced install (watchNamespace) of the example namespace prod, with the guard's certificate from a Secret.
note="# Without Helm, a namespaced install watching namespace prod (change prod throughout; before Kubernetes 1.21 label
# it kubernetes.io/metadata.name=prod): create the namespace wukong-system and the Secrets first, set caBundle (README,
# \"Namespaced install\"), then kubectl apply -f deploy/crd.yaml, deploy/network-policy.yaml and this file."
render --show-only templates/operator.yaml --show-only templates/guard.yaml \
  --set watchNamespace=prod --set guard.certificates=secret | write operator-namespaced.yaml
note=""
render --show-only templates/companion-rbac.yaml \
  --set-json 'companion.bindings=[{"namespace":"prod","serviceAccount":"wukong-companion"}]' | write companion-rbac.yaml
