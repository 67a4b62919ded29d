#!/usr/bin/env bash
# Builds the guest lab's boot files (profile A: a Debian kernel and an initramfs with busybox, Debian's
# systemd-udevd, socat and the agent; vsock modules for guests with a vsock device).
#
#   build-guest.sh OUT_DIR AGENT_BINARY [ARCH]
#
# ARCH is the guest's: x86_64 (the default: the host's own busybox, udev and tools, and Debian's cloud kernel) or
# aarch64 (all from Debian's arm64 packages: linux-image-arm64, busybox-static, udev, libc6, e2fsprogs; a smaller
# guest, for the aarch64 agent's journey: no socat, LVM, md or vsock). Writes OUT_DIR/vmlinuz and OUT_DIR/initrd.img.
# Downloads (Debian packages only) are cached in OUT_DIR/cache and reused; delete that directory to pick up a newer
# kernel.
set -euo pipefail

usage='usage: build-guest.sh OUT_DIR AGENT_BINARY [x86_64|aarch64]'
out=${1:?$usage}
agent=${2:?$usage}
arch=${3:-x86_64}
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"

[ -x "$agent" ] || { echo "build-guest: agent binary $agent not found; build it first (scripts/lib/build-guest-agent.sh)" >&2; exit 1; }
# The host's busybox lists the applets (the guest's may not run here).
command -v busybox >/dev/null || { echo "build-guest: busybox not found; run scripts/lib/install-deps.sh" >&2; exit 1; }

mkdir -p "$out/cache"
out=$(cd "$out" && pwd)
cache=$out/cache
lab_set_arch "$arch" "$cache"

# Where the guest's programs come from: the host itself (sysroot empty), or the unpacked Debian packages of the
# guest's architecture.
sysroot=
case $arch in
  x86_64)
    busybox=$(command -v busybox) udevadm=$(command -v udevadm)
    # Tools tests drive inside the guest; GNU date is there for its nanosecond timestamps. Storage tools build
    # partitions, LVM, md and dm-crypt stacks; socat serves the control channel over vsock when the guest has no
    # network, and tests' vsock services (Debian's is built with VSOCK and OpenSSL addresses).
    tools=(mkfs.ext4 mke2fs blkid sfdisk lvm mdadm dmsetup)
    extras=(date:/usr/local/bin/gdate socat:/usr/bin/socat)
    # vsock after the virtio transport it rides on; vsock_loopback (CID 1 inside the guest) where the kernel has it.
    modules=(virtio_pci virtio_scsi sd_mod virtio_blk virtio_net loop dm_mod dm_crypt raid1 ext4 xfs btrfs overlay
      vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport)
    ;;
  aarch64)
    sysroot=$cache/packages/root
    # libe2p is in libext2fs2; e2fsprogs for mkfs.ext4 (busybox has blkid).
    fetch_packages "$cache/packages" busybox-static udev libudev1 libc6 libgcc-s1 libkmod2 libblkid1 libacl1 libcap2 \
      libselinux1 libpcre2-8-0 liblzma5 libzstd1 libssl3 e2fsprogs libext2fs2 libcom-err2 libuuid1
    busybox=/bin/busybox udevadm=/bin/udevadm
    tools=(mkfs.ext4 mke2fs)
    extras=()
    # ext4's checksums need a crc32c (a soft dependency, not in modules.dep): without one, mount says ENOENT.
    modules=(virtio_pci virtio_scsi sd_mod virtio_net crc32c_generic ext4)
    ;;
esac
triplet=$arch-linux-gnu

# --- kernel -------------------------------------------------------------------------------------------------
fetch_kernel "$cache"
cp "$kdir/boot/vmlinuz-$kver" "$out/vmlinuz.tmp" && mv "$out/vmlinuz.tmp" "$out/vmlinuz"

