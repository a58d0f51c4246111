"""The fast path of decoding (drivers/plaindecode.py) gives what the general path gives.

Maps and registers are generated: plain points of every numeric type with scales, offsets,
sentinels, enums, ranges and `valid_when`, and registers that hit the sentinels, NaN and
infinity. Every shipped device map is decoded both ways over random registers too.
"""

from __future__ import annotations

import math
import pickle
import random
import struct
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.decode import decode_blocks, decode_blocks_general
from drivers.devicemap import ProfileLibrary
from drivers.model import Block, DataType, Point, Table, WordOrder
from drivers.plaindecode import decode_plain, is_plain, plain_points
from drivers.plan import plan_reads

ROOT = Path(__file__).resolve().parent.parent
PLAIN_TYPES = (DataType.U16, DataType.I16, DataType.U32, DataType.I32, DataType.U64, DataType.I64,
               DataType.F32, DataType.F64, DataType.BITS, DataType.BOOL, DataType.SUNSSF)
NAN_F32 = list(struct.unpack(">2H", struct.pack(">f", math.nan)))
INF_F32 = list(struct.unpack(">2H", struct.pack(">f", math.inf)))


@st.composite
def plain_maps(draw: st.DrawFn) -> list[Point]:
    points: list[Point] = []
    address = 0
    for i in range(draw(st.integers(1, 12))):
        dtype = draw(st.sampled_from(PLAIN_TYPES))
        address += draw(st.integers(0, 3))  # gaps inside a block are read and skipped
        width = dtype.words
        invalid = draw(st.sampled_from([(), (0xFFFF,), (0x8000,), (0x7FFF, 0xFFFF), ((1 << 16 * width) - 1,)]))
        low = draw(st.floats(-1e6, 1e6, allow_nan=False))
        rng = draw(st.sampled_from([None, (low, low + draw(st.floats(0, 1e6)))]))
        valid_when = None
        if points and draw(st.booleans()):
            valid_when = (points[0].key, tuple(draw(st.lists(st.integers(0, 3), min_size=1, max_size=3))))
        points.append(Point(
            key=f"p{i}", table=draw(st.sampled_from([Table.HOLDING, Table.INPUT])), address=address, type=dtype,
            count=width, scale=draw(st.sampled_from([1.0, 1, 0.1, 0.01, 0.001, 10.0, 2])),
            offset=draw(st.sampled_from([0.0, -40.0, 0.5])), invalid=invalid,
            enum=((0, "off"), (1, "on")) if draw(st.integers(0, 5)) == 0 else (),
            publish=draw(st.integers(0, 6)) > 0, valid_when=valid_when, range=rng,
        ))
        address += width
    return points


def registers_for(block: Block, draw: st.DrawFn) -> list[int]:
    regs = draw(st.lists(st.integers(0, 0xFFFF), min_size=block.count, max_size=block.count))
    for p in block.points:  # put the interesting patterns where the points are
        at = p.address - block.start
        pattern = draw(st.sampled_from([None, "sentinel", "nan", "inf", "small"]))
        if pattern == "sentinel" and p.invalid:
            sentinel = p.invalid[0]
            regs[at:at + p.count] = [(sentinel >> 16 * k) & 0xFFFF for k in reversed(range(p.count))]
        elif pattern == "nan" and p.type is DataType.F32:
            regs[at:at + 2] = NAN_F32
        elif pattern == "inf" and p.type is DataType.F32:
            regs[at:at + 2] = INF_F32
        elif pattern == "small":
            regs[at:at + p.count] = [0] * (p.count - 1) + [draw(st.integers(0, 3))]
    return regs


def same(a: object, b: object) -> bool:
    """Equal, with NaN equal to NaN and 1 == 1.0 told apart (the type is what is published)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_plain_points_decode_as_the_general_path_does(data: st.DataObject) -> None:
    points = data.draw(plain_maps())
    blocks = plan_reads(points)
    registers = {i: registers_for(b, data.draw) for i, b in enumerate(blocks)
                 if data.draw(st.integers(0, 9)) > 0}  # now and then a block is not read
    assert all(plain_points(b) is not None for b in blocks)
    fast = decode_blocks(blocks, registers)
    general = decode_blocks_general(blocks, registers)
    assert same(fast[0], general[0]), (fast, general)
    assert fast[1] == general[1]


def test_a_point_that_is_not_plain_sends_the_poll_down_the_general_path() -> None:
    plain = Point("a", Table.HOLDING, 0, DataType.U16, 1, scale=0.1)
    others = [
        Point("s", Table.HOLDING, 1, DataType.STRING, 4),
        Point("w", Table.HOLDING, 1, DataType.U32, 2, word_order=WordOrder.LITTLE),
        Point("b", Table.HOLDING, 1, DataType.U16, 1, byte_swap=True),
        Point("f", Table.HOLDING, 1, DataType.I16, 1, scale_factor="a"),
        Point("n", Table.HOLDING, 1, DataType.U32, 1),  # fewer registers than its type
    ]
    for other in others:
        assert not is_plain(other), other
        blocks = plan_reads([plain, other])
        assert decode_plain(blocks, {0: [0] * blocks[0].count}) is None
    coil = Point("c", Table.COIL, 0, DataType.BOOL, 1)
    assert not is_plain(coil) and decode_plain(plan_reads([coil]), {0: [1]}) is None


def test_a_short_answer_goes_down_the_general_path_and_is_flagged() -> None:
    points = [Point("a", Table.HOLDING, 0, DataType.U16, 1), Point("b", Table.HOLDING, 1, DataType.U32, 2)]
    blocks = plan_reads(points)
    assert decode_plain(blocks, {0: [7, 0]}) is None
    assert decode_blocks(blocks, {0: [7, 0]}) == ({"a": 7}, ["decode:b"])


def test_every_shipped_map_decodes_the_same_both_ways() -> None:
    library = ProfileLibrary([ROOT / "config" / "profiles"])
    rnd = random.Random(16)
    fast_maps = 0
    for map_id in library.ids():
        dmap = library.get(map_id)
        blocks = plan_reads(list(dmap.points), max_block=dmap.max_block, max_gap=dmap.max_gap)
        fast_maps += all(plain_points(b) is not None for b in blocks)
        for _ in range(50):
            registers = {i: [rnd.choice([0, 1, 0x7FFF, 0x8000, 0xFFFF, rnd.randrange(0x10000)]) for _ in range(b.count)]
                         for i, b in enumerate(blocks)}
            fast, general = decode_blocks(blocks, registers), decode_blocks_general(blocks, registers)
            assert same(fast[0], general[0]) and fast[1] == general[1], map_id
    assert fast_maps >= 5  # most vendor maps take the fast path (SunSpec and string nameplates do not)


def test_a_block_with_its_compiled_decoder_still_pickles() -> None:
    block = plan_reads([Point("a", Table.HOLDING, 0, DataType.U16, 1)])[0]
    assert plain_points(block) is not None
    copy = pickle.loads(pickle.dumps(block))
    assert copy == block and decode_blocks([copy], {0: [5]}) == ({"a": 5}, [])
