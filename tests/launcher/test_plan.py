"""vfiod-qemu's command-line planning and its error paths (no QEMU needed)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vfiod.qemu.launcher import LaunchError, device_id, is_pseries, plan_launch

Q35 = ["qemu-system-x86_64", "-M", "q35", "-m", "1G",
       "-object", "memory-backend-memfd,id=mem,size=1G,share=on", "-machine", "memory-backend=mem"]
PSERIES = ["qemu-system-ppc64", "-M", "pseries,x-vof=on", "-m", "1G",
           "-object", "memory-backend-memfd,id=mem,size=1G,share=on",
           "-machine", "memory-backend=mem", "-kernel", "vmlinux", "-append", "console=hvc0"]


def test_q35_gets_device_arguments(tmp_path: Path) -> None:
    plan = plan_launch(Q35, [Path("/run/vfiod/nvme0-vf0.sock"), Path("/run/vfiod/0x.sock")],
                       tmp_path)
    assert not plan.pseries and plan.qmp_socket is None and plan.warnings == []
    devices = [json.loads(plan.argv[i + 1]) for i, a in enumerate(plan.argv) if a == "-device"]
    assert devices == [
        {"driver": "vfio-user-pci", "socket": {"type": "unix",
                                               "path": "/run/vfiod/nvme0-vf0.sock"},
         "id": "nvme0-vf0"},
        {"driver": "vfio-user-pci", "socket": {"type": "unix", "path": "/run/vfiod/0x.sock"},
         "id": "vfu-0x"},
    ]
    assert plan.argv[:len(Q35)] == Q35


def test_pseries_is_paused_with_qmp_and_eeh_off(tmp_path: Path) -> None:
    plan = plan_launch(PSERIES, [Path("/s/nvme1-vf0.sock")], tmp_path)
    assert plan.pseries and plan.cont
    assert "-device" not in plan.argv  # QEMU 11.1 would abort at machine start
    assert plan.argv[-1] == "-S"
    assert f"unix:{tmp_path / 'qmp.sock'},server=on,wait=off" in plan.argv
    assert plan.argv[plan.argv.index("-append") + 1] == "console=hvc0 eeh=off"
    assert plan.devices == [{"driver": "vfio-user-pci", "id": "nvme1-vf0",
                             "socket": {"type": "unix", "path": "/s/nvme1-vf0.sock"}}]


def test_pseries_details(tmp_path: Path) -> None:
    # no -append: one is added; eeh=off already there: not doubled; -S given: stays paused
    argv = [a for a in PSERIES if a not in ("-append", "console=hvc0")]
    plan = plan_launch(argv, [Path("/s/a.sock")], tmp_path)
    assert plan.argv[plan.argv.index("-append") + 1] == "eeh=off"
    plan = plan_launch([*PSERIES[:-1], "console=hvc0 eeh=off", "-S"], [Path("/s/a.sock")],
                       tmp_path)
    assert plan.argv[plan.argv.index("-append") + 1] == "console=hvc0 eeh=off"
    assert plan.argv.count("-S") == 1 and not plan.cont
    # neither -kernel nor -append (firmware boot from disk): a warning says what to do
    plan = plan_launch(["qemu-system-ppc64", "-object", "x,share=on"], [Path("/s/a.sock")],
                       tmp_path)
    assert any("eeh=off" in w for w in plan.warnings)


def test_machine_detection() -> None:
    assert is_pseries(["qemu-system-ppc64"])
    assert is_pseries(["/x/qemu-system-ppc64", "-machine", "pseries-11.1,x-vof=on"])
    assert is_pseries(["qemu", "-machine", "type=pseries"])
    assert not is_pseries(["qemu-system-ppc64", "-M", "powernv9"])
    assert not is_pseries(["qemu-system-x86_64", "-M", "q35"])
    assert not is_pseries(["qemu-system-x86_64"])


def test_ids_are_unique_and_valid() -> None:
    taken: set[str] = set()
    ids = [device_id(Path(p), taken) for p in ("/a/x.sock", "/b/x.sock", "/c/9 z.sock")]
    assert ids == ["x", "x.1", "vfu-9_z"]


def test_shared_memory_warning(tmp_path: Path) -> None:
    plan = plan_launch(["qemu-system-x86_64", "-m", "1G"], [Path("/s/a.sock")], tmp_path)
    assert any("share=on" in w for w in plan.warnings)


def test_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(LaunchError):
        plan_launch([], [Path("/s/a.sock")], tmp_path)
    with pytest.raises(LaunchError):
        plan_launch(Q35, [], tmp_path)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vfiod.qemu.launcher", *args],
                          capture_output=True, text=True, timeout=60)


def test_cli_refuses_a_missing_socket(tmp_path: Path) -> None:
    out = run_cli("--socket", str(tmp_path / "none.sock"), "--", "true")
    assert out.returncode == 2
    assert "none.sock" in out.stderr and "No such file" in out.stderr


def test_cli_vf_names_resolve_in_the_socket_dir_and_dry_run(tmp_path: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tmp_path / "nvme1-vf1.sock"))
    try:
        out = run_cli("--socket-dir", str(tmp_path), "--vf", "nvme1-vf1", "--dry-run", "--",
                      *PSERIES)
    finally:
        s.close()
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "eeh=off" in lines[0] and " -S" in lines[0]
    assert f'"path":"{tmp_path}/nvme1-vf1.sock"' in lines[1] and "device_add" in lines[1]
    assert lines[2] == "# QMP: cont"


def test_cli_x86_exit_status_is_the_programs(tmp_path: Path) -> None:
    """On q35 the launcher execs the program: its exit status and output are the launcher's."""
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tmp_path / "f.sock"))
    try:
        out = run_cli("--socket", str(tmp_path / "f.sock"), "--machine", "other", "--",
                      "sh", "-c", 'echo "$@"; exit 7', "sh", "-object", "m,share=on")
    finally:
        s.close()
    assert out.returncode == 7
    assert '-device {"driver":"vfio-user-pci"' in out.stdout and '"id":"f"' in out.stdout


def test_boot_commands_never_fail_the_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    """vfiod prints the boot commands at start; under systemd (ProtectHome=) the cache is
    unreadable. That must give a hint, not an exception (which would stop the daemon)."""
    from vfiod.qemu import boot

    def hidden(self: Path) -> bool:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "is_file", hidden)
    out = boot.boot_commands([boot.BootTarget("nvme0-vf0", Path("/run/vfiod/nvme0-vf0.sock"),
                                              "flat")])
    assert len(out) == 1 and "Permission denied" in out[0][1]


def test_vf_names_resolve_where_vfiod_puts_its_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    from vfiod import config
    from vfiod.qemu import launcher

    for runtime in ("/run/user/1000", None):
        if runtime is None:
            monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
        else:
            monkeypatch.setenv("XDG_RUNTIME_DIR", runtime)
        for uid in (0, 1000):
            monkeypatch.setattr("os.geteuid", lambda uid=uid: uid)
            monkeypatch.setattr("os.getuid", lambda uid=uid: uid)
            assert launcher.default_socket_dir() == config.default_socket_dir()
