#!/usr/bin/env bash
# Builds the lab's profile B: a Debian bookworm root filesystem (debootstrap) with systemd as PID 1, udev,
# systemd-networkd and cloud-init (NoCloud only), and a small loader initramfs that mounts it. The agent is not in
# the image: cloud-init installs it from the user data, as it would in production.
#
#   build-systemd-guest.sh OUT_DIR
#
# Writes OUT_DIR/systemd/{vmlinuz,loader.img,root.img}. Packages are cached in OUT_DIR/cache.
set -euo pipefail

out=${1:?usage: build-systemd-guest.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"
command -v debootstrap >/dev/null || { echo "build-systemd-guest: debootstrap not found; run scripts/lib/install-deps.sh" >&2; exit 1; }

mkdir -p "$out/cache/debootstrap" "$out/systemd"
out=$(cd "$out" && pwd)
fetch_kernel "$out/cache"
dest=$out/systemd
rootfs=$(mktemp -d "$dest/rootfs.XXXXXX")
loader=$(mktemp -d "$dest/loader.XXXXXX")
trap 'rm -rf "$rootfs" "$loader"' EXIT

mirror=$(awk '/^URIs:/ {print $2}' /etc/apt/sources.list.d/*.sources | grep -v security | head -n1)
[ -n "$mirror" ] || { echo "build-systemd-guest: no Debian mirror in /etc/apt/sources.list.d/*.sources" >&2; exit 1; }
echo "build-systemd-guest: debootstrap (a few minutes the first time)"
# python3-cffi-backend: debootstrap does not resolve cloud-init's virtual dependency on it by itself.
debootstrap --variant=minbase --cache-dir="$out/cache/debootstrap" \
  --include=systemd-sysv,udev,iproute2,kmod,procps,curl,ca-certificates,e2fsprogs,cloud-init,python3-cffi-backend \
  bookworm "$rootfs" "$mirror" > "$dest/debootstrap.log" 2>&1 \
  || { tail -n 30 "$dest/debootstrap.log" >&2; exit 1; }

# The kernel's whole module tree, so udev loads drivers by modalias (isofs and cdrom for the NoCloud seed too).
mkdir -p "$rootfs/lib/modules"
cp -a "$moddir" "$rootfs/lib/modules/"
depmod -b "$rootfs" "$kver"

echo wukong-lab-b > "$rootfs/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 wukong-lab-b\n' > "$rootfs/etc/hosts"
echo "/dev/vda / ext4 rw,relatime 0 1" > "$rootfs/etc/fstab"
mkdir -p "$rootfs/etc/systemd/network"
cat > "$rootfs/etc/systemd/network/10-lab.network" <<'UNIT'
[Match]
Name=en* eth*

[Network]
Address=10.0.2.15/24
Gateway=10.0.2.2
DNS=10.0.2.3
UNIT
# cloud-init reads the NoCloud seed only, and leaves the network to systemd-networkd; a minbase system has no
# locales for its locale module to set.
cat > "$rootfs/etc/cloud/cloud.cfg.d/90-wukong-lab.cfg" <<'CFG'
datasource_list: [ NoCloud, None ]
network: {config: disabled}
locale: false
CFG

# Test-only control channel (as in profile A), and a readiness line on the serial console.
cp "$(command -v busybox)" "$rootfs/usr/local/bin/busybox"
cp "$here/guest-ctl-handler.sh" "$rootfs/usr/local/bin/wukong-ctl-handler"
chmod +x "$rootfs/usr/local/bin/wukong-ctl-handler"
cat > "$rootfs/etc/systemd/system/wukong-lab-ctl.service" <<'UNIT'
[Unit]
Description=Wukong lab control channel (tests only)
After=network.target

[Service]
ExecStart=/usr/local/bin/busybox nc -ll -p 2323 -e /usr/local/bin/wukong-ctl-handler
Restart=always

[Install]
WantedBy=multi-user.target
UNIT
cat > "$rootfs/etc/systemd/system/wukong-lab-ready.service" <<'UNIT'
[Unit]
Description=Wukong lab readiness marker
After=wukong-lab-ctl.service network-online.target
Wants=network-online.target

[Service]
Type=oneshot
# The first packet primes slirp's ARP; without it the first hostfwd connection waits ~6 s on a SYN retransmit.
ExecStart=/bin/sh -c '/usr/local/bin/busybox ping -c 1 -W 2 10.0.2.2 >/dev/null 2>&1; echo "WUKONG-LAB-READY $(cat /proc/uptime)" > /dev/ttyS0'

[Install]
WantedBy=multi-user.target
UNIT
chroot "$rootfs" systemctl enable systemd-networkd wukong-lab-ctl.service wukong-lab-ready.service >/dev/null 2>&1
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*

mkfs.ext4 -q -F -d "$rootfs" "$dest/root.img.tmp" 2G
mv "$dest/root.img.tmp" "$dest/root.img"

# Loader: mounts /dev/vda and hands over to systemd.
mkdir -p "$loader"/{bin,dev,proc,sys,newroot}
cp "$(command -v busybox)" "$loader/bin/busybox"
copy_modules "$loader" virtio_pci virtio_blk ext4
cat > "$loader/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs devtmpfs /dev
for m in $(/bin/busybox cat /etc/modules-order); do /bin/busybox insmod "/lib/modules/$m"; done
while [ ! -b /dev/vda ]; do /bin/busybox sleep 0.1; done
/bin/busybox mount -o rw /dev/vda /newroot
/bin/busybox umount /proc
exec /bin/busybox switch_root /newroot /sbin/init
INIT
chmod +x "$loader/init"
(cd "$loader" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1 > "$dest/loader.img.tmp")
mv "$dest/loader.img.tmp" "$dest/loader.img"
cp "$kdir/boot/vmlinuz-$kver" "$dest/vmlinuz.tmp" && mv "$dest/vmlinuz.tmp" "$dest/vmlinuz"
echo "build-systemd-guest: kernel $kver, root.img $(du -h "$dest/root.img" | cut -f1) used"
