#!/usr/bin/env bash
# Build a small Debian trixie x86_64 guest whose init is systemd (`make systemd-image`), for the
# tests that check systemd/vfiod.service under a real service manager (tests/systemd/). The
# project's machines do not run systemd as PID 1, so these tests boot this image under QEMU.
#
# Output in $VFIOD_CACHE/systemd-image/ (default ~/.cache/vfiod/systemd-image):
#   root/        the trixie root built by mmdebstrap (kept: tests/systemd/test_unit.py runs the
#                root's own systemd-analyze on the unit, so the host needs no systemd package)
#   disk.img     raw ext4 image of root/ (mke2fs -d), booted as /dev/vda; tests attach it with
#                snapshot=on so it is never modified
#   vmlinuz, initrd.img, kernel-release   the root's Debian kernel and a busybox initramfs
#                (tools/mkinitramfs.py: virtio-blk + ext4, mount /dev/vda, switch_root to
#                systemd), for QEMU's -kernel/-initrd
#   stamp        recipe hash and package versions; a valid stamp makes a re-run instant
#
# What is in the root: systemd + systemd-sysv (init; no udev and no dbus: nothing here needs them
# and they cost most of the boot under TCG), linux-image-amd64, busybox-static (initramfs),
# procps (/bin/kill for ExecReload), python3 with vfiod's dependencies from Debian
# (python3-trio, -construct, -cffi(-backend), -sortedcontainers: no PyPI access in the guest),
# an empty venv /opt/vfiod (--system-site-packages) with the vfiod/vfiodctl entry points, and
# vfiod-ci.service: at boot it unpacks the tar archive on /dev/vdb (if any) to /run/vfiod-ci,
# runs its run.sh with output on ttyS0 (`@@VFIOD key=value` markers, `exit=N` last) and powers
# off. vfiod itself is NOT in the image: the tests copy the tree under test in at run time, so
# the image does not go stale when the code changes.
#
# Environment: VFIOD_CACHE, VFIOD_SYSTEMD_IMAGE_REFRESH=1 (rebuild), VFIOD_DEBIAN_MIRROR /
# VFIOD_DEBIAN_COMPONENTS (see tools/common.sh), RETRIES (network retries, default 5).
# SC2016: the single-quoted mmdebstrap hooks expand "$1" (the root) in mmdebstrap's shell.
# shellcheck disable=SC2016
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tools/common.sh
. "$here/common.sh"

FORMAT=1
SUITE=trixie
OUT=$VFIOD_CACHE/systemd-image
PKGS=(
    systemd systemd-sysv procps kmod
    linux-image-amd64 busybox-static
    python3 python3-venv
    python3-trio python3-construct python3-cffi python3-cffi-backend python3-sortedcontainers
)
# Big module trees a test VM never loads (keeps the root and disk image small).
MODULE_EXCLUDES=(drivers/gpu drivers/media drivers/net/wireless drivers/net/ethernet
    drivers/infiniband drivers/staging drivers/iio drivers/bluetooth sound net/wireless
    net/bluetooth net/mac80211 drivers/isdn drivers/input/touchscreen drivers/scsi/qla2xxx)

# mmdebstrap --mode=root and mke2fs -d of a root-owned tree need root (CI runs as root).
if [[ $EUID -ne 0 ]]; then
    log "not root: re-running through sudo"
    exec sudo env VFIOD_CACHE="$VFIOD_CACHE" RETRIES="${RETRIES:-5}" "$0" "$@"
fi
for tool in mmdebstrap mke2fs; do
    if ! command -v "$tool" >/dev/null; then
        log "installing $tool"
        retry apt-get "${APT_NET_OPTS[@]}" update -q
        retry env DEBIAN_FRONTEND=noninteractive apt-get "${APT_NET_OPTS[@]}" install -y -q \
            --no-install-recommends mmdebstrap e2fsprogs debian-archive-keyring
    fi
done

recipe_hash() {
    { printf 'format=%s suite=%s pkgs=%s excl=%s\n' "$FORMAT" "$SUITE" "${PKGS[*]}" \
        "${MODULE_EXCLUDES[*]}"
        cat "$here/build-systemd-image.sh" "$here/mkinitramfs.py" "$here/../vfiod/qemu/cpio.py"; } | sha256sum | cut -d' ' -f1
}
recipe=$(recipe_hash)

