"""The JSON objects built from real spapr objects, and the EEH op mapping."""

from __future__ import annotations

import errno
import json

import pytest

from vfiod import spapr
from vfiod.control import describe
from vfiod.control.api import ControlError, ControlTarget, eeh_state_name, parse_pe_ref

MEM = 0x1000_0000


def make_phb() -> spapr.Phb:
    phb = spapr.Phb(index=0)
    phb.memory.add(MEM, 1 << 20, bytearray(1 << 20))
    return phb


def test_fresh_pe_has_the_default_window() -> None:
    phb = make_phb()
    pe = phb.new_pe()
    info = describe.pe_info(pe, "pf0")
    json.dumps(info)  # JSON-able
    assert info["phb"] == 0 and info["pe"] == 0 and info["function"] == "pf0"
    assert info["group"] == "domain0-pe0"
    assert info["eeh_state"] == 0 and info["eeh_state_name"] == "normal"
    assert info["container"] is None
    [w] = info["windows"]
    assert w["slot"] == 0 and w["liobn"] == 0x8000_0000 and w["default"]
    assert w["bus_offset"] == 0 and w["page_shift"] == 12 and w["size"] == 2 << 30
    assert w["entries"] == (2 << 30) >> 12
    assert w["tces_in_use"] == 0 and w["table_bytes"] == 0


def test_tces_in_use_counts_valid_entries() -> None:
    phb = make_phb()
    pe = phb.new_pe()
    pe2 = phb.new_pe()
    for i in range(3):
        rc = phb.h_put_tce(pe2.liobn(0), i << 12, (MEM + (i << 12)) | spapr.TCE_READ)
        assert rc == spapr.H_SUCCESS
    assert describe.pe_info(pe2, None)["windows"][0]["tces_in_use"] == 3
    assert describe.pe_info(pe2, None)["windows"][0]["liobn"] == 0x8001_0000
    assert describe.pe_info(pe, None)["windows"][0]["tces_in_use"] == 0


def test_phb_summary() -> None:
    phb = make_phb()
    phb.new_pes(3)
    d = describe.describe_phb(phb, {1: "vf0"})
    assert d["hcall_mode"] == "kvm-strict"
    assert d["page_sizes"] == [4096, 65536, 2 << 20, 16 << 20]
    assert [p["pe"] for p in d["pes"]] == [0, 1, 2]
    assert [p["function"] for p in d["pes"]] == [None, "vf0", None]
    assert d["pes"][1]["liobns"] == [0x8001_0000]
    assert describe.describe_phb(spapr.Phb(1, qemu_compat=True), {})["hcall_mode"] == (
        "qemu-compat"
    )


def test_eeh_recovery_sequence() -> None:
    pe = make_phb().new_pe()
    r = describe.run_eeh_op(pe, "inject", target="pf0", function="pf0", type=0, func=3)
    assert r["eeh_state"] == 2 and r["op"] == "inject"
    assert describe.pe_info(pe, None)["eeh"]["injected"] == [
        {"type": 0, "func": 3, "addr": 0, "mask": 0}
    ]
    assert describe.run_eeh_op(pe, "thaw-io", target="x", function=None)["eeh_state"] == 4
    assert describe.run_eeh_op(pe, "thaw-dma", target="x", function=None)["eeh_state"] == 0
    pe.freeze()
    assert describe.run_eeh_op(pe, "state", target="x", function=None)["result"] == 2
    assert describe.run_eeh_op(pe, "thaw", target="x", function=None)["eeh_state"] == 0
    assert describe.run_eeh_op(pe, "reset-hot", target="x", function=None)["eeh_state"] == 1
    assert describe.run_eeh_op(pe, "deactivate", target="x", function=None)["eeh_state"] == 0
    assert (
        describe.run_eeh_op(pe, "reset-fundamental", target="x", function=None)["eeh_state_name"]
        == "reset"
    )
    assert describe.run_eeh_op(pe, "deactivate", target="x", function=None)["eeh_state"] == 0
    assert describe.run_eeh_op(pe, "configure", target="x", function=None)["result"] == 0


@pytest.mark.parametrize(
    "op,args,code",
    [
        ("inject", {"type": 2, "func": 0}, "EINVAL"),
        ("inject", {"type": 0, "func": 20}, "EINVAL"),
        ("inject", {"type": 0}, "EINVAL"),
        ("state", {"type": 0}, "EINVAL"),
        ("explode", {}, "EINVAL"),
    ],
)
def test_eeh_errors(op: str, args: dict[str, int], code: str) -> None:
    pe = make_phb().new_pe()
    with pytest.raises(ControlError) as e:
        describe.run_eeh_op(pe, op, target="x", function=None, **args)
    assert e.value.code == code


def test_eeh_platform_without_injection_is_enoent() -> None:
    pe = spapr.Phb(0, eeh_inject=False).new_pe()
    with pytest.raises(ControlError) as e:
        describe.run_eeh_op(pe, "inject", target="x", function=None, type=0, func=0)
    assert e.value.code == "ENOENT"


def test_memlock_of_a_v2_client() -> None:
    phb = make_phb()
    client = spapr.Client(memlock_limit=8 << 30, name="q")
    c = spapr.Container(spapr.VFIO_SPAPR_TCE_v2_IOMMU, client)
    c.attach_group(phb.new_pe().group)
    c.register_memory(0, 1 << 30)
    d = describe.describe_memlock(client, pid=1, uid=0, functions=["b", "a"])
    json.dumps(d)
    assert d["functions"] == ["a", "b"]
    assert d["locked_bytes"] == client.locked_bytes == 1 << 30
    assert d["limit"] == 8 << 30
    assert d["regions"] == [
        {
            "vaddr": 0,
            "size": 1 << 30,
            "page_shift": d["regions"][0]["page_shift"],
            "groups": ["domain0-pe0"],
        }
    ]
    assert d["containers"][0]["type"] == "v2" and d["containers"][0]["groups"] == ["domain0-pe0"]


def test_find_pe() -> None:
    phb = make_phb()
    pe = phb.new_pe()
    assert describe.find_pe([phb], 0, 0) is pe
    for ref in ((0, 5), (3, 0)):
        with pytest.raises(ControlError) as e:
            describe.find_pe([phb], *ref)
        assert e.value.code == "ENOENT"


def test_api_helpers() -> None:
    assert parse_pe_ref("0:1") == (0, 1)
    assert parse_pe_ref("0x1:0x1f") == (1, 31)
    assert parse_pe_ref("pf0") is None and parse_pe_ref("0:") is None
    assert eeh_state_name(2) == "stopped-io-dma" and eeh_state_name(9) == "state-9"
    e = ControlError.from_oserror(OSError(errno.EBUSY, "group busy"), "attach")
    assert (e.code, e.message) == ("EBUSY", "attach: group busy")
    assert ControlError.from_oserror(OSError(errno.EOPNOTSUPP, "x")).code == "ENOTSUP"
    with pytest.raises(ValueError):
        ControlError("lowercase", "m")


def test_fake_is_a_control_target(tmp_path: object) -> None:
    from control_fake import FakeTarget

    assert isinstance(FakeTarget(tmp_path), ControlTarget)  # type: ignore[arg-type]
