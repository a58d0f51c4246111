"""Registers <-> engineering values for one point (pure functions).

Decoding uses pymodbus's formats (compiled once, see _convert); this module adds what device maps need on
top: byte swap, scale and offset, SunSpec scale factors, and "not available" sentinels.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from typing import Literal

from pymodbus.client.mixin import ModbusClientMixin

from drivers.errors import DecodeError
from drivers.model import DataType, Point, Value, WordOrder

_PM = ModbusClientMixin.DATATYPE
_PYMODBUS_TYPE = {
    DataType.U16: _PM.UINT16,
    DataType.I16: _PM.INT16,
    DataType.SUNSSF: _PM.INT16,
    DataType.U32: _PM.UINT32,
    DataType.I32: _PM.INT32,
    DataType.U64: _PM.UINT64,
    DataType.I64: _PM.INT64,
    DataType.F32: _PM.FLOAT32,
    DataType.F64: _PM.FLOAT64,
    DataType.BITS: _PM.UINT16,
    DataType.BOOL: _PM.UINT16,
}

# What a device answers for "not implemented", per type. SunSpec uses the most negative signed
# value (`invalid: sunspec`); Huawei and Sungrow the largest positive one (`invalid: max`).
SUNSPEC_INVALID: dict[DataType, tuple[int, ...]] = {
    DataType.U16: (0xFFFF,),
    DataType.I16: (0x8000,),
    DataType.SUNSSF: (0x8000,),
    DataType.U32: (0xFFFFFFFF,),
    DataType.I32: (0x80000000,),
    DataType.U64: (0xFFFFFFFFFFFFFFFF,),
    DataType.I64: (0x8000000000000000,),
}
MAX_INVALID: dict[DataType, tuple[int, ...]] = {
    DataType.U16: (0xFFFF,),
    DataType.I16: (0x7FFF,),
    DataType.U32: (0xFFFFFFFF,),
    DataType.I32: (0x7FFFFFFF,),
    DataType.U64: (0xFFFFFFFFFFFFFFFF,),
    DataType.I64: (0x7FFFFFFFFFFFFFFF,),
}
SENTINEL_SETS = {"sunspec": SUNSPEC_INVALID, "max": MAX_INVALID}


# pymodbus's formats, compiled once: its converter builds a format string and a bytearray per
# call, which was most of the cost of decoding a poll (~3 us of ~5 us per point).
_REGS = {n: struct.Struct(f">{n}H") for n in (1, 2, 4)}
VALUE_STRUCTS = {t: struct.Struct(f">{pm.value[0]}") for t, pm in _PYMODBUS_TYPE.items()}


def _convert(point: Point, regs: Sequence[int]) -> int | float | str | list[bool] | list[int] | list[float]:
    """What pymodbus's convert_from_registers gives for one value of the point's type."""
    fmt = VALUE_STRUCTS.get(point.type)
    if fmt is None or len(regs) != point.type.words:
        return ModbusClientMixin.convert_from_registers(list(regs), _PYMODBUS_TYPE[point.type],
                                                        word_order=_word_order(point))
    if point.word_order is WordOrder.LITTLE:
        regs = list(reversed(regs))
    return fmt.unpack(_REGS[len(regs)].pack(*regs))[0]  # type: ignore[no-any-return]


def _word_order(point: Point) -> Literal["big", "little"]:
    return "little" if point.word_order is WordOrder.LITTLE else "big"


def _swap_bytes(regs: Sequence[int]) -> list[int]:
    return [((r & 0xFF) << 8) | (r >> 8) for r in regs]


def raw_int(point: Point, regs: Sequence[int]) -> int:
    """The registers as one unsigned integer in the point's word order (for sentinels)."""
    words = list(regs) if point.word_order is WordOrder.BIG else list(reversed(regs))
    out = 0
    for w in words:
        out = (out << 16) | (w & 0xFFFF)
    return out


