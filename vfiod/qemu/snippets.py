"""Guest shell snippets (busybox sh) and host-side parsers for what they print."""

from __future__ import annotations

from dataclasses import dataclass

from .guest import GuestResult

__all__ = [
    "PCI_DUMP",
    "PciDeviceInfo",
    "parse_pci_dump",
    "section",
]


def section(name: str, command: str) -> str:
    """Shell lines that print the output of `command` as section `name`."""
    return f"echo '@@BEGIN {name}'\n{command}\necho '@@END {name}'\n"


#: For every device in /sys/bus/pci/devices, a section "pci <address>" with lines
#: "vendor: 0x..", "device:", "subsystem_vendor:", "subsystem_device:", "class:", "irq:",
#: "driver:", "resource: <start> <end> <flags>" (one per line of the sysfs file) and
#: "config: xx xx .." (the config space as od prints it, 16 bytes a line).
PCI_DUMP = r"""
for d in /sys/bus/pci/devices/*; do
    [ -e "$d/config" ] || continue
    a=${d##*/}
    echo "@@BEGIN pci $a"
    for f in vendor device subsystem_vendor subsystem_device class irq; do
        [ -r "$d/$f" ] && echo "$f: $(cat "$d/$f")"
    done
    if [ -e "$d/driver" ]; then echo "driver: $(basename "$(readlink "$d/driver")")"; fi
    while read -r line; do echo "resource: $line"; done < "$d/resource"
    od -An -tx1 -v "$d/config" | while read -r line; do echo "config: $line"; done
    echo "@@END pci $a"
done
"""


@dataclass
class PciDeviceInfo:
    address: str                                  # 0000:00:02.0
    vendor: int
    device: int
    class_code: int                               # 24-bit, e.g. 0x010802 for NVMe
    irq: int
    subsystem_vendor: int | None
    subsystem_device: int | None
    driver: str | None
    resources: list[tuple[int, int, int]]         # (start, end, flags); BARs 0-5, ROM, ...
    config: bytes

    def bar(self, index: int) -> tuple[int, int, int]:
        return self.resources[index]

    def bar_size(self, index: int) -> int:
        start, end, _flags = self.resources[index]
        return 0 if end == 0 and start == 0 else end - start + 1

    def capabilities(self) -> list[tuple[int, int]]:
        """(capability id, offset) of the standard capability list, in list order."""
        cfg = self.config
        if len(cfg) < 0x40 or not (cfg[0x06] & 0x10):  # status: capabilities list
            return []
        caps: list[tuple[int, int]] = []
        ptr = cfg[0x34] & 0xFC
        while ptr and ptr + 1 < len(cfg) and len(caps) < 48:
            caps.append((cfg[ptr], ptr))
            ptr = cfg[ptr + 1] & 0xFC
        return caps

    def capability(self, cap_id: int) -> int | None:
        """Offset of the first capability `cap_id` (0x11 MSI-X, 0x05 MSI, 0x10 PCIe, 0x01 PM)."""
        return next((off for cid, off in self.capabilities() if cid == cap_id), None)

    @property
    def has_msix(self) -> bool:
        return self.capability(0x11) is not None


def _int(v: str | None) -> int | None:
    return int(v, 0) if v else None


def parse_pci_dump(result: GuestResult | dict[str, str]) -> dict[str, PciDeviceInfo]:
    """Devices printed by PCI_DUMP, by address."""
    sections = result.sections if isinstance(result, GuestResult) else result
    devices: dict[str, PciDeviceInfo] = {}
    for name, body in sections.items():
        if not name.startswith("pci "):
            continue
        addr = name[4:].strip()
        fields: dict[str, str] = {}
        resources: list[tuple[int, int, int]] = []
        config = bytearray()
        for line in body.splitlines():
            key, _, value = line.partition(":")
            value = value.strip()
            if key == "resource":
                start, end, flags = (int(x, 16) for x in value.split()[:3])
                resources.append((start, end, flags))
            elif key == "config":
                config += bytes(int(x, 16) for x in value.split())
            elif key in {"vendor", "device", "subsystem_vendor", "subsystem_device", "class",
                         "irq", "driver"}:
                fields[key] = value
        devices[addr] = PciDeviceInfo(
            address=addr,
            vendor=int(fields["vendor"], 16),
            device=int(fields["device"], 16),
            class_code=int(fields["class"], 16),
            irq=int(fields.get("irq", "0")),
            subsystem_vendor=_int(fields.get("subsystem_vendor")),
            subsystem_device=_int(fields.get("subsystem_device")),
            driver=fields.get("driver"),
            resources=resources,
            config=bytes(config),
        )
    return devices
