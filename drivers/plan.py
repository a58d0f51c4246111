"""Read planning: a device's points merged into as few reads as the wire allows (pure).

On a 9600-baud bus every transaction costs tens of milliseconds of fixed overhead, while a
register costs about 2 ms, so bridging a small gap is cheaper than a second request. Gaps are
bridged up to `max_gap` registers, blocks stop at `max_block` registers, and registers the
device map marks as holes (which some devices refuse with exception 2) are never read.
"""

from __future__ import annotations

from collections.abc import Iterable

from drivers.model import Block, DeviceMap, Point, Table

MODBUS_MAX_REGISTERS = 125
MODBUS_MAX_BITS = 2000


def plan_reads(
    points: Iterable[Point],
    max_block: int = MODBUS_MAX_REGISTERS,
    max_gap: int = 16,
    holes: Iterable[tuple[Table, int, int]] = (),
    splits: Iterable[tuple[Table, int]] = (),
) -> list[Block]:
    """Blocks covering every point exactly once, in table then address order.

    `splits` are (table, address) boundaries learned at run time (a device that refused a
    block with "illegal address"): no block may span such a boundary.
    """
    hole_list = list(holes)
    split_set = set(splits)
    blocks: list[Block] = []
    ordered = sorted(points, key=lambda p: (p.table.value, p.address))
    current: list[Point] = []
    for point in ordered:
        if current and _fits(current, point, max_block, max_gap, hole_list, split_set):
            current.append(point)
            continue
        if current:
            blocks.append(_block(current))
        current = [point]
    if current:
        blocks.append(_block(current))
    return blocks


def plan_device(dmap: DeviceMap, splits: Iterable[tuple[Table, int]] = ()) -> list[Block]:
    return plan_reads(dmap.points, dmap.max_block, dmap.max_gap, dmap.holes, splits)


def _fits(
    current: list[Point],
    point: Point,
    max_block: int,
    max_gap: int,
    holes: list[tuple[Table, int, int]],
    splits: set[tuple[Table, int]],
) -> bool:
    first = current[0]
    if point.table is not first.table:
        return False
    end = max(p.end for p in current)
    limit = MODBUS_MAX_BITS if first.table.is_bit else max_block
    if point.address - end > max_gap or max(end, point.end) - first.address > limit:
        return False
    if any(first.address < addr <= point.address for table, addr in splits if table is first.table):
        return False
    # A hole between the block and the new point would be read by bridging the gap.
    return not any(
        table is first.table and lo < point.address and hi >= end for table, lo, hi in holes
    )


def _block(points: list[Point]) -> Block:
    start = points[0].address
    end = max(p.end for p in points)
    return Block(points[0].table, start, end - start, tuple(points))


def block_values(block: Block, regs: list[int]) -> dict[str, list[int]]:
    """Slice one block's registers (or bits as 0/1) into each of its points."""
    return {p.key: regs[p.address - block.start : p.end - block.start] for p in block.points}