if [[ ${VFIOD_SYSTEMD_IMAGE_REFRESH:-0} != 1 && -f $OUT/stamp && -s $OUT/disk.img \
        && -s $OUT/vmlinuz && -s $OUT/initrd.img && -x $OUT/root/usr/bin/systemd-analyze ]] \
        && grep -qx "recipe=$recipe" "$OUT/stamp"; then
    log "cached: $(sed -n 's/^systemd=//p' "$OUT/stamp"), kernel $(cat "$OUT/kernel-release") in $OUT"
    exit 0
fi

IFS='|' read -r mirror components < <(debian_mirror)
keyring=$(debian_keyring)
t0=$SECONDS
tmp=$OUT.tmp
mkdir -p "$VFIOD_CACHE"
rm -rf "$tmp"
mkdir -p "$tmp"
log "building a $SUITE root with systemd as init ($mirror $components)"

# Files the hooks put into the root. Written here so the whole recipe is this one script.
hooks=$tmp/hooks
mkdir -p "$hooks"
# The initramfs (built below with tools/mkinitramfs.py from the root's own modules and
# busybox-static): load virtio-blk + ext4, mount /dev/vda, switch_root to systemd. A second or
# two under TCG, where initramfs-tools with udev took about 30 s.
INITRD_MODULES="virtio_pci virtio_blk crc32c_generic ext4"
cat >"$hooks/init" <<'EOF'
#!/bin/busybox sh
# /init of the vfiod systemd test image (tools/build-systemd-image.sh).
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
kver=$(uname -r)
while read -r mod; do
    [ -n "$mod" ] && insmod "/lib/modules/$kver/$mod.ko"
done </etc/vfiod-modules
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
mkdir -p /newroot
if ! mount -t ext4 -o rw /dev/vda /newroot; then
    echo "vfiod initramfs: cannot mount /dev/vda"
    poweroff -f
fi
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /sbin/init
EOF
cat >"$hooks/vfiod" <<'EOF'
#!/opt/vfiod/bin/python3
# vfiod entry point (what `pip install` would generate); the package is installed in this venv.
import sys

from vfiod.__main__ import main

sys.exit(main())
EOF
cat >"$hooks/vfiodctl" <<'EOF'
#!/opt/vfiod/bin/python3
# vfiodctl entry point (what `pip install` would generate); the package is installed in this venv.
import sys

from vfiod.control.cli import main

sys.exit(main())
EOF
cat >"$hooks/vfiod-ci-run" <<'EOF'
#!/bin/sh
# vfiod test image: run the payload on /dev/vdb (a tar archive with run.sh, written by
# tests/systemd) once the boot has finished, print its exit status as a marker, power off.
exec >/dev/ttyS0 2>&1
if [ ! -b /dev/vdb ]; then
    echo "@@VFIOD ci=no-payload"
    exit 0
fi
# Wait until the boot is complete (this unit is Type=simple so it does not hold the boot up).
systemctl is-system-running --wait >/dev/null 2>&1
echo "@@VFIOD boot=$(systemctl is-system-running 2>/dev/null) uptime=$(cut -d' ' -f1 /proc/uptime)"
mkdir -p /run/vfiod-ci
if tar -xf /dev/vdb -C /run/vfiod-ci; then
    echo "@@VFIOD script=start"
    (cd /run/vfiod-ci && sh ./run.sh)
    rc=$?
else
    rc=125
fi
echo "@@VFIOD exit=$rc"
sync
# Straight to poweroff: the test is over, a full shutdown costs tens of seconds under TCG.
systemctl poweroff --force --force
EOF
cat >"$hooks/vfiod-ci.service" <<'EOF'
[Unit]
Description=vfiod CI payload runner (/dev/vdb, tests/systemd)
After=basic.target

[Service]
Type=simple
ExecStart=/usr/local/sbin/vfiod-ci-run
StandardOutput=null
StandardError=null

[Install]
WantedBy=multi-user.target
EOF

