#!/bin/sh
# /init of the qmpnet lab host (busybox sh, PID 1): a full Debian kernel whose userland is the host's own.
#
# It loads the few modules the initramfs carries (virtio, 9p, overlay, virtio-net: the list in /etc/lab/modules,
# written by labimage.py in insmod order), mounts the host's root file system (9p tag "host", read-only) under a
# tmpfs overlay at /newroot, so programs may write where they like without touching the host, and mounts the
# writable shares (9p, read-write) over it at their host paths. The Debian kernel's modules (all of them, in the
# lab image in the cache) appear at /usr/lib/modules/<release>, and the kernel's module loader runs the host's
# modprobe in that root. Then the lab agent (labagent.py, run by the host's python3) serves commands on
# 10.0.2.15:7000, which QEMU forwards from a loopback port of the host.
#
# The host writes the boot configuration (a shell fragment of LAB_* variables) into the cache and names it on the
# kernel command line (lab.conf=PATH). Everything this script says goes to the console with a "lab:" prefix, so a
# boot that fails can be diagnosed from the console's tail.
export PATH=/bin

say() { echo "lab: $*" >/dev/console; }
fail() {
    say "FAILED: $*"
    /bin/busybox poweroff -f
}

/bin/busybox mkdir -p /proc /sys /dev /lower /upper /newroot
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r module parameters; do
    # shellcheck disable=SC2086 # parameters are separate insmod arguments
    insmod "/lib/modules/$module.ko" $parameters || fail "insmod $module"
done </etc/lab/modules

conf=$(sed -n 's/.*lab\.conf=\([^ ]*\).*/\1/p' /proc/cmdline)
[ -n "$conf" ] || fail "no lab.conf= on the kernel command line"
options=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o "$options,ro" host /lower || fail "cannot mount the host's root over 9p"
mount -t tmpfs -o mode=755 tmpfs /upper
mkdir -p /upper/data /upper/work
mount -t overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work overlay /newroot \
    || fail "cannot mount the overlay over the host's root"
[ -f "/lower$conf" ] || fail "no boot configuration at $conf"
# shellcheck disable=SC1090 # written by lab.py: LAB_RELEASE LAB_MODULES LAB_PYTHON LAB_AGENT LAB_STATE LAB_SHARES
. "/lower$conf"

mkdir -p "/newroot/usr/lib/modules/$LAB_RELEASE"
mount -o bind "/lower$LAB_MODULES" "/newroot/usr/lib/modules/$LAB_RELEASE" || fail "cannot bind the modules"
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
mount -t tmpfs tmpfs /newroot/run
mount -t tmpfs -o mode=1777 tmpfs /newroot/tmp
for share in $LAB_SHARES; do
    tag=${share%%=*}
    path=${share#*=}
    mkdir -p "/newroot$path"
    mount -t 9p -o "$options" "$tag" "/newroot$path" || fail "cannot mount the share $tag at $path"
done

# The kernel's module requests (a qdisc, a bridge, a tun device) run modprobe in the lab's root.
printf '#!/bin/sh\nexec /bin/chroot /newroot /sbin/modprobe "$@"\n' >/bin/lab-modprobe
chmod 755 /bin/lab-modprobe
echo /bin/lab-modprobe >/proc/sys/kernel/modprobe
# Drivers for the PCI functions (no udev here), and what the lab is for.
# shellcheck disable=SC2046 # one modalias per argument
chroot /newroot /sbin/modprobe -a -q $(cat /sys/bus/pci/devices/*/modalias)
chroot /newroot /sbin/modprobe -a vfio-pci tun vhost_net || fail "cannot load vfio-pci, tun and vhost_net"
# KVM on the lab's own (emulated) virtualisation extensions: the guests booted inside then run at about the lab's
# speed, where nested TCG took 95-430 s to boot a busybox guest (20 s with KVM). The test guests choose KVM only
# when this module is loaded (machine.detect_accel), and QMPNET_ACCEL=tcg still forces TCG.
if grep -qw svm /proc/cpuinfo; then
    chroot /newroot /sbin/modprobe kvm_amd || fail "the lab's CPU has SVM but kvm_amd does not load"
elif grep -qw vmx /proc/cpuinfo; then
    chroot /newroot /sbin/modprobe kvm_intel || fail "the lab's CPU has VMX but kvm_intel does not load"
fi

ip link set lo up
for dev in /sys/class/net/*; do
    case "$(readlink "$dev/device/driver")" in
        */virtio_net) control=${dev##*/} ;;
    esac
done
[ -n "$control" ] || fail "no virtio-net interface for the agent"
ip link set "$control" up
ip addr add 10.0.2.15/24 dev "$control"
read -r uptime _ </proc/uptime
say "userland ready after ${uptime} s; starting the agent"
chroot /newroot /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    "$LAB_PYTHON" -I "$LAB_AGENT" --listen 10.0.2.15:7000 --state "$LAB_STATE" >/dev/console 2>&1
fail "the agent exited"
