"""Property tests for drivers/codec.py: encode_point and decode_point are inverses.

Expected registers are built here independently of pymodbus (int.to_bytes / struct), so the
tests check the wire layout (word order, byte order, two's complement) and not only that the
codec agrees with itself.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from drivers.codec import (
    MAX_INVALID,
    SENTINEL_SETS,
    SUNSPEC_INVALID,
    decode_point,
    encode_invalid,
    encode_point,
    int_range,
)
from drivers.decode import decode_points
from drivers.devicemap import ProfileLibrary, load_device_map
from drivers.errors import DecodeError
from drivers.model import DataType, Point, Table, WordOrder

INT_TYPES = (DataType.U16, DataType.I16, DataType.U32, DataType.I32, DataType.U64, DataType.I64)
FLOAT_TYPES = (DataType.F32, DataType.F64)
SCALES = (1.0, 0.1, 0.01, 0.001, 10.0)
OFFSETS = (0.0, -40.0, 0.5, 273.15, 1000.0)
SIGNED = (DataType.I16, DataType.I32, DataType.I64, DataType.SUNSSF)
# Largest raw integer whose scaled value still round-trips through a double exactly.
EXACT_RAW = 2**40

word_orders = st.sampled_from(list(WordOrder))
byte_swaps = st.booleans()


def make_point(
    dtype: DataType,
    *,
    word: WordOrder = WordOrder.BIG,
    swap: bool = False,
    scale: float = 1.0,
    offset: float = 0.0,
    invalid: tuple[int, ...] = (),
    scale_factor: str | None = None,
    count: int | None = None,
    enum: tuple[tuple[int, str], ...] = (),
) -> Point:
    return Point(
        key="x", table=Table.HOLDING, address=100, type=dtype,
        count=count if count is not None else dtype.words, word_order=word, byte_swap=swap,
        scale=scale, offset=offset, scale_factor=scale_factor, invalid=invalid, enum=enum,
    )


def _words(data: bytes, word: WordOrder, swap: bool) -> list[int]:
    words = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    if word is WordOrder.LITTLE:
        words.reverse()
    if swap:
        words = [((w & 0xFF) << 8) | (w >> 8) for w in words]
    return words


def int_regs(raw: int, dtype: DataType, word: WordOrder, swap: bool) -> list[int]:
    """Registers of a raw integer as the device sends them (two's complement, big-endian bytes)."""
    nbytes = 2 * dtype.words
    return _words((raw % (1 << (8 * nbytes))).to_bytes(nbytes, "big"), word, swap)


def float_regs(raw: float, dtype: DataType, word: WordOrder, swap: bool) -> list[int]:
    return _words(struct.pack(">f" if dtype is DataType.F32 else ">d", raw), word, swap)


def _width(dtype: DataType) -> Literal[32, 64]:
    return 32 if dtype is DataType.F32 else 64


def raw_ints(dtype: DataType, bound: int | None = None) -> st.SearchStrategy[int]:
    lo, hi = int_range(dtype)
    if bound is not None:
        lo, hi = max(lo, -bound), min(hi, bound)
    return st.integers(lo, hi)


# --- integers --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", INT_TYPES, ids=lambda t: t.name_)
@given(data=st.data(), word=word_orders, swap=byte_swaps)
def test_integer_round_trip_unscaled(dtype: DataType, data: st.DataObject, word: WordOrder, swap: bool) -> None:
    """Scale 1, offset 0: the value is the raw integer, exactly, and stays an int."""
    raw = data.draw(raw_ints(dtype, 2**53))
    point = make_point(dtype, word=word, swap=swap)
    regs = encode_point(point, raw)
    assert regs == int_regs(raw, dtype, word, swap)
    got = decode_point(point, regs)
    assert got == raw and isinstance(got, int)


@pytest.mark.parametrize("dtype", INT_TYPES, ids=lambda t: t.name_)
@given(
    data=st.data(), word=word_orders, swap=byte_swaps,
    scale=st.sampled_from(SCALES), offset=st.sampled_from(OFFSETS),
)
def test_integer_round_trip_scaled(
    dtype: DataType, data: st.DataObject, word: WordOrder, swap: bool, scale: float, offset: float
) -> None:
    """value = raw x scale + offset: encoding gives back exactly the raw registers, and decoding
    gives the value to within double rounding (integers are exact after scaling)."""
    raw = data.draw(raw_ints(dtype, EXACT_RAW))
    point = make_point(dtype, word=word, swap=swap, scale=scale, offset=offset)
    value = raw * scale + offset
    regs = encode_point(point, value)
    assert regs == int_regs(raw, dtype, word, swap)
    got = decode_point(point, regs)
    assert got == pytest.approx(value, rel=1e-12, abs=1e-9)


@pytest.mark.parametrize("dtype", INT_TYPES, ids=lambda t: t.name_)
@given(data=st.data(), scale=st.sampled_from(SCALES))
def test_integer_encode_clamps_to_the_type(dtype: DataType, data: st.DataObject, scale: float) -> None:
    """The simulator may ask for more than a register holds: it saturates, never wraps."""
    lo, hi = int_range(dtype)
    point = make_point(dtype, scale=scale)
    too_big = data.draw(st.integers(1, 10)) * scale * (hi + 1) * 2.0
    assert encode_point(point, too_big) == int_regs(hi, dtype, WordOrder.BIG, False)
    if lo < 0 or dtype in (DataType.U16, DataType.U32, DataType.U64):
        assert encode_point(point, -too_big) == int_regs(lo, dtype, WordOrder.BIG, False)


@pytest.mark.parametrize(
    ("dtype", "raw"),
    [(DataType.U64, 2**53 + 1), (DataType.U64, 2**64 - 3), (DataType.I64, 2**63 - 3),
     (DataType.I64, -(2**63) + 3)],
)
def test_64_bit_integers_round_trip_exactly(dtype: DataType, raw: int) -> None:
    """Beyond 2**53 a double cannot hold the integer: encoding must not go through one."""
    point = make_point(dtype)
    regs = encode_point(point, raw)
    assert regs == int_regs(raw, dtype, WordOrder.BIG, False)
    assert decode_point(point, regs) == raw


@pytest.mark.parametrize("dtype", (DataType.U64, DataType.I64), ids=lambda t: t.name_)
@given(data=st.data(), word=word_orders, swap=byte_swaps)
def test_64_bit_integers_full_range(dtype: DataType, data: st.DataObject, word: WordOrder, swap: bool) -> None:
    raw = data.draw(raw_ints(dtype))
    point = make_point(dtype, word=word, swap=swap)
    regs = encode_point(point, raw)
    assert regs == int_regs(raw, dtype, word, swap)
    assert decode_point(point, regs) == raw


# --- floats ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_TYPES, ids=lambda t: t.name_)
@given(
    data=st.data(), word=word_orders, swap=byte_swaps,
    scale=st.sampled_from(SCALES), offset=st.sampled_from(OFFSETS),
)
def test_float_round_trip(
    dtype: DataType, data: st.DataObject, word: WordOrder, swap: bool, scale: float, offset: float
) -> None:
    raw = data.draw(st.floats(-(2.0**100), 2.0**100, width=_width(dtype), allow_nan=False, allow_infinity=False))
    point = make_point(dtype, word=word, swap=swap, scale=scale, offset=offset)
    value = raw * scale + offset
    regs = encode_point(point, value)
    assert len(regs) == dtype.words
    got = decode_point(point, regs)
    assert isinstance(got, float)
    # float32: 24-bit significand (half an ulp is 2**-24 relative, twice for encode + decode);
    # float64 ~16 digits. Plus the codec's 1e-9 trim and the double rounding of the offset.
    rel = 2.0**-22 if dtype is DataType.F32 else 1e-12
    assert abs(got - value) <= rel * abs(value - offset) + 1e-9 + 1e-12 * abs(offset)


@pytest.mark.parametrize("dtype", FLOAT_TYPES, ids=lambda t: t.name_)
@given(data=st.data(), word=word_orders, swap=byte_swaps)
def test_float_wire_layout(dtype: DataType, data: st.DataObject, word: WordOrder, swap: bool) -> None:
    """A float the type holds exactly is sent bit for bit (IEEE-754, in the point's word order)."""
    raw = data.draw(st.floats(width=_width(dtype), allow_nan=False, allow_infinity=False))
    point = make_point(dtype, word=word, swap=swap)
    assert encode_point(point, raw) == float_regs(raw, dtype, word, swap)


def test_float32_examples() -> None:
    """Worked by hand: 230.0 = 0x43660000; -72000.0 = 0xC78CA000 (see tests/golden)."""
    assert decode_point(make_point(DataType.F32), [0x4366, 0x0000]) == 230.0
    assert decode_point(make_point(DataType.F32, word=WordOrder.LITTLE), [0x0000, 0x4366]) == 230.0
    assert decode_point(make_point(DataType.F32, swap=True), [0x6643, 0x0000]) == 230.0
    assert decode_point(make_point(DataType.F32, scale=0.0001), [0xC78C, 0xA000]) == pytest.approx(-7.2)


@pytest.mark.parametrize("raw", [2922.9375, 8633.8125, 123456.7890625, 1.0000003576278687])
def test_float32_decode_keeps_every_bit(raw: float) -> None:
    """The decoded number is the same float32 the device sent (in its shortest decimal form)."""
    assert struct.unpack(">f", struct.pack(">f", raw))[0] == raw  # an exact float32
    point = make_point(DataType.F32)
    got = decode_point(point, float_regs(raw, DataType.F32, WordOrder.BIG, False))
    assert isinstance(got, float)
    assert struct.pack(">f", got) == struct.pack(">f", raw)


@given(raw=st.floats(width=32, allow_nan=False, allow_infinity=False))
def test_float32_decode_is_the_same_float32(raw: float) -> None:
    # Below 0.01 the codec's trim to 9 decimals (apply_scale) keeps fewer than 7 significant
    # digits, and -0.0 becomes 0.0: both are fine for engineering values.
    assume(abs(raw) >= 0.01)
    point = make_point(DataType.F32)
    got = decode_point(point, float_regs(raw, DataType.F32, WordOrder.BIG, False))
    assert isinstance(got, float)
    assert struct.pack(">f", got) == struct.pack(">f", raw)
    assert len(repr(got)) <= len(repr(raw))  # never longer than the binary expansion


# --- types that ignore scale -----------------------------------------------------------------


@given(raw=st.integers(0, 0xFFFF), word=word_orders, swap=byte_swaps, scale=st.sampled_from(SCALES))
def test_bits_round_trip_ignores_scale(raw: int, word: WordOrder, swap: bool, scale: float) -> None:
    point = make_point(DataType.BITS, word=word, swap=swap, scale=scale)
    regs = encode_point(point, raw)
    assert regs == int_regs(raw, DataType.U16, word, swap)
    assert decode_point(point, regs) == raw


@given(value=st.booleans(), word=word_orders, swap=byte_swaps, scale=st.sampled_from(SCALES))
def test_bool_round_trip(value: bool, word: WordOrder, swap: bool, scale: float) -> None:
    point = make_point(DataType.BOOL, word=word, swap=swap, scale=scale)
    got = decode_point(point, encode_point(point, value))
    assert got is value


@given(raw=st.integers(-(2**15), 2**15 - 1), word=word_orders, swap=byte_swaps)
def test_sunssf_round_trip(raw: int, word: WordOrder, swap: bool) -> None:
    point = make_point(DataType.SUNSSF, word=word, swap=swap)
    regs = encode_point(point, raw)
    assert regs == int_regs(raw, DataType.SUNSSF, word, swap)
    assert decode_point(point, regs) == raw


@given(raw=st.integers(0, 0xFFFE), scale=st.sampled_from(SCALES), offset=st.sampled_from(OFFSETS))
def test_enum_points_publish_the_raw_code(raw: int, scale: float, offset: float) -> None:
    point = make_point(DataType.U16, scale=scale, offset=offset, enum=((0, "run"), (raw, "code")))
    regs = encode_point(point, raw)
    assert regs == [raw]
    assert decode_point(point, regs) == raw


# --- strings ---------------------------------------------------------------------------------

ascii_text = st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=127), max_size=40)


