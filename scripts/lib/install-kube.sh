#!/usr/bin/env bash
# Installs a real Kubernetes control plane and node for the tests: kube-apiserver, kube-controller-manager,
# kube-scheduler, kube-proxy and kubelet v1.20.2, and the kubectl that matches them (the demo and the README's
# install run it; Debian's kubernetes-client package would clash with a kubectl a machine may already have), built once per machine from Debian bookworm's `kubernetes` source
# package (the whole upstream tree with vendor/) with Debian's Go 1.19, and etcd 3.4 from Debian's etcd-server
# package. Go and etcd are unpacked into a private prefix (nothing is installed system-wide for them); apt runs with
# the private configuration of apt.sh plus deb-src entries, never /etc/apt. The node's runtime comes from Debian as
# packages: containerd, runc, the CNI plugins, and iptables for kube-proxy and the lab's egress guard.
#
# Output: $WUKONG_KUBE_DIR/bin (default target/wukong-kube/bin, under $CARGO_TARGET_DIR if set, where the tests
# look) with the six Kubernetes binaries, etcd and .complete. The build happens in $WUKONG_KUBE_DIR/build and is
# published by renaming a finished directory, whose .complete stamp (versions and this script's checksum, so a
# changed script builds again) is written last. A later run checks the stamp and the binaries and finishes in about
# a second; concurrent runs wait for each other (flock).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=apt.sh
. "$here/apt.sh"

kube_version=v1.20.2
# Built from one source tree in one `go build`, which shares the packages they have in common. Measured on 2 cores
# with another build running: 10m18s for all five from a fresh machine (download, OpenAPI generation, the build;
# kube-apiserver alone took about 7.5 min), 0.7 s for a later run that finds them.
components=(kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubelet kubectl)
# The node's runtime, from bookworm: containerd 1.6.20, runc 1.1.5, containernetworking-plugins 1.1.1; kube-proxy
# programs iptables (and clears UDP flows with conntrack).
node_packages=(containerd runc containernetworking-plugins iptables conntrack)
started=$(date +%s%N)
script_sum=$(sha256sum "$here/install-kube.sh" | cut -d' ' -f1)
out=${WUKONG_KUBE_DIR:-${CARGO_TARGET_DIR:-$here/../../target}/wukong-kube}
mkdir -p "$out"
out=$(cd "$out" && pwd)
bin=$out/bin

say() { echo "install-kube: $*"; }

elapsed() {
  local ms=$((($(date +%s%N) - started) / 1000000))
  if [ "$ms" -ge 60000 ]; then
    printf '%dm%02ds' $((ms / 60000)) $((ms % 60000 / 1000))
  else
    printf '%d.%ds' $((ms / 1000)) $((ms % 1000 / 100))
  fi
}

# Checks the binaries in DIR: every component must be $kube_version and etcd 3.4.x. Prints
# "Kubernetes VERSION (components) and etcd VERSION", or a reason on stderr and fails.
verify() {
  local dir=$1 c kube etcd
  for c in "${components[@]}"; do
    if [ "$c" = kubectl ]; then
      # kubectl has no --version flag; its client version says the same in other words.
      kube=$("$dir/$c" version --client --short 2>&1) || { echo "$dir/$c version failed: $kube" >&2; return 1; }
      kube=${kube/#Client Version: /Kubernetes }
    else
      kube=$("$dir/$c" --version 2>&1) || { echo "$dir/$c --version failed: $kube" >&2; return 1; }
    fi
    if [ "$kube" != "Kubernetes $kube_version" ]; then
      echo "$dir/$c prints version '$kube', not 'Kubernetes $kube_version'" >&2
      return 1
    fi
  done
  etcd=$("$dir/etcd" --version 2>&1) || { echo "$dir/etcd --version failed: $etcd" >&2; return 1; }
  etcd=$(awk '/^etcd Version:/ { print $3 }' <<<"$etcd")
  case $etcd in
    3.4.*) ;;
    *) echo "$dir/etcd --version prints version '$etcd', not 3.4.x" >&2; return 1 ;;
  esac
  echo "Kubernetes $kube_version (${components[*]}) and etcd $etcd"
}

