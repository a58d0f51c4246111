"""SunSpec discovery: find the "SunS" marker and walk the model chain by L (see drivers/sunspec.py).

Pure: the caller supplies the register reader. Model addresses differ between devices, so
nothing here hard-codes one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from drivers.errors import DeviceError, PvgateError

MARKER = (0x5375, 0x6E53)  # "SunS"
END_ID = 0xFFFF
BASES = (40000, 50000, 0)
MAX_MODELS = 200  # a chain longer than this is garbage, not a device

Reader = Callable[[int, int], Awaitable[list[int]]]  # (address, count) -> holding registers


class DiscoveryError(PvgateError):
    """No SunSpec marker, or a model chain that cannot be walked."""


class ModelRef(NamedTuple):
    id: int
    address: int  # of the model's ID register
    length: int  # L: registers after the ID and L registers


@dataclass(frozen=True)
class Discovery:
    base: int
    models: tuple[ModelRef, ...]
    complete: bool = True  # False when the chain broke off before the end model

    @property
    def ids(self) -> list[int]:
        return [m.id for m in self.models]


# --- discovery ----------------------------------------------------------------------------------


async def find_base(read: Reader, bases: Iterable[int] = BASES) -> int | None:
    """The first base address whose two registers are the "SunS" marker.

    None when the device answers but has no marker; a device that answers none of the reads
    raises the DeviceError of the last one (it is not there, or not listening).
    """
    silent: DeviceError | None = None
    answered = False
    for base in bases:
        try:
            regs = await read(base, 2)
        except DeviceError as err:
            if err.exception_code is None:
                silent = err
            else:
                answered = True  # illegal address there: try the next base
            continue
        answered = True
        if tuple(regs[:2]) == MARKER:
            return base
    if not answered and silent is not None:
        raise silent
    return None


async def discover(read: Reader, bases: Iterable[int] = BASES) -> Discovery:
    """Find the marker and walk the model chain by L.

    Raises DiscoveryError (no marker, a chain that makes no sense) or DeviceError (the device
    does not answer); a chain that breaks off before the end model is returned incomplete.
    """
    bases = tuple(bases)
    base = await find_base(read, bases)
    if base is None:
        raise DiscoveryError(f"no SunSpec marker (0x5375 0x6E53) at {', '.join(map(str, bases))}")
    models: list[ModelRef] = []
    addr = base + 2
    for _ in range(MAX_MODELS):
        header = await _header(read, addr)
        if header is None:
            return Discovery(base, tuple(models), complete=False)
        model_id, length = header
        if model_id == END_ID:
            return Discovery(base, tuple(models))
        if model_id == 0 and length == 0:
            return Discovery(base, tuple(models), complete=False)  # zeros where the end model belongs
        if model_id == 0 or addr + 2 + length > 0x10000:
            raise DiscoveryError(f"model chain broken at {addr}: id {model_id}, length {length}")
        models.append(ModelRef(model_id, addr, length))
        addr += 2 + length
    raise DiscoveryError(f"more than {MAX_MODELS} models from {base}: not a SunSpec chain")


async def _header(read: Reader, addr: int) -> tuple[int, int] | None:
    """(ID, L) at addr; (0xFFFF, 0) for the end model, which some devices serve without its L."""
    try:
        regs = await read(addr, 2)
        return regs[0], regs[1]
    except DeviceError as err:
        if err.exception_code is None:
            raise  # no answer at all: the caller decides
    try:
        regs = await read(addr, 1)
    except DeviceError as err:
        if err.exception_code is None:
            raise
        return None
    return (END_ID, 0) if regs[0] == END_ID else None
