#!/bin/sh
# Runs inside the systemd test guest (tests/systemd/test_service_in_guest.py), as root, started
# by the image's vfiod-ci.service from the payload disk. Installs
# the vfiod .deb built from the tree under test (dpkg -i: vfiod, vfiodctl, vfiod-qemu, the unit
# and /etc/vfiod/vfiod.toml), checks the package's own start, then drives the unit with systemctl.
# Every step reports "@@VFIOD key=value" markers (and @@BEGIN/@@END sections); nothing stops
# early, so one boot shows every result and the host test asserts on them.
# SC2046: `mark $(...)` splits key=value tokens on purpose (values have no spaces).
# SC2317: functions called through wait_for. SC2012: socket names are plain.
# shellcheck disable=SC2046,SC2317,SC2012
set -u
cd "$(dirname "$0")" || exit 99
PY=/usr/bin/python3
CONF=/etc/vfiod/vfiod.toml
RUN=/run/vfiod

mark() { echo "@@VFIOD $*"; }
section() {  # NAME CMD...: the command's output, verbatim, as a section
    name=$1
    shift
    echo "@@BEGIN $name"
    "$@" 2>&1
    echo "@@END $name"
}
now() { cut -d' ' -f1 /proc/uptime; }
elapsed() { echo "$1 $(now)" | awk '{ printf "%.2f", $2 - $1 }'; }
prop() { systemctl show -P "$1" vfiod.service; }
sockets() {  # comma-separated *.sock names in /run/vfiod, "none" if there are none
    s=$(cd "$RUN" 2>/dev/null && ls -- *.sock 2>/dev/null | sort | tr '\n' ',' | sed 's/,$//')
    echo "${s:-none}"
}
probe() { "$PY" probe.py "$@"; }
wait_for() {  # SECONDS CMD...: poll CMD every 0.2 s until it succeeds; status of the last try
    limit=$1
    shift
    t=$(now)
    until "$@"; do
        if [ "$(echo "$t $(now) $limit" | awk '{ print ($2 - $1 > $3) }')" = 1 ]; then
            return 1
        fi
        sleep 0.2
    done
}
settled() {  # the unit is active (not reloading/activating) and SOCKET exists
    [ "$(systemctl is-active vfiod.service)" = active ] && [ -S "$RUN/$1" ]
}
snapshot() {  # PREFIX: state of the unit right now
    mark "$1active=$(systemctl is-active vfiod.service) $1pid=$(prop MainPID)" \
        "$1sockets=$(sockets) $1nrestarts=$(prop NRestarts)"
}

# ---- install: the .deb (`make deb`) ---------------------------------------------------------
mark at_install=$(now)
# The admin's configuration first: vfiod.toml is a conffile, dpkg keeps the existing one
# (--force-confold), and the package's postinst (dh_installsystemd) enables and starts the
# service on it.
install -d -m 0755 /etc/vfiod
install -m 0644 conf/start.toml "$CONF"
t=$(now)
DEBIAN_FRONTEND=noninteractive dpkg -i --force-confold vfiod.deb >dpkg.out 2>&1
mark dpkg=$? dpkg_seconds=$(elapsed "$t")
section dpkg cat dpkg.out
files=ok
for f in /usr/bin/vfiod /usr/bin/vfiodctl /usr/bin/vfiod-qemu /usr/lib/systemd/system/vfiod.service; do
    [ -e "$f" ] || files="missing:$f"
done
mark deb_files=$files deb_conffile=$(cmp -s conf/start.toml "$CONF" && echo kept || echo replaced) \
    deb_enabled=$(systemctl is-enabled vfiod.service) deb_active=$(systemctl is-active vfiod.service) \
    deb_sockets=$(sockets)
# The package's own default configuration is valid.
dpkg-deb --fsys-tarfile vfiod.deb | tar -xOf - ./etc/vfiod/vfiod.toml >pkg.toml
/usr/bin/vfiod --check-config pkg.toml >check.out 2>&1
mark deb_default_config=$?
section check cat check.out
# The steps below start from a stopped service.
systemctl stop vfiod.service
mark install=ok python=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])') \
    systemd=$(systemctl --version | sed -n '1s/^systemd \([0-9]*\).*/\1/p')

