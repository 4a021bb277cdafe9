"""The control server with a fake target, driven by ``vfiodctl`` (main() and the script)."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from control_fake import FakeTarget

from vfiod.control.cli import EXIT_CONNECT, EXIT_ERROR, EXIT_OK, EXIT_USAGE, main
from vfiod.control.server import ControlServer, serve_control
from vfiod.control.wire import MAX_REQUEST_LINE, encode_request

VFIODCTL = Path(sys.executable).with_name("vfiodctl")


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # short path: AF_UNIX paths are limited to 107 bytes
    d = Path(tempfile.mkdtemp(prefix="vctl", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


async def _start(
    nursery: trio.Nursery, sock_dir: Path, **kw: Any
) -> tuple[FakeTarget, ControlServer]:
    target = FakeTarget(sock_dir)
    server = ControlServer(target, sock_dir / "control.sock", **kw)
    await nursery.start(server.serve)
    return target, server


@pytest.fixture
async def ctl(sock_dir: Path) -> AsyncIterator[tuple[FakeTarget, ControlServer]]:
    async with trio.open_nursery() as nursery:
        yield await _start(nursery, sock_dir)
        nursery.cancel_scope.cancel()


async def cli(server: ControlServer | Path, *argv: str) -> tuple[int, str, str]:
    """Run vfiodctl's main() in a worker thread against the server."""
    path = server.path if isinstance(server, ControlServer) else server
    out, err = io.StringIO(), io.StringIO()
    rc = await trio.to_thread.run_sync(
        lambda: main(["--socket", str(path), *argv], stdout=out, stderr=err)
    )
    return rc, out.getvalue(), err.getvalue()


async def raw(server: ControlServer) -> trio.SocketStream:
    return await trio.open_unix_socket(str(server.path))


async def read_reply(stream: trio.SocketStream) -> dict[str, Any]:
    buf = b""
    with trio.fail_after(5):
        while b"\n" not in buf:
            data = await stream.receive_some(65536)
            assert data, f"closed without a reply (got {buf!r})"
            buf += data
    line, _, rest = buf.partition(b"\n")
    assert rest == b""
    reply: dict[str, Any] = json.loads(line)
    return reply


async def assert_closed(stream: trio.SocketStream) -> None:
    with trio.fail_after(5):
        try:
            assert await stream.receive_some(65536) == b""
        except trio.BrokenResourceError:
            pass


# ---- every op through the CLI ----


async def test_list_human(ctl: tuple[FakeTarget, ControlServer]) -> None:
    target, server = ctl
    rc, out, err = await cli(server, "list")
    assert (rc, err) == (EXIT_OK, "")
    lines = out.splitlines()
    assert lines[0] == "PHB 0 (phb3, kvm-strict, pages 4K 64K 2M 16M, dma_fault freeze)"
    assert lines[1] == "\\-PE 0 domain0-pe0 [normal] container"
    assert lines[2].startswith(
        f"  \\-00:00.0 pf0 (pf, 0/4 VFs) {target.sock_dir}/pf0.sock client pid 4242 uid 0 since "
    )
    assert lines[3] == "Functions without a PE:"
    assert lines[4] == f"  00:03.7 loose0 (function) {target.sock_dir}/loose0.sock no client"


async def test_list_json_is_the_inventory(ctl: tuple[FakeTarget, ControlServer]) -> None:
    target, server = ctl
    rc, out, _ = await cli(server, "list", "--json")
    assert rc == EXIT_OK
    assert json.loads(out) == json.loads(json.dumps(target.inventory()))
    rc, out2, _ = await cli(server, "--json", "list")  # either position
    assert out2 == out


