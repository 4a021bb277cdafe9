#!/usr/bin/env bash
# Build guest kernels + initramfs from Debian trixie packages (`make guest-images`).
#
# For each arch in GUEST_ARCHES (default "x86_64"; "ppc64le" is the other one supported):
#   $VFIOD_CACHE/guest/<arch>/vmlinuz (x86_64) or vmlinux (ppc64le)   the kernel
#   $VFIOD_CACHE/guest/<arch>/initrd.img     gzip'ed newc cpio: busybox-static, /init
#                                            (tools/guest-init.sh), modules GUEST_MODULES + deps;
#                                            then a second one (tools/mkprograms.py):
#                                            GUEST_PROGRAMS (/usr/bin/fio) with their libraries
#   $VFIOD_CACHE/guest/<arch>/modules        the modules in the initramfs, in load order
#   $VFIOD_CACHE/guest/<arch>/kernel-release
#   $VFIOD_CACHE/guest/<arch>/stamp          recipe hash + package versions
# A valid stamp (same scripts, same module list) makes a re-run instant and offline.
#
# Packages come from a private apt configuration per Debian architecture under
# $VFIOD_CACHE/apt/<debarch>/ (trixie, same mirror and components as the host's sources, signed by
# the host's Debian archive keyring), fetched with `apt-get download` and unpacked with dpkg-deb -x.
#
# Programs: the Debian packages in GUEST_PROGRAMS (default "fio", for the benchmarks) and the
# packages their Depends resolve to (apt-get -s on the private, empty dpkg status; Depends that
# are not libraries the program loads, such as python3 for fio's helper scripts, are left out)
# are unpacked together; mkprograms.py takes /usr/bin/<program>, its ELF interpreter and the
# shared libraries it loads (DT_NEEDED, recursively), nothing else.
#
# Environment: GUEST_ARCHES, GUEST_MODULES (default "nvme"), GUEST_PROGRAMS (default "fio"),
# VFIOD_GUEST_REFRESH=1 (re-download and rebuild), VFIOD_GUEST_SUITE (default trixie), RETRIES.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tools/common.sh
. "$here/common.sh"

GUEST_ARCHES=${GUEST_ARCHES:-x86_64}
GUEST_MODULES=${GUEST_MODULES:-nvme}
GUEST_PROGRAMS=${GUEST_PROGRAMS-fio}
#: Depends of a program package that are not libraries it loads
PROGRAM_DEPENDS_SKIP='python3|init-system-helpers'
SUITE=${VFIOD_GUEST_SUITE:-trixie}
PYTHON=${PYTHON:-python3}
FORMAT=1

command -v dpkg-deb >/dev/null || die "dpkg-deb not found (this needs a Debian host)"
command -v "$PYTHON" >/dev/null || die "$PYTHON not found"

recipe_hash() {  # ARCH
    {
        printf 'format=%s arch=%s suite=%s modules=%s programs=%s\n' "$FORMAT" "$1" "$SUITE" \
            "$GUEST_MODULES" "$GUEST_PROGRAMS"
        cat "$here/build-guest-images.sh" "$here/mkinitramfs.py" "$here/mkprograms.py" \
            "$here/guest-init.sh" \
            "$here/../vfiod/qemu/cpio.py"
    } | sha256sum | cut -d' ' -f1
}

# Private apt for one Debian architecture. Sets APT_CONFIG for the caller.
setup_apt() {  # DEBARCH
    local debarch=$1 d mirror components keyring
    d=$VFIOD_CACHE/apt/$debarch
    IFS='|' read -r mirror components < <(debian_mirror)
    keyring=$(debian_keyring)
    mkdir -p "$d/sources.list.d" "$d/preferences.d" "$d/state/lists/partial" \
        "$d/cache/archives/partial" "$d/debs"
    : >"$d/status.tmp"; [[ -f $d/status ]] || mv "$d/status.tmp" "$d/status"; rm -f "$d/status.tmp"
    # the security archive too, as on every Debian install (and as build-cross-root.sh): it
    # holds updated libraries the mirror's main pool can lack for foreign architectures
    {
        printf 'deb [signed-by=%s] %s %s %s\n' "$keyring" "$mirror" "$SUITE" "$components"
        printf 'deb [signed-by=%s] %s %s-security %s\n' "$keyring" \
            "${VFIOD_DEBIAN_SECURITY_MIRROR:-${mirror%/debian}/debian-security}" "$SUITE" \
            "$components"
    } >"$d/sources.list"
    cat >"$d/apt.conf" <<EOF
Dir::Etc::SourceList "$d/sources.list";
Dir::Etc::SourceParts "$d/sources.list.d";
Dir::Etc::Preferences "$d/preferences";
Dir::Etc::PreferencesParts "$d/preferences.d";
Dir::State "$d/state";
Dir::State::status "$d/status";
Dir::Cache "$d/cache";
APT::Architecture "$debarch";
APT::Architectures { "$debarch"; };
APT::Sandbox::User "root";
Acquire::Languages "none";
Acquire::Retries "5";
Acquire::http::Timeout "60";
EOF
    export APT_CONFIG=$d/apt.conf
    APT_DIR=$d
}

