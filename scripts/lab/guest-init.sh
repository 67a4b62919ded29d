#!/bin/busybox sh
# PID 1 of the lab guest (profile A). Brings up udev and the network (when the guest has a NIC), starts the test
# control channel (TCP over the NIC, vsock over a vsock device) and the agent, then announces readiness on the serial
# console. The agent's listen addresses come from the kernel command line (`wukong.listen=ADDR,ADDR`, Guest's
# options), and are kept in /etc/wukong-agent.args for restarts.
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
export PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
hostname wukong-lab

for m in $(cat /etc/modules-order); do
  insmod "/lib/modules/$m" 2>/dev/null || echo "wukong-lab: insmod $m failed" > /dev/console
done

/lib/systemd/systemd-udevd --daemon
udevadm trigger --type=subsystems --action=add
udevadm trigger --type=devices --action=add
udevadm settle --timeout=30

ip link set lo up
nic=
for n in /sys/class/net/*; do
  n=${n##*/}
  [ "$n" = lo ] || { nic=$n; break; }
done
# A guest booted with `-nic none` has only lo.
if [ -n "$nic" ]; then
  ip link set "$nic" up
  ip addr add 10.0.2.15/24 dev "$nic"
  ip route add default via 10.0.2.2
  # The first packet primes slirp's ARP; without it the first hostfwd connection waits ~6 s on a SYN retransmit.
  ping -c 1 -W 2 10.0.2.2 >/dev/null 2>&1
  setsid nc -ll -p 2323 -e /bin/wukong-ctl-handler </dev/null >/dev/null 2>&1 &
fi
# A virtio-vsock device bound to its driver (with vsock_loopback, /dev/vsock exists without one).
if ls /sys/bus/virtio/drivers/vmw_vsock_virtio_transport 2>/dev/null | grep -q '^virtio'; then
  setsid socat VSOCK-LISTEN:2323,fork,reuseaddr EXEC:/bin/wukong-ctl-handler </dev/null >/dev/null 2>&1 &
fi

listen=0.0.0.0:7443
for arg in $(cat /proc/cmdline); do
  case $arg in wukong.listen=*) listen=${arg#wukong.listen=} ;; esac
done
args=
for address in $(echo "$listen" | tr , ' '); do
  args="$args --listen $address"
done
echo "$args --insecure-plaintext" > /etc/wukong-agent.args
setsid wukong-agent $(cat /etc/wukong-agent.args) </dev/null >>/var/log/wukong-agent.log 2>&1 &
echo "WUKONG-LAB-READY $(cat /proc/uptime)" > /dev/console

# PID 1 must never exit.
while true; do sleep 3600; done
