#!/bin/sh
# /init of the xtask test VM (busybox initramfs). Generated into the
# initramfs by `cargo xtask vm|test-vm|demo`; see xtask/src/vm.rs.
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /root /usr/bin /usr/sbin /sbin
/bin/busybox --install -s 2>/dev/null
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/shm /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
echo 4 > /proc/sys/kernel/printk 2>/dev/null

status() { echo "$*" > /dev/ttyS1 2>/dev/null || echo "xtask-guest: cannot write status to /dev/ttyS1"; }

if [ -f /etc/ublk-modules ]; then
    while read -r mod; do
        [ -n "$mod" ] || continue
        name=$(basename "$mod" .ko)
        if [ -d "/sys/module/$name" ]; then continue; fi
        insmod "/lib/modules/$mod" || echo "xtask-guest: insmod $mod failed"
    done < /etc/ublk-modules
fi
if [ -d /sys/kernel/config ]; then
    mount -t configfs configfs /sys/kernel/config 2>/dev/null
fi

export PATH=/opt/ublk/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TMPDIR=/tmp UBLK_BIN_DIR=/opt/ublk/bin
[ -f /etc/ublk-env ] && . /etc/ublk-env
echo "xtask-guest: kernel $(uname -r), $(nproc) cpus, ublk-control: $( [ -c /dev/ublk-control ] && echo present || echo MISSING )"
cd /tmp
sh /opt/ublk/payload.sh
rc=$?
echo "xtask-guest: payload exit status $rc"
# Kernel warnings the run caused (WARN_ON is below the console's loglevel):
# reported, not judged here.
warn=$(dmesg | grep -E "WARNING:|UBSAN|BUG:|Oops|general protection|hung_task|blocked for more than" | head -40)
if [ -n "$warn" ]; then
    echo "$warn" | sed 's/^/xtask-guest: dmesg warning: /'
else
    echo "xtask-guest: dmesg: no warnings"
fi
status "UBLK_VM_EXIT=$rc"
sync
poweroff -f
# poweroff failed: panic (panic=-1 reboots, -no-reboot makes qemu exit)
exit "$rc"