async def test_set_numvfs_and_tree(ctl: tuple[FakeTarget, ControlServer]) -> None:
    target, server = ctl
    rc, out, _ = await cli(server, "set-numvfs", "pf0", "2")
    assert (rc, out) == (EXIT_OK, "pf0: 2 VFs enabled: pf0v0 pf0v1\n")
    rc, out, _ = await cli(server, "list")
    assert "+-PE 0 domain0-pe0 [normal] container" in out
    assert "+-PE 1 domain0-pe1 [normal]\n|" in out
    assert "\\-PE 2 domain0-pe2 [normal]\n  \\-00:00.2 pf0v1 (vf of pf0)" in out
    assert "00:00.0 pf0 (pf, 2/4 VFs)" in out

    rc, _, err = await cli(server, "set-numvfs", "pf0", "3")
    assert rc == EXIT_ERROR and err == "vfiodctl: EBUSY: pf0 has 2 VFs: set 0 first\n"
    rc, out, _ = await cli(server, "set-numvfs", "pf0", "0", "--json")
    assert rc == EXIT_OK and json.loads(out) == {"pf": "pf0", "numvfs": 0, "vfs": []}
    rc, out, _ = await cli(server, "set-numvfs", "pf0", "0")
    assert out == "pf0: VFs disabled\n"
    assert [p["pe"] for p in target.inventory()["phbs"][0]["pes"]] == [0]


@pytest.mark.parametrize(
    "argv,err",
    [
        (["set-numvfs", "pf0", "5"], "vfiodctl: EINVAL: pf0 has at most 4 VFs\n"),
        (["set-numvfs", "nope", "1"], "vfiodctl: ENOENT: no function nope\n"),
        (["set-numvfs", "loose0", "1"], "vfiodctl: EINVAL: loose0 is not a PF\n"),
        (["pe", "0:9"], "vfiodctl: ENOENT: PHB 0 has no PE 9\n"),
        (["pe", "7:0"], "vfiodctl: ENOENT: no PHB 7\n"),
        (["pe", "loose0"], "vfiodctl: ENOENT: function loose0 has no PE\n"),
        (["pe", "ghost"], "vfiodctl: ENOENT: no function ghost\n"),
        (["eeh", "ghost", "state"], "vfiodctl: ENOENT: no function ghost\n"),
        (
            ["eeh", "pf0", "inject", "--type", "64", "--func", "20"],
            "vfiodctl: EINVAL: eeh inject on PE 0:0: bad error function 20\n",
        ),
    ],
)
async def test_daemon_errors_exit_1(
    ctl: tuple[FakeTarget, ControlServer], argv: list[str], err: str
) -> None:
    rc, out, e = await cli(ctl[1], *argv)
    assert (rc, out, e) == (EXIT_ERROR, "", err)


async def test_pe_info(ctl: tuple[FakeTarget, ControlServer]) -> None:
    target, server = ctl
    assert (await cli(server, "set-numvfs", "pf0", "1"))[0] == EXIT_OK
    pe = target.functions["pf0v0"].pe
    assert pe is not None
    target.phb.h_put_tce(pe.liobn(0), 0x1000, 0x1000_0000 | 3)
    rc, out, _ = await cli(server, "pe", "0:1")
    assert rc == EXIT_OK
    lines = out.splitlines()
    assert lines[0] == "PE 0:1  group domain0-pe1 (id 1)  function pf0v0"
    assert lines[1] == "EEH        normal (0): running"
    assert lines[2] == "Container  none"
    assert lines[3].split() == [
        "SLOT",
        "LIOBN",
        "BUS",
        "OFFSET",
        "PAGE",
        "SIZE",
        "ENTRIES",
        "TCES",
        "IN",
        "USE",
        "TABLE",
    ]
    assert lines[4].split() == ["0*", "0x80010000", "0x0", "4K", "2G", "524288", "1", "4K"]
    rc, by_name, _ = await cli(server, "pe", "pf0v0")
    assert by_name == out
    rc, js, _ = await cli(server, "pe", "0x0:0x1", "--json")
    info = json.loads(js)
    assert info["windows"][0]["tces_in_use"] == 1 and info["function"] == "pf0v0"
    # the PF's PE belongs to a v2 container whose default window is still pending
    rc, out, _ = await cli(server, "pe", "pf0")
    assert out.splitlines()[2:] == [
        "Container  v2, groups domain0-pe0, not enabled, accounted 0",
        "Windows    none",
    ]