# apt-get update that fails on any index problem (e.g. a mirror caught mid-sync), for retry.
apt_update() {
    apt-get -q -o APT::Update::Error-Mode=any update
}

pkg_version() {  # PKG -> candidate version
    apt-cache show --no-all-versions "$1" 2>/dev/null | sed -n 's/^Version: //p' | head -n1
}

download() {  # PKG VERSION DEBARCH -> prints the .deb path (no retry here: see fetch_debs)
    local pkg=$1 ver=$2 debarch=$3 f
    f="$APT_DIR/debs/${pkg}_${ver//:/%3a}_${debarch}.deb"
    if [[ ! -s $f ]]; then
        log "downloading $pkg $ver ($debarch)"
        if ! (cd "$APT_DIR/debs" && apt-get -q download "$pkg=$ver" >&2); then
            # not in the mirror's pool yet: the newest older version that is (common.sh)
            f=$(older_download "$pkg" "$ver") || return 1
        fi
        [[ -s $f ]] || { log "apt-get download $pkg=$ver did not produce $f"; return 1; }
        # Keep the cache bounded: drop other versions of the same package.
        find "$APT_DIR/debs" -name "${pkg}_*.deb" ! -name "$(basename "$f")" -delete
    fi
    printf '%s\n' "$f"
}

