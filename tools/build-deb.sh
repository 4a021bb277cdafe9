#!/usr/bin/env bash
# Build the Debian package of vfiod (`make deb`): debian/ (debhelper 13, dh-python/pybuild with
# the pyproject plugin) built with dpkg-buildpackage inside a Debian trixie root.
#
# Output: build/deb/vfiod_<version>_<arch>.deb (and the .buildinfo/.changes) in this tree.
#
# Why a trixie root on every host: the package depends on Debian's python3-trio (>= 0.25),
# python3-cffi (>= 1.16) and python3-construct (>= 2.10.68), which trixie (Debian 13) has and
# bookworm (Debian 12: trio 0.22, cffi 1.15) does not, so the package is for Debian 13 hosts and is
# built against trixie wherever `make deb` runs (Debian 12 or 13). The build root is cached in
# $VFIOD_CACHE/deb-root (mmdebstrap, stamped recipe: a re-run only rebuilds the package, a few
# seconds plus the C compile). The tree (tracked and untracked files, no .venv or build output)
# is copied to a scratch directory bind-mounted in the root; the root itself is never written to.
#
# Environment: VFIOD_CACHE, VFIOD_DEB_REFRESH=1 (rebuild the root), VFIOD_DEB_OUT (output
# directory), VFIOD_DEBIAN_MIRROR / VFIOD_DEBIAN_COMPONENTS, RETRIES.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source=tools/common.sh
. "$here/common.sh"

FORMAT=1
SUITE=trixie
ROOT=$VFIOD_CACHE/deb-root
OUT=${VFIOD_DEB_OUT:-$repo/build/deb}
PKGS=(build-essential debhelper dh-python pybuild-plugin-pyproject python3-all-dev
      python3-setuptools python3-wheel python3-cffi)

if [[ $EUID -ne 0 ]]; then
    exec sudo env VFIOD_CACHE="$VFIOD_CACHE" VFIOD_DEB_OUT="$OUT" RETRIES="${RETRIES:-5}" "$0" "$@"
fi
if ! command -v mmdebstrap >/dev/null; then
    retry apt-get "${APT_NET_OPTS[@]}" update -q
    retry env DEBIAN_FRONTEND=noninteractive apt-get "${APT_NET_OPTS[@]}" install -y -q \
        --no-install-recommends mmdebstrap debian-archive-keyring
fi

recipe=$({ printf 'format=%s suite=%s pkgs=%s\n' "$FORMAT" "$SUITE" "${PKGS[*]}"
           sed -n '1,/^# ---- build/p' "$here/build-deb.sh"; } | sha256sum | cut -d' ' -f1)
if [[ ${VFIOD_DEB_REFRESH:-0} == 1 || ! -f $ROOT/.stamp || ! -x $ROOT/usr/bin/dpkg-buildpackage ]] \
        || ! grep -qx "recipe=$recipe" "$ROOT/.stamp"; then
    IFS='|' read -r mirror components < <(debian_mirror)
    keyring=$(debian_keyring)
    log "building the $SUITE build root ($mirror $components): ${PKGS[*]}"
    t0=$SECONDS
    build_root() {
        rm -rf "$ROOT.tmp"
        mmdebstrap --variant=apt --mode=root \
            --include="$(IFS=,; echo "${PKGS[*]}")" \
            --aptopt='APT::Install-Recommends "false"' \
            --aptopt='Acquire::Retries "5"' \
            --dpkgopt='path-exclude=/usr/share/man/*' \
            --dpkgopt='path-exclude=/usr/share/locale/*' \
            "$SUITE" "$ROOT.tmp" "deb [signed-by=$keyring] $mirror $SUITE $components"
    }
    retry build_root || die "mmdebstrap failed ${RETRIES:-5} times (mirror $mirror unreachable?)"
    ver() { chroot "$ROOT.tmp" dpkg-query -W -f='${Version}' "$1"; }
    printf 'recipe=%s\ndebhelper=%s\ndh-python=%s\npython3=%s\nbuild_seconds=%s\n' "$recipe" \
        "$(ver debhelper)" "$(ver dh-python)" "$(ver python3)" "$((SECONDS - t0))" \
        >"$ROOT.tmp/.stamp"
    rm -rf "$ROOT"
    mv "$ROOT.tmp" "$ROOT"
    log "build root ready in $((SECONDS - t0)) s"
else
    log "cached build root: $ROOT (debhelper $(sed -n 's/^debhelper=//p' "$ROOT/.stamp"))"
fi

# ---- build ----------------------------------------------------------------------------------
scratch=$(mktemp -d /tmp/vfiod-deb-XXXXXX)
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/vfiod"
if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$repo" ls-files -co --exclude-standard -z \
        | (cd "$repo" && xargs -0 -r tar -cf - --no-recursion --ignore-failed-read) \
        | tar -xf - -C "$scratch/vfiod"
else
    tar -C "$repo" --exclude=.venv --exclude=build --exclude='*.so' --exclude=__pycache__ \
        -cf - . | tar -xf - -C "$scratch/vfiod"
fi
t0=$SECONDS
# In a private mount namespace: /proc, /dev and the scratch tree at /tmp/deb in the root.
unshare --mount --propagation private -- /bin/sh -c '
    set -e
    mount -t proc proc "$0/proc"
    mount --rbind /dev "$0/dev"
    mount -t tmpfs tmpfs "$0/tmp"
    mkdir -p "$0/tmp/deb"
    mount --bind "$1" "$0/tmp/deb"
    exec chroot "$0" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 \
        HOME=/tmp DEB_BUILD_OPTIONS=nocheck /bin/sh -c \
        "cd /tmp/deb/vfiod && dpkg-buildpackage -b -us -uc"
' "$ROOT" "$scratch" >"$scratch/build.log" 2>&1 || { tail -n 60 "$scratch/build.log"; die "dpkg-buildpackage failed"; }
mkdir -p "$OUT"
debs=("$scratch"/*.deb)
[[ -e ${debs[0]} ]] || { tail -n 40 "$scratch/build.log"; die "no .deb produced"; }
rm -f "$OUT"/vfiod_* "$OUT"/vfiod-dbgsym_*
cp "$scratch"/*.deb "$scratch"/*.buildinfo "$scratch"/*.changes "$OUT/"
cp "$scratch/build.log" "$OUT/build.log"
for d in "$OUT"/*.deb; do
    log "built $d in $((SECONDS - t0)) s:"
    dpkg-deb -f "$d" Package Version Architecture Depends | sed 's/^/    /' >&2
done