# Prints the Debian packages among "$@" that are not installed.
missing_packages() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"
  done
}

# Installs the node's runtime packages that are missing. Where systemd runs, Debian's containerd package also starts
# a system-wide containerd; the lab never uses it: it starts its own, with a private configuration and socket.
install_node_packages() {
  local missing
  mapfile -t missing < <(missing_packages "${node_packages[@]}")
  [ ${#missing[@]} -gt 0 ] || return 0
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt_private_update
  apt_private install -y -qq --no-install-recommends "${missing[@]}"
}

exec 9>"$out/.lock"
if ! flock -n 9; then
  say "another install is under way (lock $out/.lock); waiting for it"
  flock 9
fi

install_node_packages

if [ -f "$bin/.complete" ] && grep -qx "script $script_sum" "$bin/.complete"; then
  if versions=$(verify "$bin"); then
    say "$versions reused in $bin ($(elapsed))"
    exit 0
  fi
  say "the installed binaries fail their check (above); building them again"
fi

# Host tools: dpkg-source (dpkg-dev, which brings patch) unpacks the source package, make generates the OpenAPI code.
mapfile -t missing < <(missing_packages dpkg-dev make xz-utils)

export DEBIAN_FRONTEND=noninteractive
say "building Kubernetes $kube_version (${components[*]}) from Debian's kubernetes source package" \
  "(about 10 minutes on 2 cores, once)"
apt_private_setup
apt_private_add_deb_src
apt_private update -qq
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  apt_private install -y -qq --no-install-recommends "${missing[@]}"
fi

# Whatever an earlier run left here is unfinished: the lock is ours.
build=$out/build
rm -rf "$build" "$out/bin.new" "$out/bin.old"
mkdir -p "$build/debs" "$build/prefix" "$build/gopath/src/k8s.io" "$build/gocache"
log=$build/build.log
: >"$log"

# Runs one command with its output in the build log; on failure shows the log's end and stops.
step() {
  if ! "$@" >>"$log" 2>&1; then
    echo "install-kube: failed: $*" >&2
    tail -n 40 "$log" >&2
    echo "install-kube: the whole log is $log (the build tree is kept until the next run)" >&2
    exit 1
  fi
}

say "downloading Go 1.19, etcd, reflect2 and the kubernetes source package"
(
  cd "$build/debs"
  apt_private -qq -o APT::Sandbox::User=root download golang-1.19-go golang-1.19-src etcd-server \
    golang-github-modern-go-reflect2-dev
  apt_private -qq -o APT::Sandbox::User=root source --download-only kubernetes
)
dscs=("$build"/debs/kubernetes_*.dsc)
dsc=${dscs[0]}
kube_deb_version=$(awk '/^Version:/ { print $2; exit }' "$dsc")
case $kube_deb_version in
  *really${kube_version#v}-* | ${kube_version#v}-*) ;;
  *) echo "install-kube: Debian's kubernetes source is $kube_deb_version, not upstream $kube_version" >&2; exit 1 ;;
esac
go_deb_version=$(dpkg-deb -f "$build"/debs/golang-1.19-go_*.deb Version)
etcd_deb_version=$(dpkg-deb -f "$build"/debs/etcd-server_*.deb Version)
for deb in "$build"/debs/*.deb; do
  dpkg -x "$deb" "$build/prefix"
done
src=$build/kubernetes
step dpkg-source -x "$dsc" "$src"
rm -rf "$build/debs"

# Trap 1: the vendored reflect2 v1.0.1 panics under Go >= 1.18 (the server dies on its first CRD POST); Debian's
# 1.0.2 does not. GOPATH mode, so its go.mod goes.
rm -rf "$src/vendor/github.com/modern-go/reflect2"
cp -r "$build/prefix/usr/share/gocode/src/github.com/modern-go/reflect2" "$src/vendor/github.com/modern-go/reflect2"
rm -f "$src/vendor/github.com/modern-go/reflect2/go.mod"
[ -f "$src/vendor/github.com/modern-go/reflect2/go_above_118.go" ] ||
  { echo "install-kube: Debian's reflect2 has no go_above_118.go; it is not the fixed 1.0.2" >&2; exit 1; }

# Trap 2: without git metadata /version reports a placeholder (v0.0.0-master+...), which clients parse.
major=${kube_version#v}
major=${major%%.*}
minor=${kube_version#v"$major".}
minor=${minor%%.*}
for f in staging/src/k8s.io/component-base/version/base.go staging/src/k8s.io/client-go/pkg/version/base.go; do
  sed -E -i \
    -e "s#^([[:space:]]*gitMajor)[[:space:]][^/]*#\1 string = \"$major\" #" \
    -e "s#^([[:space:]]*gitMinor)[[:space:]][^/]*#\1 string = \"$minor\" #" \
    -e "s#^([[:space:]]*gitVersion)[[:space:]][^/]*#\1 string = \"$kube_version\" #" \
    -e "s#^([[:space:]]*gitTreeState)[[:space:]][^/]*#\1 string = \"clean\" #" \
    "$src/$f"
  for want in "gitMajor string = \"$major\"" "gitMinor string = \"$minor\"" \
    "gitVersion string = \"$kube_version\"" "gitTreeState string = \"clean\""; do
    grep -qE "^[[:space:]]*$want" "$src/$f" || { echo "install-kube: could not set $want in $f" >&2; exit 1; }
  done
done

# Kubernetes 1.20 builds in GOPATH mode, offline, with the private Go.
goroot=$build/prefix/usr/lib/go-1.19
unset GOBIN GOOS GOARCH GOFLAGS GOEXPERIMENT GOAMD64 GOTOOLDIR GOROOT_FINAL
export GOROOT=$goroot GOPATH=$build/gopath GOCACHE=$build/gocache GOENV=off GO111MODULE=off GOPROXY=off \
  CGO_ENABLED=0 PATH=$goroot/bin:$PATH
ln -s "$src" "$GOPATH/src/k8s.io/kubernetes"
cd "$GOPATH/src/k8s.io/kubernetes"
go_version=$(go version)
gen_dir=_output/local/bin/$(go env GOOS)/$(go env GOARCH)
mkdir -p "$gen_dir"

# The generated OpenAPI code is not in the tarball. make would build openapi-gen with a copy step that needs
# rsync; built here first, make finds it up to date.
say "building openapi-gen and generating the OpenAPI code ($go_version)"
step go build -o "$gen_dir/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
step make gen_openapi
say "building ${components[*]}"
mkdir -p "$build/out"
step go build -ldflags "-s -w" -o "$build/out/" "${components[@]/#/./cmd/}"
cd "$out"

# Publish: a complete directory, stamp written last, renamed into place.
stage=$out/bin.new
mkdir -p "$stage"
cp "${components[@]/#/$build/out/}" "$build/prefix/usr/bin/etcd" "$stage/"
versions=$(verify "$stage")
cat >"$stage/.complete.tmp" <<STAMP
${components[*]} $kube_version (Debian source kubernetes $kube_deb_version, Debian golang-1.19-go $go_deb_version)
etcd $(awk '{ print $NF }' <<<"$versions") (Debian etcd-server $etcd_deb_version)
script $script_sum
STAMP
mv "$stage/.complete.tmp" "$stage/.complete"
[ ! -e "$bin" ] || mv -T "$bin" "$out/bin.old"
mv -T "$stage" "$bin"
rm -rf "$out/bin.old"
build_size=$(du -sh "$build" | cut -f1)
rm -rf "$build"
say "$versions built in $bin ($(elapsed); the $build_size build tree is removed)"
