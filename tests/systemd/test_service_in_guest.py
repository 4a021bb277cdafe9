"""The vfiod .deb and its vfiod.service under a real systemd: a Debian trixie guest (init =
systemd) boots under QEMU, installs the package built from the tree under test (`make deb`) with
dpkg, and drives the unit with systemctl.

One boot (tests/systemd/guest/run.sh) runs every step and reports markers; the tests below each
assert one behaviour on them:
  * dpkg -i installs vfiod, vfiodctl, vfiod-qemu, the unit and the example; the postinst enables
    and starts the service on the admin's /etc/vfiod/vfiod.toml (a conffile, kept); the
    package's own default configuration passes --check-config
  * systemd-analyze verify passes on the installed unit
  * start: Type=notify, so `systemctl start` returns once vfiod sent READY=1, and at that moment
    every function socket listens and a function is usable (vendor id + DMA through the PE)
  * runtime layout change (vfiodctl set-numvfs) gives VF sockets
  * reload (ExecReload, SIGHUP): a new function appears, same PID, a client attached before the
    reload is still attached and working after it; a bad file fails the reload and changes nothing
  * restart: new PID, the whole layout back (config functions and the runtime VFs, kept in
    /var/lib/vfiod), functions usable
  * stop: clean exit, sockets and /run/vfiod gone
"""

from __future__ import annotations

import io
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from sdguest import (
    GUEST_DIR,
    SystemdImage,
    boot_with_payload,
    build_deb,
    make_payload,
    systemd_image,
)

from vfiod.qemu import GuestResult, QemuNotProvisioned, qemu_binary

pytestmark = pytest.mark.qemu

START_TOML = """\
# tests/systemd: the layout the unit starts with
[[phb]]
index = 0
window_policy = "flat"

[[function]]
name = "test0"
personality = "testdev"

[[function]]
name = "pf0"
personality = "testdev"
totalvfs = 2
"""

RELOAD_TOML = START_TOML + """
# added by the reload
[[function]]
name = "test1"
personality = "testdev"
"""

VENDOR = "0x7e57"


@pytest.fixture(scope="module")
def image() -> SystemdImage:
    try:
        qemu_binary("x86_64")
        return systemd_image()
    except QemuNotProvisioned as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The .deb of the tree under test (`make deb`'s script, into a scratch directory)."""
    return build_deb(tmp_path_factory.mktemp("deb"))


@pytest.fixture(scope="module")
def run(image: SystemdImage, deb: Path, tmp_path_factory: pytest.TempPathFactory) -> GuestResult:
    tmp = tmp_path_factory.mktemp("systemd-guest")
    t0 = time.monotonic()
    payload = make_payload({
        "run.sh": (GUEST_DIR / "run.sh").read_text(),
        "probe.py": (GUEST_DIR / "probe.py").read_text(),
        "conf/start.toml": START_TOML,
        "conf/reload.toml": RELOAD_TOML,
        "vfiod.deb": deb.read_bytes(),
    })  # fmt: skip
    t_stage = time.monotonic() - t0
    res = boot_with_payload(image, payload, tmp, timeout=900)
    (tmp / "console.log").write_text(res.console)  # the whole run, for a failure's post-mortem
    print(f"systemd guest: make deb {t_stage:.1f} s, {res.describe()}, "
          f"boot {res.markers.get('uptime', '?')} s guest uptime; "
          f"start {res.markers.get('start_seconds')} s, reload {res.markers.get('reload_seconds')}"
          f" s (settled {res.markers.get('reload_settle_seconds')} s), "
          f"restart {res.markers.get('restart_seconds')} s; console: {tmp / 'console.log'}")
    return res


def _ctx(res: GuestResult, *sections: str) -> str:
    """What to show when an assertion fails: the relevant sections and the journal."""
    parts = [res.describe()]
    for name in (*sections, "journal"):
        if name in res.sections:
            parts.append(f"--- {name} ---\n{res.sections[name].rstrip()}")
    if "journal" not in res.sections:
        parts.append(res.tail(80))
    return "\n".join(parts)


def test_guest_ran_the_whole_script(run: GuestResult) -> None:
    assert not run.timed_out and run.exit_status == 0, run.tail(120)
    assert run.markers.get("install") == "ok", run.tail()


def test_the_deb_holds_the_commands_unit_config_and_example(deb: Path) -> None:
    files = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                           check=True).stdout
    for path in ("./usr/bin/vfiod", "./usr/bin/vfiodctl", "./usr/bin/vfiod-qemu",
                 "./usr/lib/systemd/system/vfiod.service", "./etc/vfiod/vfiod.toml",
                 "./usr/share/doc/vfiod/examples/nvme-sriov.toml",
                 "./usr/lib/python3/dist-packages/vfiod/_fast.abi3.so",
                 "./usr/lib/python3/dist-packages/vfiod/protocol/__init__.py"):
        assert f" {path}\n" in files, (path, files)
    control = subprocess.run(["dpkg-deb", "-I", str(deb), "conffiles"], capture_output=True,
                             text=True, check=True).stdout
    assert control.split() == ["/etc/vfiod/vfiod.toml"]
    unit = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True,
                          check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(unit)) as tar:
        member = tar.extractfile("./usr/lib/systemd/system/vfiod.service")
        assert member is not None
        text = member.read().decode()
    assert "ExecStart=/usr/bin/vfiod --config %E/vfiod/vfiod.toml" in text
    assert "/opt/vfiod" not in text.replace("# Install: vfiod in a venv at /opt/vfiod", "")
    depends = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True,
                             text=True, check=True).stdout
    for dep in ("python3-trio", "python3-construct", "python3-cffi-backend",
                "python3-sortedcontainers"):
        assert dep in depends, depends