async def test_eeh_ops(ctl: tuple[FakeTarget, ControlServer]) -> None:
    _, server = ctl

    async def eeh(*argv: str) -> str:
        rc, out, err = await cli(server, "eeh", *argv)
        assert (rc, err) == (EXIT_OK, "")
        return out

    assert await eeh("pf0", "state") == "pf0 (PE 0:0): EEH state normal (0)\n"
    out = await eeh("pf0", "inject", "--type", "32", "--func", "0x3", "--addr", "0x1000")
    assert out == "pf0 (PE 0:0): inject done; EEH state stopped-io-dma (2)\n"
    assert await eeh("0:0", "state") == "0:0 (pf0, PE 0:0): EEH state stopped-io-dma (2)\n"
    assert (await eeh("pf0", "thaw-io")).endswith("stopped-dma (4)\n")
    assert (await eeh("pf0", "thaw-dma")).endswith("normal (0)\n")
    assert (await eeh("pf0", "reset")).endswith("reset (1)\n")
    assert (await eeh("pf0", "deactivate")).endswith("normal (0)\n")
    assert (await eeh("pf0", "reset", "--fundamental")).endswith("reset (1)\n")
    assert (await eeh("pf0", "deactivate")).endswith("normal (0)\n")
    assert (await eeh("pf0", "configure")).endswith("normal (0)\n")
    await eeh("pf0", "inject", "--type", "1", "--func", "19")
    assert (await eeh("pf0", "thaw")).endswith("normal (0)\n")
    js = json.loads(await eeh("pf0", "state", "--json"))
    assert js == {
        "target": "pf0",
        "function": "pf0",
        "phb": 0,
        "pe": 0,
        "op": "state",
        "result": 0,
        "eeh_state": 0,
        "eeh_state_name": "normal",
    }
    rc, out, _ = await cli(server, "pe", "pf0", "--json")
    assert json.loads(out)["eeh"]["injected"] == [
        {"type": 0, "func": 3, "addr": 0x1000, "mask": 0},
        {"type": 1, "func": 19, "addr": 0, "mask": 0},
    ]


async def test_memlock(ctl: tuple[FakeTarget, ControlServer]) -> None:
    target, server = ctl
    target.qemu.account(target.qemu.pages(3 << 30))
    rc, out, _ = await cli(server, "memlock")
    assert rc == EXIT_OK
    lines = out.splitlines()
    assert lines[0].split() == [
        "PID",
        "UID",
        "NAME",
        "FUNCTIONS",
        "LOCKED",
        "LIMIT",
        "REGIONS",
        "CONTAINERS",
    ]
    assert lines[1].split() == ["4242", "0", "qemu-guest0", "pf0", "3G", "8G", "0", "1"]
    rc, out, _ = await cli(server, "memlock", "--json")
    [c] = json.loads(out)
    assert c["locked_bytes"] == 3 << 30 and c["limit"] == 8 << 30 and c["pid"] == 4242


async def test_metrics_and_internal_errors(ctl: tuple[FakeTarget, ControlServer]) -> None:
    target, server = ctl
    rc, out, _ = await cli(server, "metrics")
    assert (rc, out) == (EXIT_OK, "# TYPE vfiod_functions gauge\nvfiod_functions 2\n")
    target.fail_metrics = True
    rc, out, err = await cli(server, "metrics")
    assert rc == EXIT_ERROR
    assert err == "vfiodctl: EIO: internal error in metrics (see the log)\n"
    assert (await cli(server, "list"))[0] == EXIT_OK  # the server is still there


# ---- exit codes and usage ----