@given(text=ascii_text, count=st.integers(1, 20), word=word_orders, swap=byte_swaps)
def test_string_round_trip(text: str, count: int, word: WordOrder, swap: bool) -> None:
    """ASCII, NUL padded to `count` registers, cut at 2 x count chars, trimmed on decode."""
    point = make_point(DataType.STRING, count=count, word=word, swap=swap)
    regs = encode_point(point, text)
    assert len(regs) == count and all(0 <= r <= 0xFFFF for r in regs)
    expected = text[: 2 * count].strip()
    assert decode_point(point, regs) == (expected or None)


def test_string_layout() -> None:
    """High byte first, NUL padded; decoding stops at the first NUL; all NUL = not available."""
    point = make_point(DataType.STRING, count=4)
    assert encode_point(point, "SG50CX") == [0x5347, 0x3530, 0x4358, 0x0000]
    assert encode_point(point, "ABC") == [0x4142, 0x4300, 0x0000, 0x0000]
    assert decode_point(point, [0x4142, 0x4300, 0x5858, 0x5858]) == "ABC"
    assert decode_point(point, [0x2041, 0x4220, 0x2020, 0x0000]) == "AB"
    assert decode_point(point, [0, 0, 0, 0]) is None
    assert decode_point(point, [0x2020, 0x2020, 0x2020, 0x2020]) is None
    swapped = make_point(DataType.STRING, count=2, swap=True)
    assert decode_point(swapped, [0x4241, 0x0043]) == "ABC"