def test_the_deb_installs_enables_and_starts_the_service(run: GuestResult) -> None:
    m = run.markers
    assert m.get("dpkg") == "0", _ctx(run, "dpkg")
    assert m.get("deb_files") == "ok", _ctx(run, "dpkg")
    assert m.get("deb_conffile") == "kept", _ctx(run, "dpkg")  # the admin's vfiod.toml
    assert m.get("deb_enabled") == "enabled", _ctx(run, "dpkg")
    assert m.get("deb_active") == "active", _ctx(run, "dpkg")
    assert m.get("deb_sockets") == "control.sock,pf0.sock,test0.sock", _ctx(run, "dpkg")
    assert m.get("deb_default_config") == "0", _ctx(run, "check")


def test_systemd_analyze_verify_in_guest(run: GuestResult) -> None:
    assert run.markers.get("verify") == "0", _ctx(run, "verify")
    assert run.sections.get("verify", "").strip() == "", _ctx(run, "verify")
    # The hardening is real: systemd's own exposure score (0 = fully sandboxed, 10 = none).
    exposure = float(run.markers.get("exposure") or "10")
    assert exposure < 2.5, _ctx(run, "security")


def test_start_reports_ready_with_sockets_listening(run: GuestResult) -> None:
    m = run.markers
    assert m.get("start") == "0", _ctx(run)
    assert m.get("start_active") == "active", _ctx(run)
    assert m.get("start_pid", "0") != "0", _ctx(run)
    # Checked right after `systemctl start` returned, without polling: READY=1 came after the
    # sockets were listening.
    assert m.get("start_sockets") == "control.sock,pf0.sock,test0.sock", _ctx(run)
    assert m.get("start_test0_vendor") == VENDOR, _ctx(run)
    assert m.get("start_test0_dma") == "ok", _ctx(run)
    assert m.get("start_status_text"), _ctx(run)  # STATUS= shows in systemctl status


def test_hardening_applied_and_fast_path_loaded(run: GuestResult) -> None:
    m = run.markers
    assert m.get("start_mdwe") == "yes", _ctx(run)
    assert m.get("start_caps") == "0", _ctx(run)  # empty capability bounding set
    # The cffi C fast path is mapped in the hardened daemon (MemoryDenyWriteExecute=yes did
    # not stop it) and the DMA above went through it.
    assert int(m.get("start_tce_mapped") or 0) > 0, _ctx(run)


def test_runtime_vfs(run: GuestResult) -> None:
    m = run.markers
    assert m.get("numvfs_sockets") == (
        "control.sock,pf0-vf0.sock,pf0-vf1.sock,pf0.sock,test0.sock"), _ctx(run, "numvfs")
    assert m.get("numvfs_vf1_vendor") == VENDOR, _ctx(run, "numvfs")


def test_reload_applies_config_without_dropping_clients(run: GuestResult) -> None:
    m = run.markers
    assert m.get("held_ready") == "yes", _ctx(run, "held_stderr")
    assert m.get("reload") == "0", _ctx(run)
    assert m.get("reload_active") == "active", _ctx(run)
    assert m.get("reload_pid") == m.get("start_pid"), _ctx(run)
    assert m.get("reload_nrestarts") == "0", _ctx(run)
    assert m.get("reload_sockets") == (
        "control.sock,pf0-vf0.sock,pf0-vf1.sock,pf0.sock,test0.sock,test1.sock"), _ctx(run)
    assert m.get("reload_test1_vendor") == VENDOR and m.get("reload_test1_dma") == "ok", _ctx(run)
    # The client that was attached to test0 before the reload still works on its connection.
    assert m.get("held_vendor") == VENDOR and m.get("held_dma") == "ok", _ctx(run, "held_stderr")
    assert m.get("held_after_vendor") == VENDOR, _ctx(run, "held_stderr")
    assert m.get("held_after_dma") == "ok", _ctx(run, "held_stderr")


def test_bad_config_reload_is_refused_and_changes_nothing(run: GuestResult) -> None:
    m = run.markers
    assert m.get("badreload") not in (None, "0"), _ctx(run, "badreload")
    # The reason reaches the operator: `systemctl reload` fails and the journal has it.
    assert m.get("badreload_active") == "active", _ctx(run, "badreload")
    assert m.get("badreload_pid") == m.get("start_pid"), _ctx(run, "badreload")
    assert m.get("badreload_sockets") == m.get("reload_sockets"), _ctx(run, "badreload")


def test_restart_restores_the_layout(run: GuestResult) -> None:
    m = run.markers
    assert m.get("restart") == "0", _ctx(run, "statedir")
    assert m.get("restart_active") == "active", _ctx(run, "statedir")
    assert m.get("restart_pid") not in (None, "0", m.get("start_pid")), _ctx(run)
    assert m.get("restart_sockets") == (
        "control.sock,pf0-vf0.sock,pf0-vf1.sock,pf0.sock,test0.sock,test1.sock"
    ), _ctx(run, "statedir")
    for fn in ("test0", "test1", "vf1"):
        assert m.get(f"restart_{fn}_vendor") == VENDOR, _ctx(run, "statedir")
        assert m.get(f"restart_{fn}_dma") == "ok", _ctx(run, "statedir")


def test_stop_is_clean(run: GuestResult) -> None:
    m = run.markers
    assert m.get("stop") == "0", _ctx(run)
    assert m.get("stop_active") == "inactive", _ctx(run)
    assert m.get("stop_result") == "success", _ctx(run)
    assert m.get("stop_exit_status") == "0", _ctx(run)
    assert m.get("stop_rundir") == "absent", _ctx(run)

