"""Unit and property tests for drivers/plan.py (read planning)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.devicemap import ProfileLibrary
from drivers.model import Block, DataType, DeviceMap, Point, Table
from drivers.plan import MODBUS_MAX_BITS, block_values, plan_device, plan_reads

_TYPE_OF_COUNT = {1: DataType.U16, 2: DataType.U32, 4: DataType.U64}


def pt(address: int, count: int = 1, table: Table = Table.HOLDING, key: str | None = None) -> Point:
    if table.is_bit:
        dtype = DataType.BOOL
    else:
        dtype = _TYPE_OF_COUNT.get(count, DataType.STRING)
    return Point(key or f"{table.name.lower()}_{address}", table, address, dtype, count)


def spans(blocks: Iterable[Block]) -> list[tuple[str, int, int]]:
    return [(b.table.name, b.start, b.count) for b in blocks]


# --- examples --------------------------------------------------------------------------------


def test_adjacent_points_share_one_block() -> None:
    blocks = plan_reads([pt(0), pt(1, 2), pt(3)])
    assert spans(blocks) == [("HOLDING", 0, 4)]
    assert [p.key for p in blocks[0].points] == ["holding_0", "holding_1", "holding_3"]


def test_points_are_sorted_whatever_the_map_order() -> None:
    assert spans(plan_reads([pt(10), pt(0), pt(5)])) == [("HOLDING", 0, 11)]


def test_blocks_never_exceed_max_block() -> None:
    blocks = plan_reads([pt(a) for a in range(10)], max_block=4)
    assert spans(blocks) == [("HOLDING", 0, 4), ("HOLDING", 4, 4), ("HOLDING", 8, 2)]


def test_a_32_bit_point_is_never_cut_by_max_block() -> None:
    blocks = plan_reads([pt(0), pt(1), pt(2, 2)], max_block=3)
    assert spans(blocks) == [("HOLDING", 0, 2), ("HOLDING", 2, 2)]


def test_a_point_longer_than_max_block_gets_a_block_of_its_own() -> None:
    blocks = plan_reads([pt(0), pt(1, 10), pt(11)], max_block=4)
    assert spans(blocks) == [("HOLDING", 0, 1), ("HOLDING", 1, 10), ("HOLDING", 11, 1)]


def test_gap_up_to_max_gap_is_bridged() -> None:
    # gap = next address - end of the block = 17 - 1 = 16 registers
    assert spans(plan_reads([pt(0), pt(17)], max_gap=16)) == [("HOLDING", 0, 18)]


def test_gap_above_max_gap_splits() -> None:
    assert spans(plan_reads([pt(0), pt(18)], max_gap=16)) == [("HOLDING", 0, 1), ("HOLDING", 18, 1)]


def test_max_gap_zero_only_joins_contiguous_points() -> None:
    blocks = plan_reads([pt(0), pt(1), pt(3)], max_gap=0)
    assert spans(blocks) == [("HOLDING", 0, 2), ("HOLDING", 3, 1)]


def test_gap_is_measured_from_the_end_of_a_multi_register_point() -> None:
    # u32 at 0..1 ends at 2; the next point at 19 is 17 registers away
    assert len(plan_reads([pt(0, 2), pt(19)], max_gap=16)) == 2
    assert len(plan_reads([pt(0, 2), pt(18)], max_gap=16)) == 1


def test_holes_are_never_read() -> None:
    holes = [(Table.HOLDING, 5, 6)]
    assert spans(plan_reads([pt(0), pt(10)], holes=holes)) == [("HOLDING", 0, 1), ("HOLDING", 10, 1)]


def test_hole_right_after_a_point_or_right_before_the_next() -> None:
    assert len(plan_reads([pt(0), pt(2)], holes=[(Table.HOLDING, 1, 1)])) == 2
    assert len(plan_reads([pt(0), pt(5)], holes=[(Table.HOLDING, 4, 4)])) == 2
    assert len(plan_reads([pt(0), pt(5)], holes=[(Table.HOLDING, 1, 1)])) == 2


def test_holes_elsewhere_do_not_split() -> None:
    points = [pt(10), pt(12)]
    assert len(plan_reads(points, holes=[(Table.HOLDING, 0, 5)])) == 1
    assert len(plan_reads(points, holes=[(Table.HOLDING, 20, 30)])) == 1
    assert len(plan_reads(points, holes=[(Table.INPUT, 11, 11)])) == 1


def test_splits_are_honoured() -> None:
    points = [pt(a) for a in range(4)]
    assert spans(plan_reads(points, splits=[(Table.HOLDING, 2)])) == [("HOLDING", 0, 2), ("HOLDING", 2, 2)]


def test_split_inside_a_gap() -> None:
    assert len(plan_reads([pt(0), pt(8)], splits=[(Table.HOLDING, 4)])) == 2


def test_splits_of_another_table_or_at_a_block_start_do_nothing() -> None:
    points = [pt(0), pt(1)]
    assert len(plan_reads(points, splits=[(Table.INPUT, 1)])) == 1
    assert len(plan_reads(points, splits=[(Table.HOLDING, 0)])) == 1
    assert len(plan_reads(points, splits=[(Table.HOLDING, 2)])) == 1


def test_tables_never_share_a_block() -> None:
    points = [pt(0, table=Table.HOLDING), pt(1, table=Table.INPUT), pt(2, table=Table.HOLDING),
              pt(0, table=Table.COIL), pt(1, table=Table.DISCRETE)]
    blocks = plan_reads(points)
    assert spans(blocks) == [("COIL", 0, 1), ("DISCRETE", 1, 1), ("HOLDING", 0, 3), ("INPUT", 1, 1)]


def test_bit_tables_are_limited_by_the_modbus_bit_limit() -> None:
    coils = [pt(a, table=Table.COIL) for a in range(0, 2100, 10)]
    blocks = plan_reads(coils, max_block=10, max_gap=16)
    assert all(b.count <= MODBUS_MAX_BITS for b in blocks)
    assert len(blocks) == 2


def test_empty_map_plans_nothing() -> None:
    assert plan_reads([]) == []


def test_block_values_slices_each_point() -> None:
    block = plan_reads([pt(10), pt(12, 2), pt(15)])[0]
    assert block.start == 10 and block.count == 6
    regs = [100, 101, 102, 103, 104, 105]
    assert block_values(block, regs) == {"holding_10": [100], "holding_12": [102, 103], "holding_15": [105]}


def test_plan_device_uses_the_maps_read_hints() -> None:
    dmap = DeviceMap(
        id="t", name="t", source="test", points=(pt(0), pt(1), pt(2), pt(20)),
        max_block=2, max_gap=30, holes=((Table.HOLDING, 10, 10),),
    )
    assert spans(plan_device(dmap)) == [("HOLDING", 0, 2), ("HOLDING", 2, 1), ("HOLDING", 20, 1)]
    assert spans(plan_device(dmap, splits=[(Table.HOLDING, 1)])) == [
        ("HOLDING", 0, 1), ("HOLDING", 1, 2), ("HOLDING", 20, 1)]


@pytest.mark.parametrize("profile_id", ProfileLibrary.default().ids())
def test_shipped_maps_plan_within_their_limits(profile_id: str) -> None:
    dmap = ProfileLibrary.default().get(profile_id)
    blocks = plan_device(dmap)
    check_plan(list(dmap.points), blocks, dmap.max_block, dmap.max_gap, list(dmap.holes), [])


# --- properties ------------------------------------------------------------------------------


def check_plan(
    points: list[Point],
    blocks: list[Block],
    max_block: int,
    max_gap: int,
    holes: list[tuple[Table, int, int]],
    splits: list[tuple[Table, int]],
) -> None:
    # Every point is in exactly one block, inside the block's range.
    seen = [p.key for b in blocks for p in b.points]
    assert sorted(seen) == sorted(p.key for p in points)
    for b in blocks:
        for p in b.points:
            assert p.table is b.table, "different tables never share a block"
            assert b.start <= p.address and p.end <= b.start + b.count
        # A block starts at its first point and ends with its last one: no wasted edges.
        assert b.start == min(p.address for p in b.points)
        assert b.start + b.count == max(p.end for p in b.points)
        limit = MODBUS_MAX_BITS if b.table.is_bit else max_block
        assert b.count <= limit or len(b.points) == 1, f"block {b.start}+{b.count} > {limit}"
        ordered = sorted(b.points, key=lambda p: p.address)
        end = ordered[0].end
        for p in ordered[1:]:
            assert p.address - end <= max_gap, "a gap wider than max_gap was bridged"
            end = max(end, p.end)
        last = b.start + b.count - 1
        for table, lo, hi in holes:
            assert not (table is b.table and lo <= last and hi >= b.start), f"hole {lo}..{hi} read"
        for table, addr in splits:
            assert not (table is b.table and b.start < addr <= last), f"block spans split {addr}"
    # Blocks come in table then address order and never overlap.
    keys = [(b.table.value, b.start) for b in blocks]
    assert keys == sorted(keys)
    for a, b in zip(blocks, blocks[1:]):
        assert a.table is not b.table or a.start + a.count <= b.start


def check_greedy(
    blocks: list[Block],
    max_block: int,
    max_gap: int,
    holes: list[tuple[Table, int, int]],
    splits: list[tuple[Table, int]],
) -> None:
    """Two neighbouring blocks of a table are apart for a reason: the next point did not fit."""
    for a, b in zip(blocks, blocks[1:]):
        if a.table is not b.table:
            continue
        nxt = min(b.points, key=lambda p: p.address)
        end = a.start + a.count
        limit = MODBUS_MAX_BITS if a.table.is_bit else max_block
        reasons = [
            nxt.address - end > max_gap,
            max(end, nxt.end) - a.start > limit,
            any(t is a.table and lo < nxt.address and hi >= end for t, lo, hi in holes),
            any(t is a.table and a.start < addr <= nxt.address for t, addr in splits),
        ]
        assert any(reasons), f"blocks {a.start}+{a.count} and {b.start}+{b.count} could be one"


@st.composite
def device_points(draw: st.DrawFn) -> tuple[list[Point], list[tuple[Table, int, int]], list[tuple[Table, int]]]:
    """Non-overlapping points in one to four tables, holes only in gaps, splits only between
    points or in gaps (a split inside a point cannot be honoured)."""
    points: list[Point] = []
    holes: list[tuple[Table, int, int]] = []
    splits: list[tuple[Table, int]] = []
    tables = draw(st.lists(st.sampled_from(list(Table)), min_size=1, max_size=4, unique=True))
    for table in tables:
        address = draw(st.integers(0, 300))
        for _ in range(draw(st.integers(1, 30))):
            gap = draw(st.integers(0, 40))
            if gap and draw(st.integers(0, 4)) == 0:
                lo = draw(st.integers(address, address + gap - 1))
                holes.append((table, lo, draw(st.integers(lo, address + gap - 1))))
            if draw(st.integers(0, 5)) == 0:
                splits.append((table, draw(st.integers(address, address + gap))))
            address += gap
            count = 1 if table.is_bit else draw(st.sampled_from([1, 1, 1, 2, 2, 4, 10]))
            if table.is_bit:
                count = draw(st.integers(1, 16))
            if address + count > 65536:
                break
            points.append(pt(address, count, table))
            address += count
    return points, holes, splits


@settings(max_examples=300)
@given(case=device_points(), max_block=st.integers(1, 125), max_gap=st.integers(0, 40))
def test_plan_properties(
    case: tuple[list[Point], list[tuple[Table, int, int]], list[tuple[Table, int]]],
    max_block: int,
    max_gap: int,
) -> None:
    points, holes, splits = case
    blocks = plan_reads(points, max_block, max_gap, holes, splits)
    check_plan(points, blocks, max_block, max_gap, holes, splits)
    check_greedy(blocks, max_block, max_gap, holes, splits)


@settings(max_examples=100)
@given(case=device_points(), max_block=st.integers(1, 125), max_gap=st.integers(0, 40))
def test_plan_does_not_depend_on_map_order(
    case: tuple[list[Point], list[tuple[Table, int, int]], list[tuple[Table, int]]],
    max_block: int,
    max_gap: int,
) -> None:
    points, holes, splits = case
    forward = plan_reads(points, max_block, max_gap, holes, splits)
    backward = plan_reads(list(reversed(points)), max_block, max_gap, holes, splits)
    assert spans(forward) == spans(backward)


def test_holes_follow_the_maps_defaults(tmp_path: Path) -> None:
    (tmp_path / "h.yaml").write_text(
        "id: h\nsource: test\n"
        "defaults: {table: input, address_offset: -1}\n"
        "read:\n  holes:\n    - {from: 5025, to: 5030}\n"
        "points:\n  - {key: a, address: 5024, type: u16}\n  - {key: b, address: 5031, type: u16}\n",
        encoding="utf-8",
    )
    dmap = ProfileLibrary([tmp_path]).get("h")
    assert dmap.holes == ((Table.INPUT, 5024, 5029),)
    assert len(plan_device(dmap)) == 2
