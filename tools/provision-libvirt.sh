#!/usr/bin/env bash
# Install Debian's libvirt daemon and virsh for tests/libvirt (`make libvirt`), if missing.
# Nothing is started or configured here: the test runs its own libvirtd in a private mount
# namespace with scratch state (docs/libvirt.md, "How it is tested").
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tools/common.sh
. "$here/common.sh"
if [[ -x /usr/sbin/libvirtd ]] && command -v virsh >/dev/null \
        && compgen -G '/usr/lib/*/libvirt/connection-driver/libvirt_driver_qemu.so' >/dev/null; then
    log "cached: $(/usr/sbin/libvirtd --version)"
    exit 0
fi
log "installing libvirt-daemon-system, libvirt-clients"
retry as_root apt-get "${APT_NET_OPTS[@]}" update -q
retry as_root env DEBIAN_FRONTEND=noninteractive apt-get "${APT_NET_OPTS[@]}" install -y -q \
    --no-install-recommends libvirt-daemon-system libvirt-clients
log "installed: $(/usr/sbin/libvirtd --version)"
