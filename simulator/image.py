"""A device served from a register image: the registers a real unit holds, not our map of it.

A simulator device built from a device map can only ever agree with that map. A register image
is written from the vendor's own register table instead, so a test can hold a map against a
device it does not describe exactly: registers the image leaves out are holes (a read that
touches one is refused with exception 2, as real units do), and "not available" values are
whatever sentinel words the vendor documents. The file format is in docs/device-maps.md
("Register images"):

    name: Huawei SUN2000-50KTL-M3 (register image)
    source: Huawei Solar Inverter Modbus Interface Definitions, via huawei-solar-lib
    tables:
      holding:
        30070: 428                  # one register
        32080: [0x0000, 0x9664]     # consecutive registers from 32080 on
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drivers.devicemap import TABLES
from drivers.model import Table
from drivers.yamlsrc import Checker, LDict, load_file
from simulator.device import EXC_ILLEGAL_ADDRESS, SimDevice

IMAGE_KEYS = ("name", "source", "tables")


@dataclass(frozen=True)
class RegisterImage:
    """Sparse register contents per table: address -> 16-bit word (0/1 for coils and inputs)."""

    tables: dict[Table, dict[int, int]] = field(default_factory=dict)
    name: str = ""
    source: str = ""

    def read(self, table: Table, address: int, count: int) -> list[int] | int:
        """The words of a read, or exception 2 when any register of it is not in the image."""
        regs = self.tables.get(table, {})
        words = [regs.get(a) for a in range(address, address + count)]
        if count < 1 or any(w is None for w in words):
            return EXC_ILLEGAL_ADDRESS
        return [w for w in words if w is not None]


def load_image(path: Path) -> RegisterImage:
    """Load and check an image file; every problem is reported with its line (ConfigError)."""
    chk = Checker(str(path))
    root = chk.mapping(load_file(path), "", 1, IMAGE_KEYS)
    tables: dict[Table, dict[int, int]] = {}
    if root is not None:
        node = chk.mapping(root.get("tables"), "tables", chk.line_of(root, "tables"), TABLES)
        if node is not None:
            for name, content in node.items():
                if name in TABLES:
                    tables[TABLES[name]] = _table(content, f"tables.{name}", node, name, chk)
            if not any(tables.values()):
                chk.problem(chk.line_of(root, "tables"), "tables", "no registers: give at least one table")
    chk.raise_if_any()
    assert root is not None
    return RegisterImage(tables, chk.get(root, "name", "", str, path.stem) or path.stem,
                         chk.get(root, "source", "", str, "") or "")


def _table(content: Any, path: str, parent: LDict, name: str, chk: Checker) -> dict[int, int]:
    out: dict[int, int] = {}
    if not isinstance(content, LDict):
        chk.problem(chk.line_of(parent, name), path, "expected a mapping of address: word(s)")
        return out
    node = content
    limit = 1 if TABLES[name].is_bit else 0xFFFF
    for key, value in node.items():
        line = node.key_lines.get(key, node.line)
        try:
            start = int(key, 0)
        except ValueError:
            chk.problem(line, f"{path}.{key}", "expected a register address (decimal or 0x hex)")
            continue
        words = value if isinstance(value, list) else [value]
        if not words or not all(isinstance(w, int) and not isinstance(w, bool) and 0 <= w <= limit for w in words):
            chk.problem(line, f"{path}.{key}", f"expected a word 0..{limit:#x} or a list of them")
            continue
        for i, word in enumerate(words):
            address = start + i
            if not 0 <= address <= 0xFFFF:
                chk.problem(line, f"{path}.{key}", "registers run past 65535")
                break
            if address in out:
                chk.problem(line, f"{path}.{key}", f"register {address} is given twice")
                break
            out[address] = word
    return out


@dataclass
class ImageDevice(SimDevice):
    """A simulated unit that answers from a register image instead of its device map.

    Faults, turnaround and request counting work as for any simulated device; the map (profile)
    only names the device and is never used to build the answer.
    """

    image: RegisterImage = field(default_factory=RegisterImage)

    @classmethod
    def from_device(cls, device: SimDevice, image: RegisterImage) -> ImageDevice:
        return cls(device.unit, device.profile, device.plant, device.clock, device.fault,
                   turnaround_s=device.turnaround_s, image=image)

    def read(self, table: Table, address: int, count: int, real_t: float | None = None) -> list[int] | int:
        result = self.image.read(table, address, count)
        if not isinstance(result, int):
            self.served += 1
        return result
