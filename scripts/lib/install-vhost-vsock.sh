#!/usr/bin/env bash
# Builds vhost-device-vsock (rust-vmm's userspace vhost-user vsock backend) once per machine into
# target/wukong-tools. The guest lab gives its guests a vsock device with it: this machine's kernel has no vhost_vsock
# module, so QEMU's vhost-vsock-pci cannot be used (vhost-user-vsock-pci can). Prints the binary's path.
set -euo pipefail
cd "$(dirname "$0")/../.."
version=0.3.0
root=$PWD/target/wukong-tools/vhost-device-vsock-$version
bin=$root/bin/vhost-device-vsock
if [ ! -x "$bin" ]; then
  echo "install-vhost-vsock: building vhost-device-vsock $version (about 3 min on 2 cores, once)" >&2
  # Its own target directory under ours, so the build neither touches the workspace's nor leaves files elsewhere.
  cargo install --quiet --locked --root "$root" --target-dir "$PWD/target/wukong-tools/build" \
    vhost-device-vsock --version "$version" >&2
  rm -rf "$PWD/target/wukong-tools/build"
fi
echo "$bin"
