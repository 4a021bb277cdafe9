"""vfiod.config: every problem of a file is reported at once; the embedded default; paths
relative to the state directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vfiod import config


def problems(text: str) -> list[str]:
    with pytest.raises(config.ConfigError) as info:
        config.parse(text, "t.toml")
    return info.value.problems


def test_bad_phb_index_and_bad_window_policy_are_both_reported() -> None:
    found = problems('[[phb]]\nindex = 999\nwindow_policy = "wide"\npage_sizes = ["3K"]\n'
                     '[[function]]\nname = "a"\n')
    text = "\n".join(found)
    assert "phb[0].index" in text
    assert "phb[0].window_policy" in text and "'wide'" in text
    assert "phb[0].page_sizes" in text
    assert len(found) == 3, found


def test_a_phb_with_a_bad_policy_still_counts_for_its_functions() -> None:
    # function[0].phb names PHB 1, whose window_policy is wrong: one problem, not two.
    found = problems('[[phb]]\nindex = 0\nwindow_policy = "flat"\n'
                     '[[phb]]\nindex = 1\nwindow_policy = "nope"\n'
                     '[[function]]\nname = "a"\nphb = 1\n')
    assert found == ["phb[1].window_policy: 'nope' is not one of power8, flat"]


def test_every_key_of_a_function_is_checked() -> None:
    found = problems('[[function]]\nname = "has space"\npersonality = "gpu"\nphb = 7\n'
                     'totalvfs = 100\nnumvfs = -1\nsocket_mode = "0999"\ncolour = "red"\n')
    text = "\n".join(found)
    for key in ("name", "personality", "phb", "totalvfs", "numvfs", "socket_mode", "colour"):
        assert f"function[0].{key}" in text, (key, found)


def test_nvme_problems_are_all_reported() -> None:
    found = problems('[[function]]\nname = "n"\npersonality = "nvme"\nsize = "3K"\n'
                     'totalvfs = 2\nnumvfs = 3\nvf_backing = "/x/no-placeholder"\n')
    text = "\n".join(found)
    for key in ("backing", "size", "numvfs", "vf_backing"):
        assert f"function[0].{key}" in text, (key, found)


def test_problems_of_several_functions_and_top_level_together() -> None:
    found = problems('memlock_limit = "lots"\n[[phb]]\nindex = -1\n'
                     '[[function]]\nname = "a"\npersonality = "x"\n'
                     '[[function]]\nname = "a"\n[[function]]\nname = "b"\nnumvfs = 1\n')
    text = "\n".join(found)
    for needle in ("memlock_limit", "phb[0].index", "function[0].personality",
                   "function[2].numvfs"):
        assert needle in text, (needle, found)


def test_check_config_cli_prints_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[phb]]\nindex = "zero"\nwindow_policy = "wide"\n'
                   '[[function]]\nname = "a"\npersonality = "nvme"\n')
    out = subprocess.run([sys.executable, "-m", "vfiod", "--check-config", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert any("phb[0].index" in line for line in lines), out.stderr
    assert any("phb[0].window_policy" in line for line in lines), out.stderr
    assert any("function[0].backing" in line for line in lines), out.stderr
    assert all(line.startswith(f"{bad}: ") for line in lines), out.stderr


def test_relative_backing_lives_in_the_state_directory(tmp_path: Path) -> None:
    text = ('state_dir = "/srv/vfiod"\n[[function]]\nname = "n"\npersonality = "nvme"\n'
            'backing = "disks/n.img"\nsize = "1M"\ntotalvfs = 1\nvf_backing = "vf{n}.img"\n')
    parsed = config.parse(text, "t.toml")
    assert parsed.functions[0].backing == Path("/srv/vfiod/disks/n.img")
    assert parsed.functions[0].vf_backing == "/srv/vfiod/vf{n}.img"
    # --state-dir overrides the file's state_dir, relative paths follow it
    moved = config.parse(text, "t.toml", state_dir=tmp_path)
    assert moved.state_dir == tmp_path
    assert moved.functions[0].backing == tmp_path / "disks" / "n.img"
    absolute = config.parse(text.replace("disks/n.img", "/abs/n.img"), "t.toml",
                            state_dir=tmp_path)
    assert absolute.functions[0].backing == Path("/abs/n.img")


def test_embedded_default_is_sriov_nvme_on_a_flat_and_a_power8_phb(tmp_path: Path) -> None:
    cfg = config.load(state_dir=tmp_path)
    assert [(p.index, p.window_policy) for p in cfg.phbs] == [(0, "flat"), (1, "power8")]
    nvme = [f for f in cfg.functions if f.personality == "nvme"]
    assert sorted(f.phb for f in nvme) == [0, 1]
    for f in nvme:
        assert f.numvfs == 2 and f.totalvfs >= 2
        assert f.backing is not None and f.backing.parent == tmp_path
    # the test function stays available
    assert any(f.personality == "testdev" for f in cfg.functions)


def test_dma_fault_policy_defaults_per_window_policy_and_is_checked() -> None:
    parsed = config.parse(
        '[[phb]]\nindex = 0\nwindow_policy = "flat"\n'
        '[[phb]]\nindex = 1\nwindow_policy = "power8"\n'
        '[[phb]]\nindex = 2\nwindow_policy = "flat"\ndma_fault = "freeze"\n'
        '[[function]]\nname = "t"\npersonality = "testdev"\n',
        "test",
    )
    assert [p.fault_policy for p in parsed.phbs] == ["error", "freeze", "freeze"]
    with pytest.raises(config.ConfigError) as exc:
        config.parse('[[phb]]\nindex = 0\ndma_fault = "ignore"\n'
                     '[[function]]\nname = "t"\npersonality = "testdev"\n', "test")
    assert exc.value.problems == ["phb[0].dma_fault: 'ignore' is not one of freeze, error"]
