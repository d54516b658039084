#!/bin/sh
# /init of the Debian test guest's initramfs (busybox sh, PID 1 until systemd takes over).
#
# The Debian kernel has the disk and file-system drivers as modules, so this initramfs loads them (the list in
# /etc/testguest/modules, written by debian.py in insmod order), mounts the root file system from /dev/vda
# (QEMU opens it with snapshot=on: the cached image is never written) and hands PID 1 to systemd.
export PATH=/bin

fail() {
    echo "testguest-debian: $*" >/dev/console
    /bin/busybox poweroff -f
}

/bin/busybox mount -t devtmpfs devtmpfs /dev
while read -r module parameters; do
    # shellcheck disable=SC2086 # parameters are separate insmod arguments
    /bin/busybox insmod "/lib/modules/$module.ko" $parameters || echo "testguest-debian: insmod $module failed" >/dev/console
done </etc/testguest/modules
# The driver usually creates /dev/vda during insmod; give it up to 5 s anyway.
tries=0
while [ ! -b /dev/vda ]; do
    tries=$((tries + 1))
    [ "$tries" -gt 500 ] && fail "no /dev/vda"
    /bin/busybox usleep 10000
done
/bin/busybox mkdir -p /newroot
/bin/busybox mount -t ext4 -o rw,noatime /dev/vda /newroot || fail "cannot mount /dev/vda"
/bin/busybox umount /dev
exec /bin/busybox switch_root /newroot /sbin/init
