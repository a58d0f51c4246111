"""A poll's plain points decoded in one pass: the fast path of drivers.decode.decode_blocks.

Almost every point of the vendor maps is a fixed-width number at a fixed place in its block,
high word first, scaled by a constant. For such a point the general path (decode_point ->
decode_raw -> _convert -> apply_scale) costs five Python calls and a struct round trip per
value, which was the largest of the polling thread's own costs (issue #16). Here each block's
registers are packed once and each point is one precompiled struct read at its byte offset.

The result is the general path's, value for value and flag for flag (tests/test_plaindecode.py
holds the two together with generated maps and registers). A poll goes down the general path
as a whole when any of its points is not plain: strings, coils and discrete inputs, byte swap,
low word first, a SunSpec scale factor, or a register count that is not its type's.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from drivers.codec import VALUE_STRUCTS, shortest_f32
from drivers.model import Block, DataType, Point, Value, WordOrder

_UNSIGNED = {1: struct.Struct(">H"), 2: struct.Struct(">I"), 4: struct.Struct(">Q")}
_REGISTERS: dict[int, struct.Struct] = {}

SCALED, RAW, BOOL = 0, 1, 2  # how a point's number becomes its value (decode_point's branches)


@dataclass(frozen=True)
class PlainPoint:
    key: str
    at: int  # byte offset in the block
    fmt: struct.Struct
    sentinels: frozenset[int]  # raw unsigned values meaning "not available"
    mode: int
    factor: float
    offset: float
    unscaled: bool  # factor 1, offset 0: an integer stays the integer it was
    f32: bool
    range: tuple[float, float] | None


def is_plain(point: Point) -> bool:
    return (not point.table.is_bit and not point.byte_swap and point.scale_factor is None
            and point.type in VALUE_STRUCTS and point.count == point.type.words
            and (point.count == 1 or point.word_order is WordOrder.BIG))


def _compile(block: Block) -> tuple[PlainPoint, ...] | None:
    if not all(is_plain(p) for p in block.points):
        return None
    out = []
    for p in block.points:
        if not p.publish:
            continue
        mode = BOOL if p.type is DataType.BOOL else RAW if p.type in (DataType.BITS, DataType.SUNSSF) or p.enum \
            else SCALED
        factor = p.scale * 1.0
        out.append(PlainPoint(p.key, 2 * (p.address - block.start), VALUE_STRUCTS[p.type], frozenset(p.invalid),
                              mode, factor, p.offset, factor == 1.0 and p.offset == 0.0, p.type is DataType.F32,
                              p.range))
    return tuple(out)


def plain_points(block: Block) -> tuple[PlainPoint, ...] | None:
    """The block's published points compiled, or None when one of its points is not plain
    (kept on the block: a block is planned once and read every poll)."""
    cached = block.__dict__.get("_plain", False)
    if cached is False:
        cached = _compile(block)
        block.__dict__["_plain"] = cached  # frozen dataclass: a cache, not a field (see Block.__getstate__)
    return cached  # type: ignore[no-any-return]


def decode_plain(blocks: Sequence[Block],
                 registers: Mapping[int, Sequence[int]]) -> tuple[dict[str, Value], list[str], list[str]] | None:
    """(values, unread flags, bad flags) of a poll whose points are all plain; None otherwise."""
    compiled = [plain_points(b) for b in blocks]
    if any(c is None for c in compiled):
        return None
    values: dict[str, Value] = {}
    unread: list[str] = []
    bad: list[str] = []
    for i, (block, points) in enumerate(zip(blocks, compiled)):
        assert points is not None
        regs = registers.get(i)
        if regs is None:
            unread.extend(f"unread:{p.key}" for p in block.points if p.publish)
            continue
        if len(regs) != block.count:
            return None  # a short answer: the general path names each point it spoils
        pack = _REGISTERS.get(block.count) or _REGISTERS.setdefault(block.count, struct.Struct(f">{block.count}H"))
        try:
            data = pack.pack(*regs)
        except struct.error:
            return None  # not 16-bit registers: the general path flags what cannot decode
        for p in points:
            if p.sentinels and _UNSIGNED[p.fmt.size // 2].unpack_from(data, p.at)[0] in p.sentinels:
                bad.append(f"invalid:{p.key}")
                continue
            raw = p.fmt.unpack_from(data, p.at)[0]
            if isinstance(raw, float):
                if math.isnan(raw):
                    bad.append(f"invalid:{p.key}")
                    continue
                if p.f32:
                    raw = shortest_f32(raw)
            # decode_point and apply_scale: a float is always rounded through the scale
            value: int | float | bool
            if p.mode is BOOL:
                value = bool(raw)
            elif p.mode is RAW or (p.unscaled and not isinstance(raw, float)):
                value = raw
            else:
                value = round(raw * p.factor + p.offset, 9)
            rng = p.range
            if rng is not None and not isinstance(value, bool) and not rng[0] <= value <= rng[1]:
                bad.append(f"invalid:{p.key}")
                continue
            values[p.key] = value
    return values, unread, bad
