#!/usr/bin/env bash
# Build a Debian trixie root of a foreign architecture for `make test-cross ARCH=...`
# (tools/test-cross.sh runs vfiod's non-QEMU tests in it under qemu-user).
#
#   tools/build-cross-root.sh ppc64el     # little-endian POWER, the host vfiod is for
#   tools/build-cross-root.sh s390x       # big-endian: every byte order is exercised
#
# Output: $VFIOD_CACHE/cross/<arch>/root (mmdebstrap --architectures=<arch>) with python3, gcc
# and the Python headers (the cffi module is compiled in there, for that architecture) and vfiod's
# dependencies and test tools from Debian: python3-trio, -construct, -cffi, -sortedcontainers,
# -pytest, -pytest-trio, -hypothesis. $VFIOD_CACHE/cross/<arch>/stamp holds the recipe hash and
# the package versions; a valid stamp makes a re-run take well under a second.
#
# The host needs Debian's qemu-user-static (installed here if missing) and binfmt_misc: the
# interpreter is registered with the F (fix-binary) flag from the package's own
# /usr/lib/binfmt.d/qemu-<arch>.conf, so foreign executables run inside a chroot without a copy
# of QEMU in it. (No systemd-binfmt on these machines: the registration is written here.)
#
# Environment: VFIOD_CACHE, VFIOD_CROSS_REFRESH=1 (rebuild), VFIOD_DEBIAN_MIRROR /
# VFIOD_DEBIAN_COMPONENTS (tools/common.sh), RETRIES (network retries, default 5).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tools/common.sh
. "$here/common.sh"

FORMAT=1
SUITE=trixie
ARCH=${1:-${ARCH:-}}
case $ARCH in
    ppc64el) QARCH=ppc64le ;;
    s390x) QARCH=s390x ;;
    *) die "usage: $0 ppc64el|s390x (got '${ARCH}')" ;;
esac
OUT=$VFIOD_CACHE/cross/$ARCH
PKGS=(
    python3 python3-dev gcc libc6-dev python3-setuptools
    python3-cffi python3-trio python3-construct python3-sortedcontainers
    python3-pytest python3-pytest-trio python3-hypothesis
)

if [[ $EUID -ne 0 ]]; then
    log "not root: re-running through sudo"
    exec sudo env VFIOD_CACHE="$VFIOD_CACHE" RETRIES="${RETRIES:-5}" "$0" "$ARCH"
fi

# ---- qemu-user and binfmt_misc (also needed when the root is cached) -------------------------
binfmt_conf=/usr/lib/binfmt.d/qemu-$QARCH.conf
if [[ ! -r $binfmt_conf ]] || ! command -v mmdebstrap >/dev/null || ! command -v arch-test >/dev/null; then
    log "installing qemu-user-static, mmdebstrap, arch-test"
    retry apt-get "${APT_NET_OPTS[@]}" update -q
    retry env DEBIAN_FRONTEND=noninteractive apt-get "${APT_NET_OPTS[@]}" install -y -q \
        --no-install-recommends qemu-user-static mmdebstrap arch-test debian-archive-keyring
fi
[[ -r $binfmt_conf ]] || die "qemu-user-static installed no $binfmt_conf"
binfmt=/proc/sys/fs/binfmt_misc
if [[ ! -w $binfmt/register ]]; then
    mount -t binfmt_misc binfmt_misc "$binfmt" \
        || die "cannot mount binfmt_misc on $binfmt (a container without the privilege?)"
fi
if [[ ! -e $binfmt/qemu-$QARCH ]]; then
    log "registering $(cut -d: -f8 "$binfmt_conf") for $QARCH executables (binfmt_misc, flags OPF)"
    grep -v '^#' "$binfmt_conf" | grep . >"$binfmt/register"
fi
grep -q '^enabled' "$binfmt/qemu-$QARCH" || die "binfmt_misc entry qemu-$QARCH is not enabled"

# ---- the root ---------------------------------------------------------------------------------
recipe=$({ printf 'format=%s suite=%s arch=%s pkgs=%s\n' "$FORMAT" "$SUITE" "$ARCH" "${PKGS[*]}"
           cat "$here/build-cross-root.sh"; } | sha256sum | cut -d' ' -f1)
if [[ ${VFIOD_CROSS_REFRESH:-0} != 1 && -f $OUT/stamp && -x $OUT/root/usr/bin/python3 ]] \
        && grep -qx "recipe=$recipe" "$OUT/stamp"; then
    log "cached: $ARCH $(sed -n 's/^python3=//p' "$OUT/stamp") in $OUT/root"
    exit 0
fi

IFS='|' read -r mirror components < <(debian_mirror)
keyring=$(debian_keyring)
t0=$SECONDS
tmp=$OUT.tmp
rm -rf "$tmp"
mkdir -p "$tmp"
log "building a $SUITE $ARCH root ($mirror $components): ${PKGS[*]}"
# The mirror these machines reach can lag for foreign architectures: the index names the newest
# point-release update of a few packages (libc6 2.41-12+deb13u5, ...) whose .deb for ppc64el or
# s390x is not in the pool yet (HTTP 404), while the previous update is. Such packages are found
# before mmdebstrap runs: the root's install set is resolved with apt against the same index,
# every .deb is checked, and for each missing one the newest older version the pool has (the
# previous +deb13uN/~deb13uN, the release version, an earlier upstream micro release) goes into
# a local repository that mmdebstrap gets as a second source, pinned above the mirror. With an
# up-to-date mirror nothing is missing and the root is plain Debian.
apt_dir=$tmp/apt
fallback=$tmp/fallback
aptc() { APT_CONFIG=$apt_dir/apt.conf "$@"; }
mkdir -p "$apt_dir/state/lists/partial" "$apt_dir/cache/archives/partial" "$fallback"
: >"$apt_dir/status"
cat >"$apt_dir/apt.conf" <<EOF
Dir::State "$apt_dir/state";
Dir::State::status "$apt_dir/status";
Dir::Cache "$apt_dir/cache";
Dir::Etc::SourceList "$apt_dir/sources.list";
Dir::Etc::SourceParts "/dev/null";
Dir::Etc::Preferences "/dev/null";
Dir::Etc::PreferencesParts "/dev/null";
APT::Architecture "$ARCH";
APT::Architectures { "$ARCH"; };
APT::Install-Recommends "false";
Acquire::Retries "5";
EOF
# The security archive too: it is part of every Debian install, and it holds the versions of
# some updated packages that the mirror's main pool lacks for foreign architectures.
security=${VFIOD_DEBIAN_SECURITY_MIRROR:-${mirror%/debian}/debian-security}
sources=("deb [signed-by=$keyring] $mirror $SUITE $components"
         "deb [signed-by=$keyring] $security $SUITE-security $components")
