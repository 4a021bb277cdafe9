"""Socket access control: owner/group/mode from the config, SO_PEERCRED allow-lists."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import trio

from vfiod import client, config
from vfiod.client import VfioUserError, from_little
from vfiod.daemon import Daemon
from vfiod.devices import testdev as td

ME = os.getuid()


def build(tmp_path: Path, text: str) -> Daemon:
    parsed = config.parse('[[phb]]\nindex = 0\nwindow_policy = "flat"\n' + text, "test")
    return Daemon(config.Config(tmp_path, parsed.functions, phbs=parsed.phbs))


async def test_socket_mode_owner_group_and_allow_list(tmp_path: Path) -> None:
    d = build(tmp_path, f"""
[[function]]
name = "open"
personality = "testdev"
socket_mode = "0660"
socket_group = {os.getgid()}
allowed_uids = [{ME}]

[[function]]
name = "closed"
personality = "testdev"
allowed_uids = [{ME + 4242}]

[[function]]
name = "pf"
personality = "testdev"
totalvfs = 2
numvfs = 2
socket_mode = "0600"
vf_access = [{{ socket_mode = "0666", allowed_uids = [{ME + 1}] }}]
""")
    async with trio.open_nursery() as nursery:
        await nursery.start(d.run)
        st = os.stat(tmp_path / "open.sock")
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getgid()
        assert stat.S_IMODE(os.stat(tmp_path / "closed.sock").st_mode) == 0o600
        async with client.connect(tmp_path / "open.sock") as dev:
            assert from_little(await dev.config_read(0, 2)) == td.TEST_VENDOR_ID
        with pytest.raises(VfioUserError) as info:
            async with client.connect(tmp_path / "closed.sock"):
                pass
        assert info.value.errno == errno.EPERM
        assert d.host.slot("closed").endpoint.refused_total == 1
        # VF 0 has its own access; VF 1 inherits the PF's
        assert stat.S_IMODE(os.stat(tmp_path / "pf-vf0.sock").st_mode) == 0o666
        assert stat.S_IMODE(os.stat(tmp_path / "pf-vf1.sock").st_mode) == 0o600
        with pytest.raises(VfioUserError):
            async with client.connect(tmp_path / "pf-vf0.sock"):
                pass
        async with client.connect(tmp_path / "pf-vf1.sock") as dev:
            assert from_little(await dev.config_read(0, 2)) == td.TEST_VENDOR_ID
        nursery.cancel_scope.cancel()


def test_bad_access_settings_are_reported() -> None:
    with pytest.raises(config.ConfigError) as info:
        config.parse(
            '[[function]]\nname = "a"\npersonality = "testdev"\nsocket_mode = "0999"\n'
            'socket_owner = "no-such-user-xyz"\nsocket_group = "no-such-group-xyz"\n'
            'allowed_uids = ["no-such-user-xyz"]\n',
            "t.toml",
        )
    text = "\n".join(info.value.problems)
    for key in ["socket_mode", "socket_owner", "socket_group", "allowed_uids"]:
        assert f"function[0].{key}" in text


def test_vf_backing_template(tmp_path: Path) -> None:
    from vfiod.host import vf_config

    parsed = config.parse(
        '[[function]]\nname = "pf"\npersonality = "nvme"\n'
        f'backing = "{tmp_path}/pf.img"\nsize = "1M"\ntotalvfs = 2\n'
        f'vf_backing = "{tmp_path}/vfs/ns{{n}}.raw"\n',
        "t.toml",
    )
    assert vf_config(parsed.functions[0], 1).backing == tmp_path / "vfs" / "ns1.raw"
    with pytest.raises(config.ConfigError) as info:
        config.parse('[[function]]\nname = "t"\npersonality = "testdev"\n'
                     'vf_backing = "/x/{n}"\n', "t.toml")
    assert "function[0].vf_backing" in info.value.problems[0]
