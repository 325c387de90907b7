#!/bin/sh
# PID 1 of the testbed's Dom0 (installed as /opt/testbed/init). It mounts the share the host
# hands over (9p, tag "share"), starts Xen's Dom0 daemons, unpacks the payload (the project
# checkout), runs the host's command in it, writes the exit code to /share/rc and reboots, which
# makes QEMU (-no-reboot) exit. Every stage is logged with Dom0 uptime so a failure says where.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH

say() {
    echo "$*"
    echo "$*" >/dev/hvc0 2>/dev/null
}
stage() { say "TESTBED-STAGE $1 $(cut -d' ' -f1 /proc/uptime)"; }
finish() {
    cp /var/log/xen/console/*.log /share/ 2>/dev/null
    cp /var/log/xen/xl-*.log /share/ 2>/dev/null
    echo "$1" >/share/rc
    sync
    say "TESTBED-EXIT $1"
    echo b >/proc/sysrq-trigger
    sleep 30
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /run/lock /run/xen /var/log/xen/console /var/lib/xen /var/run

modprobe 9pnet_virtio && modprobe 9p
mkdir -p /share
if ! mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 share /share; then
    say "TESTBED-FAIL dom0: cannot mount the 9p share"
    echo b >/proc/sysrq-trigger
fi
exec >/share/dom0.log 2>&1
stage dom0-init

for m in xenfs xen-evtchn xen-gntdev xen-gntalloc xen-privcmd; do
    modprobe "$m" || say "TESTBED-WARN modprobe $m failed"
done
mountpoint -q /proc/xen || mount -t xenfs xenfs /proc/xen
if ! /etc/init.d/xen start; then
    say "TESTBED-FAIL dom0: Xen daemons did not start"
    finish 125
fi
if ! xl info >/share/xl-info.txt 2>&1; then
    say "TESTBED-FAIL dom0: xl info failed"
    finish 125
fi
stage xen-ready

mkdir -p /run/payload
if ! tar -C /run/payload -xf /share/payload.tar; then
    say "TESTBED-FAIL dom0: cannot unpack the payload"
    finish 125
fi
stage payload-ready

cd /run/payload || finish 125
HOME=/tmp PYTHONPATH=/run/payload:/opt/vgpu/site PYTHONDONTWRITEBYTECODE=1 \
    TESTBED_SHARE=/share sh /share/command.sh
rc=$?
stage command-done
finish "$rc"
