#!/usr/bin/env bash
# Builds wukong-operator's container image without a container daemon and writes it as an OCI archive:
#   target/wukong-image/wukong-operator-<version>.oci.tar   (image reference: see IMAGE below)
# and prints that path on stdout (progress goes to stderr).
#
# Why this way: the image is FROM scratch (operator/Containerfile), so the binary must need nothing from the
# filesystem: it is linked statically (glibc's crt-static on the gnu target: the toolchain has no musl target)
# in its own target directory (target/wukong-image/cargo), so the workspace's debug build is not invalidated.
# buildah assembles the image with the vfs driver and private storage under target/, as root, with no daemon.
# Reproducible: every timestamp (the config's `created`, the history, the files' mtimes) is the commit's time
# (or SOURCE_DATE_EPOCH), and source paths are remapped: one commit gives one digest (tests/tests/operator_image.rs
# builds it twice and compares).
#
#   scripts/build-image.sh [--out DIR]      DIR defaults to target/wukong-image
# A release pushes the archive as it is, e.g.
#   skopeo copy oci-archive:target/wukong-image/wukong-operator-0.1.0.oci.tar docker://REGISTRY/wukong-operator:0.1.0
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

out=$root/target/wukong-image
while [ $# -gt 0 ]; do
  case "$1" in
    --out)
      [ $# -ge 2 ] || { echo "build-image: --out needs a directory" >&2; exit 2; }
      out=$(mkdir -p "$2" && cd "$2" && pwd)
      shift 2
      ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "build-image: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

for tool in buildah skopeo; do
  command -v "$tool" >/dev/null || {
    echo "build-image: $tool is missing; run scripts/lib/install-deps.sh (as root) first" >&2
    exit 1
  }
done
[ "$(id -u)" -eq 0 ] || { echo "build-image: buildah's vfs storage needs root; run it as root" >&2; exit 1; }

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
# The reference the image is named by inside the archive: deploy/operator.yaml's Deployment names exactly this (a
# test checks), so a node that imported the archive runs it without pulling, and a release pushes it there.
IMAGE=ghcr.io/wukong-disk-agent/wukong-operator:$version
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)
source=$(sed -n 's/^repository = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
license=$(sed -n 's/^license = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
description=$(sed -n 's/^description = "\(.*\)"$/\1/p' operator/Cargo.toml | head -n1)

# The `image` profile (Cargo.toml): release code without fat LTO, so CI compiles the dependencies a second time in
# minutes. The target is named so that RUSTFLAGS reach the binary only, not build scripts and proc macros.
cargo_target=$root/target/wukong-image/cargo
triple=x86_64-unknown-linux-gnu
echo "build-image: building a static wukong-operator ($triple, profile image)" >&2
RUSTFLAGS="-C target-feature=+crt-static --remap-path-prefix=$root=/wukong --remap-path-prefix=${CARGO_HOME:-$HOME/.cargo}=/cargo" \
  CARGO_TARGET_DIR=$cargo_target cargo build --locked --quiet --profile image --target "$triple" -p wukong-operator >&2
binary=$cargo_target/$triple/image/wukong-operator
if ! file "$binary" | grep -Eq 'static(-pie|ally) linked'; then
  echo "build-image: $binary is not statically linked ($(file -b "$binary")); a FROM scratch image cannot run it" >&2
  exit 1
fi

archive=$out/wukong-operator-$version.oci.tar
stamp=$out/.image-stamp
inputs=$(
  {
    sha256sum "$binary" operator/Containerfile "$0" | cut -d' ' -f1
    echo "$IMAGE $revision $epoch $source $license $description"
  } | sha256sum | cut -d' ' -f1
)
if [ -f "$archive" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$inputs" ]; then
  echo "build-image: $archive is up to date" >&2
  echo "$archive"
  exit 0
fi

# Private storage: nothing of the machine's (or another build's) containers is touched or reused.
storage=(--root "$out/storage" --runroot "$out/run" --storage-driver vfs)
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
cp "$binary" "$context/wukong-operator"
chmod 0555 "$context/wukong-operator"
echo "build-image: assembling $IMAGE" >&2
buildah "${storage[@]}" bud --quiet --format oci --no-cache --timestamp "$epoch" \
  --label "org.opencontainers.image.title=wukong-operator" \
  --label "org.opencontainers.image.description=$description" \
  --label "org.opencontainers.image.source=$source" \
  --label "org.opencontainers.image.version=$version" \
  --label "org.opencontainers.image.revision=$revision" \
  --label "org.opencontainers.image.licenses=$license" \
  --label "org.opencontainers.image.created=$created" \
  -f operator/Containerfile -t "$IMAGE" "$context" >/dev/null
rm -f "$archive"
buildah "${storage[@]}" push --quiet "$IMAGE" "oci-archive:$archive:$IMAGE"
buildah "${storage[@]}" rmi --all >/dev/null
echo "$inputs" >"$stamp"
digest=$(skopeo inspect --format '{{.Digest}}' "oci-archive:$archive")
echo "build-image: $IMAGE $digest, $(du -h "$archive" | cut -f1) archive" >&2
echo "$archive"
