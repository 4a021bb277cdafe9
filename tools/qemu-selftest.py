#!/usr/bin/env python3
"""Self-test of provisioned QEMU wrappers (stdlib only; run by tools/provision-qemu.sh).

usage: qemu-selftest.py BIN_DIR

1. q35 under TCG with memfd-backed shared RAM runs SeaBIOS to its boot menu (seen on the
   debug console, written to a file in a host temp dir).
2. vfio-user-pci connects to a UNIX socket in a host temp dir and sends VERSION (command 1).
3. pseries with VOF firmware initialises (paused) without error.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time


def fail(msg: str) -> None:
    print(f"qemu-selftest: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def stop(proc: subprocess.Popen[bytes]) -> str:
    if proc.poll() is None:
        proc.kill()
    out, _ = proc.communicate(timeout=30)
    return out.decode(errors="replace")[-2000:]


def test_q35_boot(bindir: str, tmp: str) -> None:
    log = os.path.join(tmp, "debugcon.log")
    cmd = [
        os.path.join(bindir, "qemu-system-x86_64"),
        "-accel", "tcg", "-M", "q35", "-m", "128", "-nodefaults", "-display", "none",
        "-object", "memory-backend-memfd,id=mem,size=128M,share=on",
        "-machine", "memory-backend=mem",
        "-chardev", f"file,id=dbg,path={log}",
        "-device", "isa-debugcon,iobase=0x402,chardev=dbg",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    text = ""
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            with open(log, errors="replace") as f:
                text = f.read()
        except FileNotFoundError:
            text = ""
        if "Booting from" in text or "No bootable device" in text:
            stop(proc)
            print("qemu-selftest: q35 + memfd: SeaBIOS reached the boot stage", file=sys.stderr)
            return
        if proc.poll() is not None:
            break
    out = stop(proc)
    fail(f"q35 firmware did not reach boot; qemu output:\n{out}\ndebugcon:\n{text[-2000:]}")


def test_vfio_user_socket(bindir: str, tmp: str) -> None:
    path = os.path.join(tmp, "vfu.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    srv.settimeout(60)
    dev = json.dumps(
        {"driver": "vfio-user-pci", "socket": {"type": "unix", "path": path}, "id": "vfu0"}
    )
    cmd = [
        os.path.join(bindir, "qemu-system-x86_64"),
        "-accel", "tcg", "-M", "q35", "-m", "128", "-nodefaults", "-display", "none", "-S",
        "-object", "memory-backend-memfd,id=mem,size=128M,share=on",
        "-machine", "memory-backend=mem", "-device", dev,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        conn, _ = srv.accept()
    except TimeoutError:
        fail(f"QEMU never connected to {path}:\n{stop(proc)}")
    conn.settimeout(30)
    hdr = b""
    while len(hdr) < 16:
        chunk = conn.recv(16 - len(hdr))
        if not chunk:
            break
        hdr += chunk
    conn.close()
    srv.close()
    stop(proc)
    if len(hdr) < 16:
        fail("QEMU connected but sent no vfio-user header")
    _msg_id, command, _size, _flags, _err = struct.unpack("<HHIII", hdr)
    if command != 1:
        fail(f"first vfio-user command was {command}, expected VERSION (1)")
    print(f"qemu-selftest: vfio-user-pci connected to {path} and sent VERSION", file=sys.stderr)


def test_pseries(bindir: str) -> None:
    cmd = [
        os.path.join(bindir, "qemu-system-ppc64"),
        "-accel", "tcg", "-M", "pseries,x-vof=on", "-cpu", "POWER8", "-m", "256",
        "-nodefaults", "-display", "none", "-S",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    time.sleep(3)
    if proc.poll() is not None:
        fail(f"pseries machine did not start:\n{stop(proc)}")
    stop(proc)
    print("qemu-selftest: pseries,x-vof=on POWER8 initialises", file=sys.stderr)


def main() -> None:
    if len(sys.argv) != 2:
        fail("usage: qemu-selftest.py BIN_DIR")
    bindir = sys.argv[1]
    with tempfile.TemporaryDirectory(prefix="vfiod-selftest-") as tmp:
        test_q35_boot(bindir, tmp)
        test_vfio_user_socket(bindir, tmp)
        test_pseries(bindir)


if __name__ == "__main__":
    main()
