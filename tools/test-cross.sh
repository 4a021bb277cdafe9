#!/usr/bin/env bash
# Run vfiod's tests on a foreign architecture under qemu-user (`make test-cross ARCH=...`).
#
#   tools/test-cross.sh ppc64el                       # the non-QEMU suite (tests/systemd aside)
#   tools/test-cross.sh s390x tests/protocol tests/spapr
#
# The trixie root of that architecture comes from tools/build-cross-root.sh (cached in
# $VFIOD_CACHE/cross/<arch>). This tree (tracked and untracked files, not .venv or build output)
# is copied to a scratch directory, bind-mounted at /src in a private mount namespace, and built
# there by the root's own python3 and gcc (`setup.py build`: the cffi module vfiod._fast is
# compiled for the foreign architecture). pytest then runs from /tmp with the build on
# PYTHONPATH, so `python -m vfiod` in the tests' subprocesses imports the same build. The cached
# root is never written to.
#
# Under emulation everything is 5-20x slower, so hypothesis' per-example deadline is turned off
# (tools/cross_pytest_plugin.py); the tests themselves are unchanged. Extra arguments are pytest
# arguments (paths are relative to the repository); default: `-m 'not qemu' tests` without
# tests/systemd (it boots the amd64 systemd image, not something to run under qemu-user).
# VFIOD_CROSS_PYTEST_ARGS adds pytest options (e.g. "-x -v").
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source=tools/common.sh
. "$here/common.sh"

ARCH=${1:-${ARCH:-}}
[[ -n $ARCH ]] || die "usage: $0 ppc64el|s390x [pytest arguments]"
shift || true
if [[ $EUID -ne 0 ]]; then
    exec sudo env VFIOD_CACHE="$VFIOD_CACHE" VFIOD_CROSS_PYTEST_ARGS="${VFIOD_CROSS_PYTEST_ARGS:-}" \
        $(env | grep -E '^[A-Z_]+_EXAMPLES=[0-9]+$') "$0" "$ARCH" "$@"
fi
"$here/build-cross-root.sh" "$ARCH"
root=$VFIOD_CACHE/cross/$ARCH/root

scratch=$(mktemp -d /tmp/vfiod-cross-XXXXXX)
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/src" "$scratch/tmp"
if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$repo" ls-files -co --exclude-standard -z \
        | (cd "$repo" && xargs -0 -r tar -cf - --no-recursion --ignore-failed-read) \
        | tar -xf - -C "$scratch/src"
else
    tar -C "$repo" --exclude=.venv --exclude=build --exclude='*.so' --exclude=__pycache__ \
        -cf - . | tar -xf - -C "$scratch/src"
fi
install -m 0644 "$here/cross_pytest_plugin.py" "$scratch/src/cross_pytest_plugin.py"
# The generated tests' example counts (FP_EXAMPLES, NVME_C_EXAMPLES, ...) reach the emulated
# pytest; nothing else of this environment does.
env | grep -E '^[A-Z_]+_EXAMPLES=[0-9]+$' >"$scratch/src/.cross-env" || true

if (($# == 0)); then
    set -- -m "not qemu" tests --ignore=tests/systemd
fi
args=()
for a in "$@"; do
    if [[ $a == tests* ]]; then a=/src/$a; fi
    if [[ $a == --ignore=tests* ]]; then a=--ignore=/src/${a#--ignore=}; fi
    args+=("$a")
done
# shellcheck disable=SC2206  # word splitting of the extra options is the point
args+=(${VFIOD_CROSS_PYTEST_ARGS:-})

# Inside the namespace: /proc, /dev, a fresh /tmp, the source; then the build and pytest.
inner=$(cat <<'EOF'
set -e
root=$1 scratch=$2
shift 2
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
mount -t tmpfs tmpfs "$root/tmp"
mkdir -p "$root/tmp/src"
mount --bind "$scratch/src" "$root/tmp/src"
exec chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 HOME=/tmp \
    /bin/sh -c '
set -e
cd /tmp/src
echo "test-cross: $(uname -m), $(python3 --version), building vfiod (cffi module with gcc)"
t0=$(date +%s)
python3 setup.py -q build --build-base /tmp/build >/tmp/build.log 2>&1 || { cat /tmp/build.log; exit 1; }
lib=$(ls -d /tmp/build/lib*)
ls "$lib"/vfiod/_fast*.so >/dev/null
echo "test-cross: built in $(( $(date +%s) - t0 )) s: $(cd "$lib" && ls vfiod/_fast*.so)"
# A venv (Debian'"'"'s packages visible) with the console scripts of pyproject.toml, as an install
# has them: tests run vfiod, vfiodctl and vfiod-qemu from beside sys.executable.
python3 -m venv --system-site-packages --without-pip /tmp/venv
python3 - <<PY
import tomllib
scripts = tomllib.load(open("/tmp/src/pyproject.toml", "rb"))["project"]["scripts"]
for name, target in scripts.items():
    module, func = target.split(":")
    with open(f"/tmp/venv/bin/{name}", "w") as f:
        f.write(f"#!/tmp/venv/bin/python3\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n")
PY
chmod +x /tmp/venv/bin/*
cd /tmp
export PYTHONPATH=$lib:/tmp/src PYTHONDONTWRITEBYTECODE=1
set -a; . /tmp/src/.cross-env; set +a
/tmp/venv/bin/python3 -c "import sys, vfiod._fast; print(\"test-cross: byteorder\", sys.byteorder)"
exec /tmp/venv/bin/python3 -P -m pytest -p cross_pytest_plugin -p no:cacheprovider -q \
    -c /tmp/src/pyproject.toml --rootdir /tmp/src "$@"
' sh "$@"
EOF
)
# /src in the args means the scratch copy, mounted at /tmp/src inside.
args=("${args[@]//\/src\//\/tmp\/src\/}")
t0=$SECONDS
set +e
unshare --mount --propagation private -- /bin/bash -c "$inner" sh "$root" "$scratch" "${args[@]}"
rc=$?
set -e
log "$ARCH: pytest exit $rc after $((SECONDS - t0)) s (wall clock, qemu-user)"
exit $rc