def decode_raw(point: Point, regs: Sequence[int]) -> Value | None:
    """Registers to the unscaled value; None when the device says "not available"."""
    if len(regs) != point.count:
        raise DecodeError(f"{point.key}: expected {point.count} registers, got {len(regs)}")
    if point.table.is_bit:
        # Coils and discrete inputs arrive as 0/1 per address: one is a bool, several a bitfield
        # with the point's first address as bit 0.
        if point.count == 1:
            return bool(regs[0])
        return sum((1 << i) for i, bit in enumerate(regs) if bit)
    if point.byte_swap:
        regs = _swap_bytes(regs)
    if point.type is DataType.STRING:
        data = b"".join(int(r).to_bytes(2, "big") for r in regs)
        text = data.split(b"\x00", 1)[0].decode("ascii", errors="replace").strip()
        return text if text else None
    if point.invalid and raw_int(point, regs) in point.invalid:
        return None
    try:
        value = _convert(point, regs)
    except Exception as err:  # pymodbus raises its own and struct errors alike
        raise DecodeError(f"{point.key}: {err}") from err
    if isinstance(value, float) and math.isnan(value):
        return None
    if point.type is DataType.F32 and isinstance(value, float):
        value = shortest_f32(value)
    assert isinstance(value, (int, float))
    if point.type is DataType.BOOL:
        return bool(value)
    return value


def shortest_f32(value: float) -> float:
    """The shortest decimal that is the same float32: 230.1 rather than 230.10000610351562.

    Rounding to a fixed 7 digits would lose bits a device really sent (a 123456.79 kWh counter
    would become 123456.8); the shortest exact form keeps every bit and drops only the noise.
    """
    packed = struct.pack(">f", value)
    for digits in range(6, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.pack(">f", candidate) == packed:
            return candidate
    return value


def apply_scale(point: Point, raw: int | float, sf: int | None = None) -> float | int:
    """Engineering value from a raw number; integers stay integers when nothing scales them."""
    factor = point.scale * (10.0**sf if sf is not None else 1.0)
    if factor == 1.0 and point.offset == 0.0 and isinstance(raw, int):
        return raw
    value = raw * factor + point.offset
    # Trim binary noise (0.1 * 3 = 0.30000000000000004) without hiding real resolution.
    return round(value, 9)


def decode_point(
    point: Point, regs: Sequence[int], scale_factors: Mapping[str, int | None] | None = None
) -> Value | None:
    """Registers to the published value of one point, or None if the device has none."""
    raw = decode_raw(point, regs)
    if raw is None or isinstance(raw, (str, bool)):
        return raw
    if point.type in (DataType.BITS, DataType.SUNSSF) or point.enum:
        return raw
    sf: int | None = None
    if point.scale_factor is not None:
        sf = (scale_factors or {}).get(point.scale_factor)
        if sf is None:
            return None
    return apply_scale(point, raw, sf)


def encode_point(point: Point, value: Value, sf: int | None = None) -> list[int]:
    """Engineering value to registers: the inverse of decode_point (used by the simulator)."""
    if point.type is DataType.STRING:
        data = str(value).encode("ascii", errors="replace")[: point.count * 2]
        data = data.ljust(point.count * 2, b"\x00")
        regs = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    else:
        number = _unscale(point, value, sf)
        regs = ModbusClientMixin.convert_to_registers(
            number, _PYMODBUS_TYPE[point.type], word_order=_word_order(point)
        )
    return _swap_bytes(regs) if point.byte_swap else regs


def encode_invalid(point: Point) -> list[int]:
    """Registers that a device answers for "not available" on this point."""
    if point.type in (DataType.F32, DataType.F64):
        return encode_point(point, math.nan)
    sentinel = point.invalid[0] if point.invalid else SUNSPEC_INVALID.get(point.type, (0,))[0]
    words = [(sentinel >> (16 * i)) & 0xFFFF for i in reversed(range(point.count))]
    if point.word_order is WordOrder.LITTLE:
        words.reverse()
    return _swap_bytes(words) if point.byte_swap else words


def _unscale(point: Point, value: Value, sf: int | None) -> int | float:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str):
        raise DecodeError(f"{point.key}: cannot encode text {value!r} as {point.type.name_}")
    if point.type in (DataType.BITS, DataType.SUNSSF, DataType.BOOL) or point.enum:
        return int(value)
    factor = point.scale * (10.0**sf if sf is not None else 1.0)
    if factor == 1.0 and point.offset == 0.0 and isinstance(value, int):
        raw: int | float = value  # exact: 64-bit counters do not survive a trip through a double
    else:
        raw = (value - point.offset) / factor
    if point.type in (DataType.F32, DataType.F64):
        return raw
    number = raw if isinstance(raw, int) else int(round(raw))
    lo, hi = int_range(point.type)
    return min(max(number, lo), hi)


def int_range(dtype: DataType) -> tuple[int, int]:
    """Smallest and largest raw integer a type holds."""
    bits = 16 * dtype.words
    if dtype in (DataType.I16, DataType.I32, DataType.I64, DataType.SUNSSF):
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1
