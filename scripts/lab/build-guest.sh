#!/usr/bin/env bash
# Builds the guest lab's boot files (profile A: a Debian cloud kernel and an initramfs with busybox, Debian's
# systemd-udevd, socat and the agent; vsock modules for guests with a vsock device).
#
#   build-guest.sh OUT_DIR AGENT_BINARY
#
# Writes OUT_DIR/vmlinuz and OUT_DIR/initrd.img. Downloads (Debian packages only) are cached in OUT_DIR/cache and
# reused; delete that directory to pick up a newer kernel.
set -euo pipefail

out=${1:?usage: build-guest.sh OUT_DIR AGENT_BINARY}
agent=${2:?usage: build-guest.sh OUT_DIR AGENT_BINARY}
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"

[ -x "$agent" ] || { echo "build-guest: agent binary $agent not found; build it first (scripts/lib/build-guest-agent.sh)" >&2; exit 1; }
command -v busybox >/dev/null || { echo "build-guest: busybox not found; run scripts/lib/install-deps.sh" >&2; exit 1; }

mkdir -p "$out/cache"
out=$(cd "$out" && pwd)
cache=$out/cache

# --- kernel -------------------------------------------------------------------------------------------------
fetch_kernel "$cache"
cp "$kdir/boot/vmlinuz-$kver" "$out/vmlinuz.tmp" && mv "$out/vmlinuz.tmp" "$out/vmlinuz"

# --- initramfs tree ----------------------------------------------------------------------------------------
root=$(mktemp -d "$out/root.XXXXXX")
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,etc,proc,sys,dev,run,tmp,var/log,lib/udev,lib/modules,lib64,usr/bin,usr/sbin,usr/local/bin,lib/x86_64-linux-gnu,mnt}
# Merged /usr like the host: udev rules call /sbin/dmsetup, /sbin/lvm and /sbin/mdadm.
ln -s usr/sbin "$root/sbin"
cp "$(command -v busybox)" "$root/bin/busybox"
for applet in $(busybox --list); do
  [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done

# Copies a host binary and every shared library it needs to the same paths in the tree.
copy_with_libs() {
  local src=$1 dst=${2:-$1} lib
  mkdir -p "$root$(dirname "$dst")"
  cp -L "$src" "$root$dst"
  if ldd "$src" 2>/dev/null | grep -q 'not found'; then
    echo "build-guest: $src needs a library that is not installed:" >&2
    ldd "$src" | grep 'not found' >&2
    exit 1
  fi
  for lib in $(ldd "$src" 2>/dev/null | grep -o '/[^ ]*'); do
    [ -e "$root$lib" ] || { mkdir -p "$root$(dirname "$lib")"; cp -L "$lib" "$root$lib"; }
  done
}

# udev: the daemon, its helpers and all rules.
copy_with_libs "$(command -v udevadm)" /bin/udevadm
mkdir -p "$root/lib/systemd"
ln -s /bin/udevadm "$root/lib/systemd/systemd-udevd"
for helper in scsi_id ata_id cdrom_id; do
  copy_with_libs "/lib/udev/$helper" "/lib/udev/$helper"
done
cp -r /lib/udev/rules.d "$root/lib/udev/"
# Tools tests drive inside the guest; GNU date is there for its nanosecond timestamps.
copy_with_libs "$(command -v date)" /usr/local/bin/gdate
# Storage tools the tests use to build partitions, LVM, md and dm-crypt stacks in the guest.
for tool in mkfs.ext4 mke2fs blkid sfdisk lvm mdadm dmsetup; do
  p=$(command -v "$tool" || true)
  [ -n "$p" ] || { echo "build-guest: $tool not found; run scripts/lib/install-deps.sh" >&2; exit 1; }
  copy_with_libs "$p" "/usr/sbin/$tool"
done
mkdir -p "$root/etc/lvm" "$root/run/lock/lvm"
# socat serves the control channel over vsock when the guest has no network, and tests' vsock services (Debian's is
# built with VSOCK and OpenSSL addresses).
p=$(command -v socat || true)
[ -n "$p" ] || { echo "build-guest: socat not found; run scripts/lib/install-deps.sh" >&2; exit 1; }
copy_with_libs "$p" /usr/bin/socat

# The agent, without symbols (a debug build would otherwise bloat the image).
copy_with_libs "$agent" /usr/bin/wukong-agent
strip --strip-all "$root/usr/bin/wukong-agent" 2>/dev/null || true

cat > "$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
: > "$root/etc/group"
gid=0
for g in root disk kmem dialout cdrom tape audio video input kvm render sgx tty lp floppy sudo users nogroup systemd-journal; do
  echo "$g:x:$gid:" >> "$root/etc/group"
  gid=$((gid + 1))
done

# --- kernel modules, dependencies resolved from modules.dep -----------------------------------------------------
# vsock after the virtio transport it rides on; vsock_loopback (CID 1 inside the guest) where the kernel has it.
vsock_modules=(vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport)
has_module vsock_loopback && vsock_modules+=(vsock_loopback)
copy_modules "$root" virtio_pci virtio_scsi sd_mod virtio_blk virtio_net loop dm_mod dm_crypt raid1 ext4 xfs btrfs overlay \
  "${vsock_modules[@]}"

cp "$here/guest-init.sh" "$root/init"
cp "$here/guest-ctl-handler.sh" "$root/bin/wukong-ctl-handler"
chmod +x "$root/init" "$root/bin/wukong-ctl-handler"

(cd "$root" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1 > "$out/initrd.img.tmp")
mv "$out/initrd.img.tmp" "$out/initrd.img"
echo "build-guest: kernel $kver, initrd $(du -h "$out/initrd.img" | cut -f1), $(wc -l < "$root/etc/modules-order") modules"