# --- initramfs tree ----------------------------------------------------------------------------------------
root=$(mktemp -d "$out/root.XXXXXX")
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,etc,proc,sys,dev,run,tmp,var/log,lib/udev,lib/modules,lib64,usr/bin,usr/sbin,usr/local/bin,lib/$triplet,mnt}
# Merged /usr like the host: udev rules call /sbin/dmsetup, /sbin/lvm and /sbin/mdadm.
ln -s usr/sbin "$root/sbin"
cp "$sysroot$busybox" "$root/bin/busybox"
# The applets of the host's busybox: the same Debian version as the guest's (an applet it lacks would only say so).
for applet in $(busybox --list); do
  [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done

# Copies the guest's library NAME (a NEEDED entry) and, recursively, what it needs, from the sysroot's library
# directories to the same place in the tree.
copy_needed_lib() {
  local name=$1 dir path=
  for dir in /lib/$triplet /usr/lib/$triplet; do
    [ -e "$sysroot$dir/$name" ] && { path=$dir/$name; break; }
  done
  [ -n "$path" ] ||
    { echo "build-guest: no $name in the guest's packages ($lab_deb_arch); add its package" >&2; exit 1; }
  [ -e "$root$path" ] && return 0
  mkdir -p "$root$(dirname "$path")"
  cp -L "$sysroot$path" "$root$path"
  copy_needed_of "$sysroot$path"
}

# Copies what ELF file FILE needs: its libraries (NEEDED, recursively) and its program interpreter.
copy_needed_of() {
  local file=$1 lib interp
  interp=$(readelf -l "$file" | sed -n 's/.*Requesting program interpreter: \(.*\)\]/\1/p')
  if [ -n "$interp" ] && [ ! -e "$root$interp" ]; then
    [ -e "$sysroot$interp" ] || { echo "build-guest: no $interp in the guest's packages" >&2; exit 1; }
    mkdir -p "$root$(dirname "$interp")"
    cp -L "$sysroot$interp" "$root$interp"
  fi
  for lib in $(readelf -d "$file" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
    copy_needed_lib "$lib"
  done
}

# Copies a binary (a host path, or a path in the sysroot) and every shared library it needs to the same paths in
# the tree: the host's per ldd, the guest's packages' per their ELF headers.
copy_with_libs() {
  local src=$1 dst=${2:-$1} lib
  mkdir -p "$root$(dirname "$dst")"
  cp -L "$sysroot$src" "$root$dst"
  if [ -n "$sysroot" ]; then
    copy_needed_of "$sysroot$src"
    return 0
  fi
  if ldd "$src" 2>/dev/null | grep -q 'not found'; then
    echo "build-guest: $src needs a library that is not installed:" >&2
    ldd "$src" | grep 'not found' >&2
    exit 1
  fi
  for lib in $(ldd "$src" 2>/dev/null | grep -o '/[^ ]*'); do
    [ -e "$root$lib" ] || { mkdir -p "$root$(dirname "$lib")"; cp -L "$lib" "$root$lib"; }
  done
}

# A program of the guest's: a path in the sysroot, or where the host has it.
guest_program() {
  local name=$1 dir
  if [ -n "$sysroot" ]; then
    for dir in /usr/sbin /usr/bin /sbin /bin; do
      [ -e "$sysroot$dir/$name" ] && { echo "$dir/$name"; return 0; }
    done
  else
    command -v "$name" && return 0
  fi
  echo "build-guest: $name not found; run scripts/lib/install-deps.sh" >&2
  exit 1
}

# udev: the daemon, its helpers and all rules.
copy_with_libs "$udevadm" /bin/udevadm
mkdir -p "$root/lib/systemd"
ln -s /bin/udevadm "$root/lib/systemd/systemd-udevd"
for helper in scsi_id ata_id cdrom_id; do
  copy_with_libs "/lib/udev/$helper" "/lib/udev/$helper"
done
cp -r "$sysroot/lib/udev/rules.d" "$root/lib/udev/"
for tool in "${tools[@]}"; do
  p=$(guest_program "$tool")
  copy_with_libs "$p" "/usr/sbin/$tool"
done
for extra in "${extras[@]}"; do
  p=$(guest_program "${extra%%:*}")
  copy_with_libs "$p" "${extra#*:}"
done
mkdir -p "$root/etc/lvm" "$root/run/lock/lvm"

# The agent, without symbols (a debug build would otherwise bloat the image). It is ours, not the sysroot's; its
# libraries are the guest's.
if [ -n "$sysroot" ]; then
  cp -L "$agent" "$root/usr/bin/wukong-agent"
  copy_needed_of "$agent"
else
  copy_with_libs "$agent" /usr/bin/wukong-agent
fi
# The host's strip knows x86 only; llvm-strip (clang's) any architecture.
strip --strip-all "$root/usr/bin/wukong-agent" 2>/dev/null ||
  llvm-strip --strip-all "$root/usr/bin/wukong-agent" 2>/dev/null || true

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
if [ "$arch" = x86_64 ] && has_module vsock_loopback; then modules+=(vsock_loopback); fi
copy_modules "$root" "${modules[@]}"

cp "$here/guest-init.sh" "$root/init"
cp "$here/guest-ctl-handler.sh" "$root/bin/wukong-ctl-handler"
chmod +x "$root/init" "$root/bin/wukong-ctl-handler"

(cd "$root" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1 > "$out/initrd.img.tmp")
mv "$out/initrd.img.tmp" "$out/initrd.img"
echo "build-guest: $arch kernel $kver, initrd $(du -h "$out/initrd.img" | cut -f1), $(wc -l < "$root/etc/modules-order") modules"
