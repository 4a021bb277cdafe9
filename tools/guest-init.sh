#!/bin/busybox sh
# shellcheck shell=dash
# /init of the vfiod guest initramfs (built by tools/build-guest-images.sh).
#
# Mounts proc/sys/devtmpfs, installs busybox applets, loads the modules listed in
# /etc/vfiod-modules (in order, from /lib/modules/$(uname -r)), runs /guest.sh if present (the test
# harness appends it as a second cpio archive), then powers off. Lines starting with "@@VFIOD " are
# markers the host parses: kernel=, modules=, script=, exit=.
# Kernel command line: vfiod.loglevel=N sets the console log level while /guest.sh runs (default 5:
# warnings and errors still reach the console; the full log is always available through dmesg).
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /bin /sbin /usr/bin /usr/sbin
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
# One exec for all applet symlinks (a loop of ln costs seconds under TCG).
/bin/busybox --install -s /bin 2>/dev/null
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mkdir -p /root /dev/pts /dev/shm
mount -t tmpfs tmpfs /tmp

kver=$(uname -r)
echo "@@VFIOD kernel=$kver arch=$(uname -m)"
loaded=""
if [ -r /etc/vfiod-modules ]; then
    while read -r mod; do
        [ -n "$mod" ] || continue
        if insmod "/lib/modules/$kver/$mod.ko"; then
            loaded="$loaded${loaded:+,}$mod"
        else
            echo "@@VFIOD module-failed=$mod"
        fi
    done </etc/vfiod-modules
fi
echo "@@VFIOD modules=$loaded"

loglevel=5
read -r cmdline </proc/cmdline
for arg in $cmdline; do
    case $arg in vfiod.loglevel=*) loglevel=${arg#vfiod.loglevel=} ;; esac
done
dmesg -n "$loglevel"

if [ -f /guest.sh ]; then
    echo "@@VFIOD script=start"
    sh /guest.sh
    rc=$?
    echo "@@VFIOD exit=$rc"
else
    echo "@@VFIOD script=none"
fi
sync
poweroff -f
echo o >/proc/sysrq-trigger
sleep 10