printf '%s\n' "${sources[@]}" >"$apt_dir/sources.list"
retry aptc apt-get update -qq || die "apt-get update ($ARCH) failed"
essential=$(aptc apt-cache dumpavail | awk '/^Package:/ { p = $2 } /^Essential: yes/ { print p }' | sort -u)
# shellcheck disable=SC2086  # word lists
install_set=$(aptc apt-get install -s -qq apt $essential "${PKGS[@]}" | awk '/^Inst/ { print $2 }')
# shellcheck disable=SC2086
aptc apt-get download --print-uris -qq $install_set \
    | awk '{ gsub("\047", "", $1); print $1 }' >"$apt_dir/uris"
missing=()
while read -r uri; do
    http_ok "$uri" && continue
    file=${uri##*/} dir=${uri%/*} found=""
    # First every other version the indexes list (main and security), newest first; then older
    # versions guessed from the name in the same pool directory.
    name=${file%%_*} cands=()
    for ver in $(aptc apt-cache madison "$name" | awk -F' [|] ' '{ print $2 }'); do
        cands+=("$(aptc apt-get download --print-uris -qq "$name=$ver" | awk '{ gsub("\047", "", $1); print $1 }')")
    done
    for cand in $(older_candidates "$file"); do
        enc=${cand//+/%2b}
        cands+=("$dir/${enc//\~/%7e}")
    done
    for cand in "${cands[@]}"; do
        if [[ -n $cand && $cand != "$uri" ]] && http_ok "$cand"; then found=$cand; break; fi
    done
    if [[ -z $found ]]; then missing+=("$file"); continue; fi
    log "not in the mirror's pool: $file; using ${found##*/}"
    retry curl -sf -m 300 -o "$fallback/${found##*/}" "$found" || die "cannot download $found"
done <"$apt_dir/uris"
(( ${#missing[@]} == 0 )) || die "the mirror's pool has no version of: ${missing[*]}"
extra_sources=() extra_hooks=()
if compgen -G "$fallback/*.deb" >/dev/null; then
    if ! command -v dpkg-scanpackages >/dev/null; then
        retry env DEBIAN_FRONTEND=noninteractive apt-get "${APT_NET_OPTS[@]}" install -y -q \
            --no-install-recommends dpkg-dev
    fi
    (cd "$fallback" && dpkg-scanpackages -m . /dev/null >Packages 2>/dev/null)
    printf 'Package: *\nPin: origin ""\nPin-Priority: 1001\n' >"$tmp/fallback.pref"
    extra_sources=("deb [trusted=yes] copy://$fallback ./")
    extra_hooks=(--setup-hook="install -D -m 0644 '$tmp/fallback.pref' \"\$1/etc/apt/preferences.d/vfiod-fallback.pref\"")
fi
fallback_list=$(cd "$fallback" && ls -- *.deb 2>/dev/null | tr '\n' ' ' || true)

build_root() {
    rm -rf "$tmp/root"
    mmdebstrap --variant=apt --mode=root --architectures="$ARCH" \
        --include="$(IFS=,; echo "${PKGS[*]}")" \
        --aptopt='APT::Install-Recommends "false"' \
        --aptopt='Acquire::Retries "5"' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        "${extra_hooks[@]}" \
        "$SUITE" "$tmp/root" \
        "${sources[@]}" "${extra_sources[@]}"
}
retry build_root || die "mmdebstrap failed ${RETRIES:-5} times (mirror $mirror unreachable?)"
root=$tmp/root
machine=$(chroot "$root" uname -m)
log "the root runs: uname -m = $machine"
ver() { chroot "$root" dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }
cat >"$tmp/stamp" <<EOF
recipe=$recipe
suite=$SUITE
arch=$ARCH
machine=$machine
python3=$(chroot "$root" python3 -c 'import sys; print(sys.version.split()[0])')
python3-trio=$(ver python3-trio)
python3-construct=$(ver python3-construct)
python3-cffi=$(ver python3-cffi)
python3-pytest=$(ver python3-pytest)
python3-hypothesis=$(ver python3-hypothesis)
qemu-user=$(dpkg-query -W -f='${Version}' qemu-user-static 2>/dev/null || true)
fallback=$fallback_list
build_seconds=$((SECONDS - t0))
EOF
rm -rf "$OUT/root" "$OUT/stamp"
mkdir -p "$OUT"
mv "$tmp/root" "$OUT/root"
mv "$tmp/stamp" "$OUT/stamp"
rm -rf "$tmp"
log "ready in $((SECONDS - t0)) s: $OUT/root ($(du -sh "$OUT/root" | cut -f1))"