# --- "not available" sentinels ---------------------------------------------------------------

SENTINEL_CASES = [(name, dtype) for name, table in SENTINEL_SETS.items() for dtype in table]


@pytest.mark.parametrize(("set_name", "dtype"), SENTINEL_CASES, ids=lambda v: getattr(v, "name_", v))
@given(word=word_orders, swap=byte_swaps, scale=st.sampled_from(SCALES))
def test_sentinels_decode_to_none(set_name: str, dtype: DataType, word: WordOrder, swap: bool, scale: float) -> None:
    sentinels = SENTINEL_SETS[set_name][dtype]
    point = make_point(dtype, word=word, swap=swap, scale=scale, invalid=sentinels)
    for sentinel in sentinels:
        assert decode_point(point, int_regs(sentinel, dtype, word, swap)) is None
    assert decode_point(point, encode_invalid(point)) is None
    # The neighbour of a sentinel is an ordinary value.
    neighbour = (sentinels[0] - 1) % (1 << (16 * dtype.words))
    assert decode_point(point, int_regs(neighbour, dtype, word, swap)) is not None


def test_sentinel_values_are_the_documented_ones() -> None:
    assert SUNSPEC_INVALID[DataType.I16] == (0x8000,)
    assert SUNSPEC_INVALID[DataType.U16] == (0xFFFF,)
    assert SUNSPEC_INVALID[DataType.I32] == (0x80000000,)
    assert SUNSPEC_INVALID[DataType.U32] == (0xFFFFFFFF,)
    assert SUNSPEC_INVALID[DataType.SUNSSF] == (0x8000,)
    assert MAX_INVALID[DataType.I16] == (0x7FFF,)
    assert MAX_INVALID[DataType.I32] == (0x7FFFFFFF,)
    assert MAX_INVALID[DataType.U16] == (0xFFFF,)
    assert MAX_INVALID[DataType.U32] == (0xFFFFFFFF,)


