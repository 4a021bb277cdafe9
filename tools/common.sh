# Shared helpers for tools/*.sh (sourced, not executed).
# shellcheck shell=bash

VFIOD_CACHE=${VFIOD_CACHE:-$HOME/.cache/vfiod}
export VFIOD_CACHE

_tool=$(basename "$0" .sh)

log() { printf '%s: %s\n' "$_tool" "$*" >&2; }
die() { printf '%s: ERROR: %s\n' "$_tool" "$*" >&2; exit 1; }

# retry CMD...: run CMD up to $RETRIES times (default 5) with exponential back-off.
# Used around everything that touches the network (apt-get update/install/download, mmdebstrap).
retry() {
    local attempt=1 max=${RETRIES:-5} delay=${RETRY_DELAY:-5}
    until "$@"; do
        if (( attempt >= max )); then
            log "giving up after $attempt attempts: $*"
            return 1
        fi
        log "attempt $attempt/$max failed, retrying in ${delay}s: $*"
        sleep "$delay"
        attempt=$((attempt + 1))
        delay=$((delay * 2))
    done
}

# Run as root, or through sudo when we are not root.
as_root() {
    if [[ $EUID -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

# Options that make apt more patient with mirror hiccups (passed to every apt-get call).
# shellcheck disable=SC2034  # used by the scripts that source this file
APT_NET_OPTS=(-o Acquire::Retries=5 -o Acquire::http::Timeout=60 -o Acquire::https::Timeout=60)

# os_codename: VERSION_CODENAME of the host (bookworm, trixie, ...).
os_codename() {
    local VERSION_CODENAME=""
    # shellcheck disable=SC1091
    [[ -r /etc/os-release ]] && . /etc/os-release
    printf '%s\n' "${VERSION_CODENAME:-unknown}"
}

# debian_mirror: prints "URI|COMPONENTS" of the host's main Debian archive source (not the
# security archive), read from deb822 sources (/etc/apt/sources.list.d/*.sources) or the
# one-line format. VFIOD_DEBIAN_MIRROR / VFIOD_DEBIAN_COMPONENTS override it.
debian_mirror() {
    local uri="" comps="" f
    if [[ -n ${VFIOD_DEBIAN_MIRROR:-} ]]; then
        printf '%s|%s\n' "$VFIOD_DEBIAN_MIRROR" "${VFIOD_DEBIAN_COMPONENTS:-main}"
        return
    fi
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -r $f ]] || continue
        # One stanza per paragraph; take the first "deb" stanza whose URI is not a security archive.
        uri_comps=$(awk '
            function flush() {
                if (types ~ /(^|[ \t])deb([ \t]|$)/ && uris != "" && uris !~ /security/ && !done) {
                    split(uris, u, /[ \t]+/); print u[1] "|" comps; done = 1
                }
                types = ""; uris = ""; comps = ""
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            tolower($1) == "types:"      { sub(/^[^:]*:[ \t]*/, ""); types = $0 }
            tolower($1) == "uris:"       { sub(/^[^:]*:[ \t]*/, ""); uris = $0 }
            tolower($1) == "components:" { sub(/^[^:]*:[ \t]*/, ""); comps = $0 }
            END { flush() }' "$f")
        if [[ -n $uri_comps ]]; then
            uri=${uri_comps%%|*}
            comps=${uri_comps#*|}
            break
        fi
    done
    if [[ -z $uri && -r /etc/apt/sources.list ]]; then
        # deb [opts] URI SUITE COMP...
        uri_comps=$(awk '
            $1 == "deb" {
                i = 2
                if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                if ($i ~ /security/) next
                c = ""; for (j = i + 2; j <= NF; j++) c = c (c == "" ? "" : " ") $j
                print $i "|" c; exit
            }' /etc/apt/sources.list)
        if [[ -n $uri_comps ]]; then
            uri=${uri_comps%%|*}
            comps=${uri_comps#*|}
        fi
    fi
    [[ -n $uri ]] || uri=http://deb.debian.org/debian
    [[ -n $comps ]] || comps=main
    printf '%s|%s\n' "${uri%/}" "$comps"
}

# The Debian archive keyring (trixie names it .pgp, older releases .gpg).
debian_keyring() {
    local k
    for k in /usr/share/keyrings/debian-archive-keyring.pgp /usr/share/keyrings/debian-archive-keyring.gpg; do
        [[ -r $k ]] && { printf '%s\n' "$k"; return; }
    done
    die "no Debian archive keyring in /usr/share/keyrings (apt-get install debian-archive-keyring)"
}

# A Debian mirror can lag for foreign architectures: its index names a point-release update
# whose .deb is not in the pool yet (HTTP 404) while the previous one is (build-cross-root.sh,
# build-guest-images.sh).
# http_ok URL: the URL answers 200.
http_ok() { [[ $(curl -s -I -m 30 --retry 3 -o /dev/null -w '%{http_code}' "$1") == 200 ]]; }

# older_candidates FILE: older pool file names to try for FILE (a pool .deb name), newest first.
older_candidates() {
    local f=$1 name rest ver arch base sep n i up micro tail
    name=${f%%_*} rest=${f#*_}
    ver=${rest%_*} arch=${rest##*_}
    ver=${ver//%2b/+} ver=${ver//%7e/\~}
    if [[ $ver =~ ^(.*)([+~]deb[0-9]+u)([0-9]+)$ ]]; then
        base=${BASH_REMATCH[1]} sep=${BASH_REMATCH[2]} n=${BASH_REMATCH[3]}
        for ((i = n - 1; i >= 1; i--)); do echo "${name}_${base}${sep}${i}_${arch}"; done
        echo "${name}_${base}_${arch}"
        echo "${name}_${base}+b1_${arch}"
        # an earlier upstream micro release: 3.5.9-1~deb13u1 -> 3.5.8-1~deb13u1, ..., 3.5.0-1
        if [[ $base =~ ^(.*\.)([0-9]+)(-[^-]+)$ ]]; then
            up=${BASH_REMATCH[1]} micro=${BASH_REMATCH[2]} tail=${BASH_REMATCH[3]}
            for ((i = micro - 1; i >= 0; i--)); do
                echo "${name}_${up}${i}${tail}${sep}1_${arch}"
                echo "${name}_${up}${i}${tail}_${arch}"
            done
        fi
    elif [[ $ver =~ ^(.*\.)([0-9]+)$ ]]; then
        for ((i = BASH_REMATCH[2] - 1; i >= 0; i--)); do
            echo "${name}_${BASH_REMATCH[1]}${i}_${arch}"
        done
    fi
}