build_root() {
    rm -rf "$tmp/root"
    local excludes=(--dpkgopt='path-exclude=/usr/share/man/*'
        --dpkgopt='path-exclude=/usr/share/doc/*'
        --dpkgopt='path-exclude=/usr/share/locale/*'
        --dpkgopt='path-include=/usr/share/locale/locale.alias') d
    for d in "${MODULE_EXCLUDES[@]}"; do
        excludes+=(--dpkgopt="path-exclude=/usr/lib/modules/*/kernel/$d/*")
    done
    # customize-hook: the venv, entry points and CI runner; a fixed machine-id and the
    # .updated stamps so every boot of the (snapshot) disk is a plain boot, not a first boot
    # (no preset-all, ldconfig, catalog or hwdb updates); units a test VM does not need masked.
    mmdebstrap --variant=apt --mode=root \
        --include="$(IFS=,; echo "${PKGS[*]}")" \
        --aptopt='APT::Install-Recommends "false"' \
        --aptopt='Acquire::Retries "5"' \
        "${excludes[@]}" \
        --customize-hook='echo vfiod-ci >"$1/etc/hostname"' \
        --customize-hook='printf "127.0.1.1 vfiod-ci\n" >>"$1/etc/hosts"' \
        --customize-hook=': >"$1/etc/fstab"' \
        --customize-hook='chroot "$1" python3 -m venv --system-site-packages --without-pip /opt/vfiod' \
        --customize-hook="install -m 0755 '$hooks/vfiod' '$hooks/vfiodctl' \"\$1/opt/vfiod/bin/\"" \
        --customize-hook="install -D -m 0755 '$hooks/vfiod-ci-run' \"\$1/usr/local/sbin/vfiod-ci-run\"" \
        --customize-hook="install -D -m 0644 '$hooks/vfiod-ci.service' \"\$1/etc/systemd/system/vfiod-ci.service\"" \
        --customize-hook='mkdir -p "$1/etc/systemd/system/multi-user.target.wants" && ln -sf /etc/systemd/system/vfiod-ci.service "$1/etc/systemd/system/multi-user.target.wants/vfiod-ci.service"' \
        --customize-hook='for u in serial-getty@ttyS0.service getty@tty1.service apt-daily.timer apt-daily-upgrade.timer systemd-timesyncd.service e2scrub_all.timer fstrim.timer dpkg-db-backup.timer systemd-logind.service dev-hugepages.mount dev-mqueue.mount sys-kernel-debug.mount sys-kernel-tracing.mount sys-kernel-config.mount sys-fs-fuse-connections.mount kmod-static-nodes.service systemd-firstboot.service ldconfig.service systemd-journal-catalog-update.service systemd-hwdb-update.service; do ln -sf /dev/null "$1/etc/systemd/system/$u"; done' \
        --customize-hook='echo 5f0e7d1c9a2b4c3d8e6f7a8b9c0d1e2f >"$1/etc/machine-id"' \
        --customize-hook='touch "$1/etc/.updated" "$1/var/.updated"' \
        "$SUITE" "$tmp/root" \
        "deb [signed-by=$keyring] $mirror $SUITE $components"
}
retry build_root || die "mmdebstrap failed ${RETRIES:-5} times (mirror $mirror unreachable or mid-sync?)"
root=$tmp/root
[[ -x $root/usr/bin/systemd-analyze && -x $root/opt/vfiod/bin/python3 ]] \
    || die "the root misses systemd-analyze or the /opt/vfiod venv"
t_root=$((SECONDS - t0))

kimg=$(find "$root/boot" -maxdepth 1 -name 'vmlinuz-*' -type f | sort -V | tail -n1)
[[ -n $kimg ]] || die "no kernel in $root/boot"
kver=${kimg##*/vmlinuz-}
cp "$kimg" "$tmp/vmlinuz"
python3 "$here/mkinitramfs.py" --kernel-root "$root" --kver "$kver" \
    --busybox "$root/usr/bin/busybox" --init "$hooks/init" --modules "$INITRD_MODULES" \
    --out "$tmp/initrd.img" --modules-list "$tmp/initrd-modules"
printf '%s\n' "$kver" >"$tmp/kernel-release"

# ext4 image of the root: its used size plus headroom for the tests' writes (the tests boot it
# with snapshot=on, so writes go to a temporary overlay anyway).
used_mb=$(du -sxm "$root" | cut -f1)
size_mb=$(( used_mb + used_mb / 4 + 256 ))
log "making a ${size_mb} MiB ext4 image of the root (${used_mb} MiB used)"
rm -f "$tmp/disk.img"
mke2fs -q -F -t ext4 -L vfiod-ci -d "$root" -E root_owner=0:0 "$tmp/disk.img" "${size_mb}M"

ver() { chroot "$root" dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }
cat >"$tmp/stamp" <<EOF
recipe=$recipe
suite=$SUITE
kernel=$kver
systemd=systemd $(ver systemd)
python3=python3 $(ver python3)
python3-trio=$(ver python3-trio)
python3-construct=$(ver python3-construct)
python3-cffi=$(ver python3-cffi)
python3-sortedcontainers=$(ver python3-sortedcontainers)
build_seconds=$((SECONDS - t0))
EOF
rm -rf "$hooks"
rm -rf "$OUT"
mv "$tmp" "$OUT"
log "ready in $((SECONDS - t0)) s (root $t_root s): $OUT ($(du -sh "$OUT/disk.img" | cut -f1) disk, kernel $kver)"