@pytest.mark.parametrize("dtype", FLOAT_TYPES, ids=lambda t: t.name_)
@given(word=word_orders, swap=byte_swaps)
def test_float_nan_is_not_available(dtype: DataType, word: WordOrder, swap: bool) -> None:
    point = make_point(dtype, word=word, swap=swap)
    assert decode_point(point, float_regs(math.nan, dtype, word, swap)) is None
    assert decode_point(point, encode_invalid(point)) is None


def test_invalid_keywords_in_a_device_map(tmp_path: Path) -> None:
    """`invalid: sunspec` / `max` pick the per-type sentinel set; a raw number or list is literal."""
    (tmp_path / "t.yaml").write_text(
        "id: t\nsource: test\npoints:\n"
        "  - {key: a, address: 0, type: i16, invalid: sunspec}\n"
        "  - {key: b, address: 1, type: i32, invalid: max}\n"
        "  - {key: c, address: 3, type: u16, invalid: [0xFFFF, 0x7FFF]}\n"
        "  - {key: d, address: 4, type: f32, invalid: sunspec}\n"
        "  - {key: e, address: 6, type: u32}\n",
        encoding="utf-8",
    )
    dmap = load_device_map(tmp_path / "t.yaml", ProfileLibrary([tmp_path]))
    assert dmap.point("a").invalid == (0x8000,)
    assert dmap.point("b").invalid == (0x7FFFFFFF,)
    assert dmap.point("c").invalid == (0xFFFF, 0x7FFF)
    assert dmap.point("d").invalid == ()  # floats use NaN
    assert dmap.point("e").invalid == ()
    assert decode_point(dmap.point("a"), [0x8000]) is None
    assert decode_point(dmap.point("b"), [0x7FFF, 0xFFFF]) is None
    assert decode_point(dmap.point("c"), [0x7FFF]) is None