# PKG VERSION whose .deb answers 404: download another version the indexes list, or the newest
# older version the same pool directory has (older_candidates), print its path. Only for the programs' packages, which are
# unpacked, not installed: an older point release of a library serves as well.
older_download() {
    local pkg=$1 ver=$2 uri file dir cand enc v
    # first every other version the indexes list (main and security), newest first
    for v in $(apt-cache madison "$pkg" | awk -F' [|] ' '{ print $2 }'); do
        [[ $v != "$ver" ]] || continue
        if (cd "$APT_DIR/debs" && apt-get -q download "$pkg=$v" >&2); then
            log "not in the mirror's pool: $pkg $ver; using $v"
            ls "$APT_DIR/debs/${pkg}_${v//:/%3a}"_*.deb
            return 0
        fi
    done
    # then older versions guessed from the name in the same pool directory
    uri=$(apt-get download --print-uris -qq "$pkg=$ver" | awk '{ gsub("\047", "", $1); print $1 }')
    [[ -n $uri ]] || return 1
    file=${uri##*/} dir=${uri%/*}
    for cand in $(older_candidates "$file"); do
        enc=${cand//+/%2b}
        enc="$dir/${enc//\~/%7e}"
        if http_ok "$enc"; then
            log "not in the mirror's pool: $file; using ${enc##*/}"
            curl -sf -m 300 -o "$APT_DIR/debs/$cand" "$enc" || return 1
            printf '%s\n' "$APT_DIR/debs/$cand"
            return 0
        fi
    done
    return 1
}

# The .debs of GUEST_PROGRAMS and of the library packages their Depends resolve to. Sets PDEBS
# (.deb paths) and PVERS ("pkg=version ..." of the programs themselves, for the stamp).
fetch_program_debs() {  # DEBARCH
    local debarch=$1 prog ver deps pkg pver parch f
    PDEBS=() PVERS=""
    for prog in $GUEST_PROGRAMS; do
        ver=$(pkg_version "$prog")
        [[ -n $ver ]] || { log "no candidate for $prog in $SUITE ($debarch)"; return 1; }
        PVERS+="${PVERS:+ }$prog=$ver"
        f=$(download "$prog" "$ver" "$debarch") || return 1
        PDEBS+=("$f")
        deps=$(apt-cache show --no-all-versions "$prog" | sed -n 's/^Depends: //p' | tr ',' '\n' \
            | sed 's/|.*//; s/(.*)//; s/ //g' | grep -vxE "$PROGRAM_DEPENDS_SKIP" | grep . || true)
        [[ -n $deps ]] || continue
        # Resolve against the private dpkg status, which is empty: every package they need.
        # shellcheck disable=SC2086
        # (fd 3: apt-get download inside the loop must not eat the list from stdin)
        while read -r pkg pver parch <&3; do
            # parch: arch or "all". A package no version of which the pool has is left out: the
            # install set holds packages the program never loads (openssl-provider-legacy for
            # libssl), and mkprograms says if a library it needs is missing.
            if ! f=$(download "$pkg" "$pver" "$parch" </dev/null); then
                log "leaving out $pkg $pver: no version of it in the pool"
                continue
            fi
            PDEBS+=("$f")
        done 3< <(apt-get -s -q --no-install-recommends install $deps \
                    | sed -n 's/^Inst \([^ ]*\) (\([^ ]*\) [^[]*\[\([^]]*\)\]).*/\1 \2 \3/p')
    done
}

# One attempt at index + resolution + downloads; retried as a whole, because a mirror caught
# mid-sync can serve an index whose files are not in the pool yet (seen for ppc64el).
# Sets KPKG KVER_PKG BVER KDEB BDEB.
fetch_debs() {  # KMETA DEBARCH
    local kmeta=$1 debarch=$2
    log "updating the $SUITE package index ($debarch)"
    apt_update || return 1
    KPKG=$(apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks \
        --no-replaces --no-enhances "$kmeta" | sed -n 's/^ *Depends: \(linux-image-[^ ]*\).*/\1/p' | head -n1)
    [[ -n $KPKG ]] || { log "cannot resolve $kmeta in $SUITE ($debarch)"; return 1; }
    KVER_PKG=$(pkg_version "$KPKG")
    BVER=$(pkg_version busybox-static)
    [[ -n $KVER_PKG && -n $BVER ]] || { log "no candidate for $KPKG or busybox-static"; return 1; }
    BDEB=$(download busybox-static "$BVER" "$debarch") || return 1
    KDEB=$(download "$KPKG" "$KVER_PKG" "$debarch") && return 0
    # The index can name a kernel whose .deb is not in the pool yet (seen for ppc64el: the
    # 6.12.117 index entry answered 404 while 6.12.107 was still there). Any recent kernel of
    # the same flavour serves a test guest: try the others the index lists, newest first.
    local flavour=${KPKG##*-} candidate
    for candidate in $(apt-cache search --names-only "^linux-image-[0-9].*-${flavour}\$" \
            | cut -d' ' -f1 | grep -vx "$KPKG" | sort -rV); do
        KVER_PKG=$(pkg_version "$candidate")
        [[ -n $KVER_PKG ]] || continue
        log "$KPKG is not downloadable; trying $candidate $KVER_PKG"
        if KDEB=$(download "$candidate" "$KVER_PKG" "$debarch"); then
            KPKG=$candidate
            return 0
        fi
    done
    return 1
}

build_arch() {  # ARCH
    local arch=$1 debarch kmeta kfile out recipe
    case $arch in
        x86_64|amd64) arch=x86_64 debarch=amd64 kmeta=linux-image-amd64 kfile=vmlinuz ;;
        ppc64le|ppc64el) arch=ppc64le debarch=ppc64el kmeta=linux-image-powerpc64le kfile=vmlinux ;;
        *) die "unsupported guest arch '$arch' (x86_64, ppc64le)" ;;
    esac
    out=$VFIOD_CACHE/guest/$arch
    recipe=$(recipe_hash "$arch")
    if [[ ${VFIOD_GUEST_REFRESH:-0} != 1 && -f $out/stamp && -s $out/$kfile && -s $out/initrd.img ]] \
        && grep -qx "recipe=$recipe" "$out/stamp"; then
        log "cached: $arch $(cat "$out/kernel-release") in $out"
        return
    fi
    local t0=$SECONDS
    setup_apt "$debarch"
    KPKG="" KVER_PKG="" BVER="" KDEB="" BDEB="" PDEBS=() PVERS=""
    retry fetch_debs "$kmeta" "$debarch" \
        || die "$arch: could not fetch $kmeta + busybox-static from $SUITE ($debarch) after ${RETRIES:-5} attempts (mirror mid-sync? try again later)"
    local kpkg=$KPKG kver_pkg=$KVER_PKG bver=$BVER kdeb=$KDEB bdeb=$BDEB
    # Programs only serve the benchmarks: an image without them beats no image. (A mirror can
    # list point-release versions its pool does not hold yet; seen for ppc64el libc6.)
    if [[ -n $GUEST_PROGRAMS ]] && ! RETRIES=2 retry fetch_program_debs "$debarch"; then
        log "WARNING: $arch: $GUEST_PROGRAMS or a library it needs is not downloadable from" \
            "$SUITE ($debarch); building the image without it (the benchmarks say so)." \
            "VFIOD_GUEST_REFRESH=1 tries again."
        PDEBS=() PVERS=""
    fi
    local pvers=$PVERS
    local -a pdebs=("${PDEBS[@]}")

    local tmp=$out.tmp
    rm -rf "$tmp"
    mkdir -p "$tmp/kernel" "$tmp/busybox" "$tmp/programs" "$tmp/out"
    log "$arch: unpacking $kpkg $kver_pkg, busybox-static $bver${pvers:+, $pvers (${#pdebs[@]} packages)}"
    dpkg-deb -x "$kdeb" "$tmp/kernel"
    dpkg-deb -x "$bdeb" "$tmp/busybox"
    local deb binaries=""
    for deb in "${pdebs[@]}"; do
        dpkg-deb -x "$deb" "$tmp/programs"
    done
    for prog in $pvers; do
        binaries+="${binaries:+ }usr/bin/${prog%%=*}"
    done

    local kimg kver busybox
    kimg=$(find "$tmp/kernel/boot" -maxdepth 1 -name "$kfile-*" -type f | head -n1)
    [[ -n $kimg ]] || die "$kpkg has no /boot/$kfile-*"
    kver=${kimg##*/"$kfile"-}
    busybox=$(find "$tmp/busybox" -path '*bin/busybox' -type f | head -n1)
    [[ -n $busybox ]] || die "busybox-static has no bin/busybox"

    cp "$kimg" "$tmp/out/$kfile"
    printf '%s\n' "$kver" >"$tmp/out/kernel-release"
    "$PYTHON" "$here/mkinitramfs.py" --kernel-root "$tmp/kernel" --kver "$kver" \
        --busybox "$busybox" --init "$here/guest-init.sh" --modules "$GUEST_MODULES" \
        --out "$tmp/out/initrd.img" --modules-list "$tmp/out/modules"
    if [[ -n $binaries ]] && ! "$PYTHON" "$here/mkprograms.py" --package-root "$tmp/programs" \
            --binaries "$binaries" --out "$tmp/programs.cpio.gz"; then
        log "WARNING: $arch: $binaries cannot be packed (a library left out above?); building" \
            "the image without programs (the benchmarks say so)"
        binaries="" pvers=""
    fi
    if [[ -n $binaries ]]; then  # a second archive; the kernel unpacks them in turn
        local size
        size=$(stat -c %s "$tmp/out/initrd.img")  # archives start on a 4-byte boundary
        head -c $(( (4 - size % 4) % 4 )) /dev/zero >>"$tmp/out/initrd.img"
        cat "$tmp/programs.cpio.gz" >>"$tmp/out/initrd.img"
    fi
    cat >"$tmp/out/stamp" <<EOF
recipe=$recipe
arch=$arch
kernel=$kpkg $kver_pkg
busybox=busybox-static $bver
modules=$GUEST_MODULES
programs=$pvers
EOF
    rm -rf "$out"
    mv "$tmp/out" "$out"
    rm -rf "$tmp"
    log "$arch: kernel $kver + initrd ready in $out ($((SECONDS - t0)) s)"
}

for a in $GUEST_ARCHES; do
    build_arch "$a"
done
