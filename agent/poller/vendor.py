"""A SunSpec meter's vendor, read at discovery: the few vendors whose meters count W the other way.

SunSpec meter models are read IEC-style (+ = import) and negated to the contract's + = export;
SolarEdge meters already report + = export (drivers/sign.py cites the sources), so for them the
sign is undone. The manufacturer (`Mn`, common model) is read once, right after discovery, so the
first reading is already right.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace

from drivers.decode import decode_points
from drivers.errors import DeviceError
from drivers.model import DeviceMap, Table, Value
from drivers.plan import block_values, plan_reads
from drivers.sign import sunspec_meter_exports_positive

METER_MODELS = range(201, 205)  # SunSpec 201-204: AC meters (integer + scale factor)
INVERTER_MODELS = (101, 102, 103, 111, 112, 113)
POWER_KEYS = ("ac_power", "phase_a_power", "phase_b_power", "phase_c_power")
Reader = Callable[[Table, int, int], Awaitable[list[int]]]


async def read_manufacturer(read: Reader, dmap: DeviceMap) -> str | None:
    """The common model's Mn, or None when it cannot be read (the sign then stays the default)."""
    points = [replace(p, publish=True) for p in dmap.identity if p.key == "manufacturer"]  # a nameplate point
    if not points:
        return None
    raw: dict[str, list[int]] = {}
    for block in plan_reads(points, dmap.max_block, 0):
        try:
            raw.update(block_values(block, await read(block.table, block.start, block.count)))
        except DeviceError:
            return None
    value = decode_points(points, raw)[0].get("manufacturer")
    return value if isinstance(value, str) else None


def meter_prefix(model_ids: Iterable[int]) -> str | None:
    """Where a discovered device's meter values are: None (no meter model), "" (a meter), or
    "meter_" (a meter model beside an inverter model, e.g. a SolarEdge inverter with its meter)."""
    ids = list(model_ids)
    if not any(i in METER_MODELS for i in ids):
        return None
    return "meter_" if any(i in INVERTER_MODELS for i in ids) else ""


def vendor_values(values: dict[str, Value], manufacturer: str | None, prefix: str | None) -> dict[str, Value]:
    """A discovered SunSpec meter's active powers with its vendor's sign undone where it counts
    + = export already; counters and the inverter's own values are left alone."""
    if prefix is None or not manufacturer or not sunspec_meter_exports_positive(manufacturer):
        return values
    out = dict(values)
    for key in (prefix + k for k in POWER_KEYS):
        value = out.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value:
            out[key] = -value
    return out