# --- wrong register count --------------------------------------------------------------------

ALL_TYPES = [t for t in DataType]


@pytest.mark.parametrize("dtype", ALL_TYPES, ids=lambda t: t.name_)
@given(n=st.integers(0, 12), count=st.integers(1, 8))
def test_wrong_register_count_raises(dtype: DataType, n: int, count: int) -> None:
    point = make_point(dtype, count=count if dtype is DataType.STRING else None)
    assume(n != point.count)
    with pytest.raises(DecodeError):
        decode_point(point, [0] * n)


# --- SunSpec scale factors -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", INT_TYPES, ids=lambda t: t.name_)
@given(data=st.data(), sf=st.integers(-3, 3), word=word_orders, swap=byte_swaps)
def test_sunspec_scale_factor_round_trip(
    dtype: DataType, data: st.DataObject, sf: int, word: WordOrder, swap: bool
) -> None:
    raw = data.draw(raw_ints(dtype, EXACT_RAW))
    point = make_point(dtype, word=word, swap=swap, scale_factor="x_sf")
    value = raw * 10.0**sf
    regs = encode_point(point, value, sf)
    assert regs == int_regs(raw, dtype, word, swap)
    assert decode_point(point, regs, {"x_sf": sf}) == pytest.approx(value, rel=1e-12, abs=1e-9)
    # No usable scale factor: the value is not available rather than wrong by a power of ten.
    assert decode_point(point, regs, {"x_sf": None}) is None
    assert decode_point(point, regs, {}) is None
    assert decode_point(point, regs) is None


def test_sunspec_scale_factor_in_a_poll() -> None:
    """A sunssf point (read, not published) scales its siblings; 0x8000 makes them unavailable."""
    watts = Point("ac_power", Table.HOLDING, 40084, DataType.I16, 1, scale=0.001, scale_factor="w_sf", unit="kW")
    w_sf = Point("w_sf", Table.HOLDING, 40085, DataType.SUNSSF, 1, invalid=(0x8000,), publish=False)
    values, quality = decode_points([watts, w_sf], {"ac_power": [5000], "w_sf": [0xFFFF]})  # SF -1
    assert values == {"ac_power": pytest.approx(0.5)} and quality == []
    values, quality = decode_points([watts, w_sf], {"ac_power": [5000], "w_sf": [0x8000]})
    assert values == {} and quality == ["invalid:ac_power"]


@settings(max_examples=50)
@given(sf=st.integers(-3, 3), raw=st.integers(-(2**15), 2**15 - 1), scale=st.sampled_from(SCALES))
def test_sunspec_scale_factor_combines_with_scale(sf: int, raw: int, scale: float) -> None:
    """value = raw x 10^sf x scale (scale converts the SunSpec unit, e.g. W -> kW)."""
    point = make_point(DataType.I16, scale=scale, scale_factor="x_sf")
    value = raw * 10.0**sf * scale
    regs = encode_point(point, value, sf)
    assert regs == int_regs(raw, DataType.I16, WordOrder.BIG, False)
    assert decode_point(point, regs, {"x_sf": sf}) == pytest.approx(value, rel=1e-12, abs=1e-9)


# --- coils and discrete inputs ---------------------------------------------------------------


def test_single_bit_points() -> None:
    coil = Point("c", Table.COIL, 0, DataType.BOOL, 1)
    assert decode_point(coil, [1]) is True
    assert decode_point(coil, [0]) is False


def test_multi_bit_coil_point_never_spoils_the_poll() -> None:
    from drivers.decode import decode_blocks
    from drivers.plan import plan_reads

    wide = Point("relays", Table.COIL, 0, DataType.BOOL, 3)
    single = Point("breaker", Table.COIL, 3, DataType.BOOL, 1)
    values, quality = decode_blocks(plan_reads([wide, single]), {0: [1, 0, 1, 1]})
    assert values["breaker"] is True
    assert values["relays"] == 0b101 and quality == []  # first coil is bit 0