# ---- systemd-analyze ----------------------------------------------------------------------
mark at_analyze=$(now)
systemd-analyze verify /usr/lib/systemd/system/vfiod.service >verify.out 2>&1
mark verify=$?
section verify cat verify.out
systemd-analyze security --no-pager vfiod.service >security.out 2>&1
mark exposure="$(sed -n 's/.*Overall exposure level for vfiod.service: \([0-9.]*\).*/\1/p' security.out)"
section security cat security.out

# ---- start: Type=notify, so start returns once READY=1 came, with every socket listening ----
mark at_start=$(now)
t=$(now)
systemctl start vfiod.service
mark start=$? start_seconds=$(elapsed "$t")
snapshot start_
pid0=$(prop MainPID)
mark start_status_text="$(prop StatusText | tr ' =' '_:')"
mark $(probe check "$RUN/test0.sock" start_test0_)
mark start_tce_mapped=$(grep -c '_fast' "/proc/$pid0/maps" 2>/dev/null || echo 0) \
    start_mdwe=$(prop MemoryDenyWriteExecute) start_caps=$(prop CapabilityBoundingSet | wc -w)

# ---- runtime layout change through the control socket: 2 VFs on pf0 --------------------------
mark at_numvfs=$(now)
section numvfs /usr/bin/vfiodctl set-numvfs pf0 2
wait_for 10 settled pf0-vf1.sock
mark numvfs_sockets=$(sockets)
mark $(probe check "$RUN/pf0-vf1.sock" numvfs_vf1_)

# ---- reload: add function test1; a client attached to test0 stays attached -------------------
mark at_reload=$(now)
rm -f held.ready held.go
probe hold "$RUN/test0.sock" held.ready held.go held_ >held.out 2>held.err &
held_pid=$!
wait_for 30 test -e held.ready
mark held_ready=$([ -e held.ready ] && echo yes || echo no)
install -m 0644 conf/reload.toml "$CONF"
t=$(now)
systemctl reload vfiod.service
mark reload=$? reload_seconds=$(elapsed "$t")
wait_for 30 settled test1.sock
mark reload_settle_seconds=$(elapsed "$t")
snapshot reload_
mark reload_status_text="$(prop StatusText | tr ' =' '_:')"
mark $(probe check "$RUN/test1.sock" reload_test1_)
touch held.go
wait "$held_pid"
mark $(cat held.out)
section held_stderr cat held.err

# ---- a bad file: the reload fails, the daemon keeps running its current layout ----------------
mark at_badreload=$(now)
printf 'function = 3\n' >"$CONF"
systemctl reload vfiod.service >badreload.out 2>&1
mark badreload=$?
section badreload cat badreload.out
sleep 1
snapshot badreload_
install -m 0644 conf/reload.toml "$CONF"

# ---- restart: a new process restores the layout (config + runtime VFs from /var/lib/vfiod) ----
mark at_restart=$(now)
t=$(now)
systemctl restart vfiod.service
mark restart=$? restart_seconds=$(elapsed "$t")
snapshot restart_
mark $(probe check "$RUN/test0.sock" restart_test0_)
mark $(probe check "$RUN/test1.sock" restart_test1_)
mark $(probe check "$RUN/pf0-vf1.sock" restart_vf1_)
section statedir ls -la /var/lib/vfiod

# ---- stop: clean exit, sockets and /run/vfiod gone -----------------------------------------
mark at_stop=$(now)
systemctl stop vfiod.service
mark stop=$? stop_active=$(systemctl is-active vfiod.service) stop_result=$(prop Result) \
    stop_exit_status=$(prop ExecMainStatus) stop_rundir=$([ -e "$RUN" ] && echo present || echo absent)

mark at_end=$(now)
section journal journalctl -u vfiod.service --no-pager -o short-monotonic -n 200
exit 0
