"""Registers of a device's planned reads to one set of published values with quality flags.

A point that fails to decode, or that a device reports as "not available", is left out of the
values and named in the quality flags; it never spoils the other points of the poll.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from drivers.codec import decode_point, decode_raw
from drivers.errors import DecodeError
from drivers.model import Block, DataType, Point, Value
from drivers.plan import block_values
from drivers.plaindecode import decode_plain


def decode_blocks(
    blocks: Sequence[Block], registers: Mapping[int, Sequence[int]]
) -> tuple[dict[str, Value], list[str]]:
    """registers maps a block's index in `blocks` to its registers; a missing index was not read."""
    plain = decode_plain(blocks, registers)
    if plain is not None:
        values, unread, bad = plain
        return _drop_invalid_states([p for b in blocks for p in b.points], values, unread + bad)
    return decode_blocks_general(blocks, registers)


def decode_blocks_general(
    blocks: Sequence[Block], registers: Mapping[int, Sequence[int]]
) -> tuple[dict[str, Value], list[str]]:
    """decode_blocks point by point: any point the device maps allow (drivers/plaindecode.py
    is the fast path for the plain ones, and must give the same)."""
    raw: dict[str, list[int]] = {}
    quality: list[str] = []
    for i, block in enumerate(blocks):
        regs = registers.get(i)
        if regs is None:
            quality.extend(f"unread:{p.key}" for p in block.points if p.publish)
            continue
        raw.update(block_values(block, list(regs)))
    points = [p for b in blocks for p in b.points]
    values, bad = decode_points(points, raw)
    return values, quality + bad


def decode_points(
    points: Sequence[Point], raw: Mapping[str, Sequence[int]]
) -> tuple[dict[str, Value], list[str]]:
    scale_factors = _scale_factors(points, raw)
    values: dict[str, Value] = {}
    quality: list[str] = []
    for point in points:
        if not point.publish or point.key not in raw:
            continue
        try:
            value = decode_point(point, raw[point.key], scale_factors)
        except DecodeError:
            quality.append(f"decode:{point.key}")
            continue
        if value is None or not _plausible(point, value):
            quality.append(f"invalid:{point.key}")
            continue
        values[point.key] = value
    return _drop_invalid_states(points, values, quality)


def _plausible(point: Point, value: Value) -> bool:
    """Inside the point's `range`, when it has one (a garbled register is not a reading)."""
    if point.range is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return True
    return point.range[0] <= value <= point.range[1]


def _drop_invalid_states(
    points: Sequence[Point], values: dict[str, Value], quality: list[str]
) -> tuple[dict[str, Value], list[str]]:
    """Leave out points whose `valid_when` condition is false (or unknown this poll).

    A device keeps such a register after the state that filled it is gone (Sungrow's fault
    code stays set when the inverter runs again): published as is, a stale fault looks active.
    The point is flagged like any value the device did not deliver.
    """
    for point in points:
        if point.valid_when is None or point.key not in values:
            continue
        state_key, codes = point.valid_when
        state = values.get(state_key)
        if isinstance(state, bool) or not isinstance(state, int) or state not in codes:
            del values[point.key]
            quality.append(f"invalid:{point.key}")
    return values, quality


def _scale_factors(points: Sequence[Point], raw: Mapping[str, Sequence[int]]) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for point in points:
        if point.type is DataType.SUNSSF and point.key in raw:
            try:
                value = decode_raw(point, raw[point.key])
            except DecodeError:
                value = None
            out[point.key] = value if isinstance(value, int) and -10 <= value <= 10 else None
    return out


def enum_text(point: Point, code: int) -> str | None:
    return dict(point.enum).get(code)


def active_bits(point: Point, value: int) -> list[str]:
    """Names of the set bits of a bitfield point (unnamed bits as bitN)."""
    names = dict(point.bits)
    return [names.get(bit, f"bit{bit}") for bit in range(16 * point.count) if value >> bit & 1]