async def test_cannot_connect_exit_3(sock_dir: Path) -> None:
    rc, out, err = await cli(sock_dir / "absent.sock", "list")
    assert rc == EXIT_CONNECT and out == ""
    assert err.startswith(f"vfiodctl: cannot connect to {sock_dir}/absent.sock: ")
    assert "is vfiod running?" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["set-numvfs", "pf0"],
        ["set-numvfs", "pf0", "two"],
        ["set-numvfs", "pf0", "-1"],
        ["pe"],
        ["eeh", "pf0"],
        ["eeh", "pf0", "explode"],
        ["eeh", "pf0", "inject", "--func", "1"],
        ["eeh", "pf0", "inject", "--type", "7", "--func", "1"],
        ["eeh", "pf0", "reset", "--warm"],
        ["list", "extra"],
        ["--timeout", "soon", "list"],
    ],
)
def test_usage_errors_exit_2(argv: list[str]) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert main(["--socket", "/nonexistent/x.sock", *argv], stdout=out, stderr=err) == EXIT_USAGE
    assert out.getvalue() == ""
    assert err.getvalue().startswith("vfiodctl") and err.getvalue().count("\n") == 1


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["pe", "bad name"], "pe_info: function must be a function name, got 'bad name'"),
        (["set-numvfs", "pf0", "70000"], "set_numvfs: numvfs must be an integer in 0..65535"),
        (["eeh", "0:1:2", "state"], "eeh: target must be a function name or PHB:PE"),
    ],
)
def test_local_validation_is_usage(argv: list[str], msg: str) -> None:
    # checked by the wire layer before connecting: usage (2), not "cannot connect" (3)
    err = io.StringIO()
    assert main(["--socket", "/nonexistent/x.sock", *argv], stderr=err) == EXIT_USAGE
    assert err.getvalue().startswith(f"vfiodctl: {msg}")


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["list"],
        ["set-numvfs"],
        ["pe"],
        ["eeh"],
        ["eeh", "pf0", "inject"],
        ["eeh", "pf0", "reset"],
        ["memlock"],
        ["metrics"],
    ],
)
def test_help_everywhere(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--help"]) == EXIT_OK
    assert capsys.readouterr().out.startswith("usage: vfiodctl")


async def test_console_script(ctl: tuple[FakeTarget, ControlServer], sock_dir: Path) -> None:
    _, server = ctl
    r = await trio.run_process(
        [str(VFIODCTL), "--socket", str(server.path), "list", "--json"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert r.returncode == 0 and json.loads(r.stdout)["version"] == 1
    r = await trio.run_process(
        [str(VFIODCTL), "--socket", str(sock_dir / "nope.sock"), "list"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert r.returncode == EXIT_CONNECT and b"cannot connect" in r.stderr
    env = dict(os.environ, VFIOD_CONTROL_SOCKET=str(server.path))
    r = await trio.run_process(
        [str(VFIODCTL), "eeh", "pf0", "state"], capture_stdout=True, check=False, env=env
    )
    assert r.returncode == 0 and r.stdout == b"pf0 (PE 0:0): EEH state normal (0)\n"


# ---- the socket file ----


async def test_socket_mode_and_cleanup(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"
    async with trio.open_nursery() as nursery:
        started = await nursery.start(serve_control, FakeTarget(sock_dir), path)
        assert started == path
        st = path.stat()
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == os.geteuid()
        assert sorted(p.name for p in sock_dir.iterdir()) == ["control.sock"]
        nursery.cancel_scope.cancel()
    assert not path.exists()


async def test_stale_socket_replaced_live_one_refused(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a dead daemon's socket file
    async with trio.open_nursery() as nursery:
        target, server = await _start(nursery, sock_dir)
        assert (await cli(server, "metrics"))[0] == EXIT_OK
        with pytest.raises(OSError) as e:
            await serve_control(target, path)  # a second daemon on the same path
        assert "served by another process" in str(e.value)
        assert (await cli(server, "metrics"))[0] == EXIT_OK
        nursery.cancel_scope.cancel()
    path.write_text("not a socket")
    with pytest.raises(OSError) as e:
        await serve_control(FakeTarget(sock_dir), path)
    assert "not a socket" in str(e.value)


# ---- peer credentials ----


async def test_refused_uid_gets_eperm_and_server_serves_others(sock_dir: Path) -> None:
    other = os.geteuid() + 4711
    async with trio.open_nursery() as nursery:
        _, server = await _start(nursery, sock_dir, allowed_uids={other})
        rc, out, err = await cli(server, "list")
        assert rc == EXIT_ERROR and out == ""
        assert err == f"vfiodctl: EPERM: uid {os.geteuid()} may not control this daemon\n"
        s = await raw(server)
        reply = await read_reply(s)
        assert reply == {
            "id": None,
            "ok": False,
            "error": {
                "code": "EPERM",
                "message": f"uid {os.geteuid()} may not control this daemon",
            },
        }
        await assert_closed(s)
        assert server.refused_total == 2 and server.connections == 0
        server.allowed_uids = frozenset({other, os.geteuid()})
        assert (await cli(server, "list"))[0] == EXIT_OK
        nursery.cancel_scope.cancel()


def _connect_as(uid: int, path: Path) -> bytes:
    """Fork, drop to ``uid``, send one request on ``path``; the bytes received, or the errno."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: only plain syscalls, then _exit
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.settimeout(5)
            try:
                c.connect(str(path))
            except OSError as exc:
                os.write(wfd, f"errno {exc.errno}".encode())
                os._exit(0)
            try:
                c.sendall(encode_request(1, "inventory"))
            except OSError:
                pass  # refused and closed already: the reply is still queued for us
            data = b""
            try:
                while chunk := c.recv(65536):
                    data += chunk
            except ConnectionResetError:
                pass
            os.write(wfd, data)
        finally:
            os._exit(0)
    os.close(wfd)
    out = b""
    while chunk := os.read(rfd, 65536):
        out += chunk
    os.close(rfd)
    os.waitpid(pid, 0)
    return out


NOBODY = 65534


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
async def test_other_uid_refused_root_served(sock_dir: Path) -> None:
    """A real second uid on a world-writable socket: only the peer check stops it."""
    sock_dir.chmod(0o755)
    async with trio.open_nursery() as nursery:
        _, server = await _start(nursery, sock_dir, mode=0o666)
        got = await trio.to_thread.run_sync(_connect_as, NOBODY, server.path)
        assert json.loads(got) == {
            "id": None,
            "ok": False,
            "error": {"code": "EPERM", "message": f"uid {NOBODY} may not control this daemon"},
        }
        assert server.refused_total == 1
        assert (await cli(server, "list"))[0] == EXIT_OK
        nursery.cancel_scope.cancel()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
async def test_default_mode_keeps_other_uids_out(sock_dir: Path) -> None:
    sock_dir.chmod(0o755)
    async with trio.open_nursery() as nursery:
        _, server = await _start(nursery, sock_dir)
        got = await trio.to_thread.run_sync(_connect_as, NOBODY, server.path)
        assert got == f"errno {errno.EACCES}".encode()
        assert server.refused_total == 0
        nursery.cancel_scope.cancel()


# ---- hostile clients ----


async def test_garbage_gets_eproto_then_close(ctl: tuple[FakeTarget, ControlServer]) -> None:
    _, server = ctl
    s = await raw(server)
    await s.send_all(b"\x00\xffhello\n")
    reply = await read_reply(s)
    assert reply["id"] is None and reply["error"]["code"] == "EPROTO"
    await assert_closed(s)
    assert (await cli(server, "list"))[0] == EXIT_OK


async def test_huge_line_gets_e2big_then_close(ctl: tuple[FakeTarget, ControlServer]) -> None:
    _, server = ctl
    s = await raw(server)
    with trio.move_on_after(2):
        try:
            await s.send_all(b"{" + b" " * (MAX_REQUEST_LINE + 10))
        except trio.BrokenResourceError:
            pass
    reply = await read_reply(s)
    assert reply["error"]["code"] == "E2BIG"
    await assert_closed(s)
    assert (await cli(server, "list"))[0] == EXIT_OK


async def test_half_line_then_disconnect(ctl: tuple[FakeTarget, ControlServer]) -> None:
    _, server = ctl
    for _ in range(20):
        s = await raw(server)
        await s.send_all(b'{"id": 1, "op": "inv')
        await s.aclose()
    s = await raw(server)
    await s.send_all(encode_request(1, "inventory")[:5])
    s.socket.close()
    assert (await cli(server, "list"))[0] == EXIT_OK
    await trio.testing.wait_all_tasks_blocked()
    assert server.connections == 0


async def test_bad_requests_keep_the_connection(ctl: tuple[FakeTarget, ControlServer]) -> None:
    _, server = ctl
    s = await raw(server)
    await s.send_all(b'{"id": 1, "op": "reboot"}\n')
    assert (await read_reply(s))["error"]["code"] == "EINVAL"
    await s.send_all(b'{"id": 2, "op": "set_numvfs", "args": {"pf": "pf0", "numvfs": true}}\n')
    r = await read_reply(s)
    assert r["id"] == 2 and r["error"]["code"] == "EINVAL"
    # two requests in one write, replies in order
    await s.send_all(
        encode_request(3, "metrics") + encode_request(4, "eeh", {"target": "ghost", "op": "state"})
    )
    buf = b""
    with trio.fail_after(5):
        while buf.count(b"\n") < 2:
            buf += await s.receive_some(65536)
    r3, r4 = (json.loads(x) for x in buf.splitlines())
    assert (r3["id"], r3["ok"]) == (3, True)
    assert (r4["id"], r4["error"]["code"]) == (4, "ENOENT")
    await s.aclose()


async def test_concurrent_clients_and_slow_ops(ctl: tuple[FakeTarget, ControlServer]) -> None:
    target, server = ctl
    target.slow_numvfs = 0.5
    results: dict[str, Any] = {}

    async def slow() -> None:
        results["slow"] = await cli(server, "set-numvfs", "pf0", "3")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow)
        await trio.sleep(0.1)
        with trio.fail_after(0.4):  # not queued behind the slow one
            results["fast"] = await cli(server, "metrics")
    assert results["fast"][0] == EXIT_OK
    assert results["slow"][:2] == (EXIT_OK, "pf0: 3 VFs enabled: pf0v0 pf0v1 pf0v2\n")


async def test_idle_and_connection_limits(sock_dir: Path) -> None:
    async with trio.open_nursery() as nursery:
        _, server = await _start(nursery, sock_dir, max_connections=2, idle_timeout=0.5)
        held = []
        for i in range(2):
            s = await raw(server)
            await s.send_all(encode_request(i, "metrics"))
            assert (await read_reply(s))["ok"]
            held.append(s)
        third = await raw(server)
        reply = await read_reply(third)
        assert reply["error"]["code"] == "EBUSY"
        await assert_closed(third)
        for s in held:  # idle: closed by the server
            await assert_closed(s)
        assert (await cli(server, "list"))[0] == EXIT_OK
        nursery.cancel_scope.cancel()


async def test_client_that_never_reads(sock_dir: Path) -> None:
    async with trio.open_nursery() as nursery:
        target, server = await _start(nursery, sock_dir)
        server.send_timeout = 0.5
        s = await raw(server)
        with trio.move_on_after(1.0):
            try:
                while True:
                    await s.send_all(encode_request(1, "inventory") * 200)
            except trio.BrokenResourceError:
                pass  # the server gave up on us first
        rc, _, _ = await cli(server, "list")
        assert rc == EXIT_OK
        with trio.fail_after(5):
            while server.connections:
                await trio.sleep(0.05)
        s.socket.close()
        nursery.cancel_scope.cancel()
