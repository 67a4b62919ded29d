#!/bin/busybox sh
# PID 1 of the lab guest (profile A). Brings up udev and the network, starts the test control channel and the
# agent, then announces readiness on the serial console.
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
ip link set "$nic" up
ip addr add 10.0.2.15/24 dev "$nic"
ip route add default via 10.0.2.2
# The first packet primes slirp's ARP; without it the first hostfwd connection waits ~6 s on a SYN retransmit.
ping -c 1 -W 2 10.0.2.2 >/dev/null 2>&1

setsid nc -ll -p 2323 -e /bin/wukong-ctl-handler </dev/null >/dev/null 2>&1 &

start_agent() {
  setsid wukong-agent --listen 0.0.0.0:7443 --insecure-plaintext </dev/null >>/var/log/wukong-agent.log 2>&1 &
}
start_agent
echo "WUKONG-LAB-READY $(cat /proc/uptime)" > /dev/console

# PID 1 must never exit.
while true; do sleep 3600; done
