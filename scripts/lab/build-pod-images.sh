#!/usr/bin/env bash
# Builds the node lab's two local images as OCI archives (no registry is reachable; the lab imports them into
# containerd with `ctr images import`):
#   OUT_DIR/pause.tar  localhost/wukong-lab/pause:1  containerd's sandbox_image: a static C `pause` (pause.c)
#   OUT_DIR/pod.tar    localhost/wukong-lab/pod:1    the lab's test workload, wukong-lab-pod (tests/src/lab_pod.rs),
#                                                    with the shared libraries it loads, as uid 65532
#
#   build-pod-images.sh OUT_DIR LAB_POD_BINARY
#
# Both are FROM scratch, written by buildah with private vfs storage (removed afterwards) and timestamp 0. About 10 s.
set -euo pipefail

out=${1:?usage: build-pod-images.sh OUT_DIR LAB_POD_BINARY}
binary=${2:?usage: build-pod-images.sh OUT_DIR LAB_POD_BINARY}
here=$(cd "$(dirname "$0")" && pwd)

[ -x "$binary" ] || { echo "build-pod-images: $binary not found; cargo builds it with the tests" >&2; exit 1; }
for tool in buildah gcc strip ldd; do
  command -v "$tool" >/dev/null || { echo "build-pod-images: $tool is missing; run scripts/lib/install-deps.sh" >&2; exit 1; }
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d "$out/build.XXXXXX")
storage=(--root "$work/storage" --runroot "$work/run" --storage-driver vfs)
cleanup() {
  buildah "${storage[@]}" rm --all >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# IMAGE NAME ROOTFS USER ENTRYPOINT: a FROM scratch image holding ROOTFS, written to OUT_DIR/NAME.tar.
image() {
  local ref=$1 name=$2 rootfs=$3 user=$4 entrypoint=$5 c
  c=$(buildah "${storage[@]}" from scratch)
  buildah "${storage[@]}" copy --quiet "$c" "$rootfs" / >/dev/null
  buildah "${storage[@]}" config --user "$user" --entrypoint "[\"$entrypoint\"]" \
    --label org.opencontainers.image.source=wukong-disk-agent/scripts/lab "$c"
  buildah "${storage[@]}" commit --quiet --format oci --timestamp 0 --rm "$c" \
    "oci-archive:$out/$name.tar.new:$ref" >/dev/null
  mv "$out/$name.tar.new" "$out/$name.tar"
}

mkdir -p "$work/pause"
gcc -static -Os -s -o "$work/pause/pause" "$here/pause.c"
image localhost/wukong-lab/pause:1 pause "$work/pause" 65535:65535 /pause

# A dynamically linked Rust binary: itself, stripped, and each library ldd resolves, at the same paths.
mkdir -p "$work/pod"
strip -o "$work/pod/wukong-lab-pod" "$binary"
ldd "$binary" | awk '/=> \// { print $3 } /^[[:space:]]*\/[^ ]+ \(/ { print $1 }' | while read -r lib; do
  mkdir -p "$work/pod$(dirname "$lib")"
  cp -L "$lib" "$work/pod$lib"
done
image localhost/wukong-lab/pod:1 pod "$work/pod" 65532:65532 /wukong-lab-pod
echo "build-pod-images: $out/pause.tar and $out/pod.tar"
