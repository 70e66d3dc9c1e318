#!/bin/sh
# /init of the boot smoke-test image (guest-agent/image/test/boot-smoke.sh): shows that the
# kernel runs user space, mounts what the agent needs, and binds the virtio vsock device.
# Every result line starts with "SGE-SMOKE " so that the host side can parse it.
mount -t proc proc /proc
echo "SGE-SMOKE init-start uptime=$(cut -d' ' -f1 /proc/uptime)"
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mkdir -p /sys/fs/cgroup
mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo "SGE-SMOKE uptime=$(cut -d' ' -f1 /proc/uptime)"
echo "SGE-SMOKE release=$(uname -r)"
echo "SGE-SMOKE cpus=$(grep -c ^processor /proc/cpuinfo)"
for d in /sys/bus/virtio/drivers/*/; do
    devs=
    for v in "$d"virtio*; do [ -e "$v" ] && devs="$devs$(basename "$v") "; done
    echo "SGE-SMOKE driver=$(basename "$d") devices=$devs"
done
for dev in /sys/bus/virtio/devices/*; do
    [ -e "$dev" ] || continue
    drv=none
    [ -e "$dev/driver" ] && drv=$(basename "$(readlink "$dev/driver")")
    echo "SGE-SMOKE device=$(basename "$dev") id=$(cat "$dev/device") driver=$drv"
done
[ -c /dev/vsock ] && echo "SGE-SMOKE dev-vsock=present" || echo "SGE-SMOKE dev-vsock=missing"
echo "SGE-SMOKE filesystems=$(awk '{print $NF}' /proc/filesystems | sort | tr '\n' ' ')"
echo "SGE-SMOKE cgroup-controllers=$(cat /sys/fs/cgroup/cgroup.controllers)"
mkdir -p /tmp/lower /tmp/upper /tmp/work /tmp/merged && echo hello >/tmp/lower/f \
    && mount -t overlay overlay -o lowerdir=/tmp/lower,upperdir=/tmp/upper,workdir=/tmp/work /tmp/merged \
    && [ "$(cat /tmp/merged/f)" = hello ] && echo "SGE-SMOKE overlay=ok" || echo "SGE-SMOKE overlay=FAILED"
echo "SGE-SMOKE done uptime=$(cut -d' ' -f1 /proc/uptime)"
reboot -f
