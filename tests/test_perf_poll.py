"""Issue #16, the poll's hot path in the event loop: what a poll costs besides the Modbus
transaction itself. Relative timings in one process (min of several repeats), generous slack."""

from __future__ import annotations

import timeit
from collections.abc import Callable

from pymodbus.client.mixin import ModbusClientMixin

from drivers.codec import decode_point
from drivers.model import Block, DataType, Point, Table
from support.chain import Starter


def _best(fn: Callable[[], object], number: int = 2000) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number


def _points() -> tuple[Point, ...]:
    types = [DataType.U16, DataType.I16, DataType.U32, DataType.I32, DataType.U64] * 2
    out, address = [], 100
    for i, t in enumerate(types):
        out.append(Point(key=f"p{i}", table=Table.HOLDING, address=address, type=t, count=t.words,
                         scale=0.1 if i % 2 else 1.0))
        address += t.words
    return tuple(out)


def test_a_block_hashes_in_constant_time() -> None:
    """A block is a dict key several times per poll; its generated hash hashed every field of
    every point each time (~40x a small tuple's hash for 10 points)."""
    points = _points()
    block = Block(Table.HOLDING, 100, points[-1].end - 100, points)
    small = (Table.HOLDING, 100, 16)
    assert hash(block) == hash(Block(Table.HOLDING, 100, points[-1].end - 100, points))
    ratio = _best(lambda: hash(block)) / _best(lambda: hash(small))
    assert ratio < 8, f"hashing a 10-point block costs {ratio:.1f}x a 3-tuple's hash"


def test_decoding_a_point_costs_less_than_pymodbus_converter_alone() -> None:
    """decode_point of integer points (sentinels, scale, rounding included) used to cost ~2x
    pymodbus's convert_from_registers, which it called; with the formats compiled once, about
    1.7x (the rest: sentinels, scale). float32 points add the shortest-decimal search."""
    points = _points()
    regs = [[0x1234 + k for k in range(p.type.words)] for p in points]
    pm = ModbusClientMixin.DATATYPE

    def ours() -> None:
        for p, r in zip(points, regs):
            decode_point(p, r)

    kinds = {DataType.U16: pm.UINT16, DataType.I16: pm.INT16, DataType.U32: pm.UINT32, DataType.I32: pm.INT32,
             DataType.U64: pm.UINT64}

    def theirs() -> None:
        for p, r in zip(points, regs):
            ModbusClientMixin.convert_from_registers(list(r), kinds[p.type])

    ratio = _best(ours) / _best(theirs)
    assert ratio < 2.0, f"decode_point costs {ratio:.2f}x pymodbus's converter alone"



def test_a_modbus_tcp_answer_does_not_allocate_asyncio_s_256_kib_read(procs: Starter) -> None:
    """asyncio reads up to 256 KiB per recv: a fresh 256 KiB buffer (an mmap, mremap and munmap
    under glibc) for every answer of a few dozen bytes. The link reads 4 KiB at a time. The
    simulator runs in its own process, so only the link's reads are traced here."""
    import asyncio
    import tracemalloc

    from drivers.link import LinkClient
    from drivers.model import Link, LinkType
    from support.chain import SimDev, start_sim
    from support.ports import free_port

    port = free_port()
    start_sim(procs, port, [SimDev("inv01", 1, "huawei-sun2000")])

    async def scenario() -> int:
        client = LinkClient(Link("lan", LinkType.TCP, host="127.0.0.1", port=port, timeout=1.0))
        try:
            await client.read(Table.HOLDING, 32080, 2, 1, 1.0)  # connected, warmed up
            tracemalloc.start()
            for _ in range(20):
                await client.read(Table.HOLDING, 32080, 2, 1, 1.0)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            return peak
        finally:
            client.close()

    peak = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert peak < 128 * 1024, f"{peak / 1024:.0f} KiB allocated at the peak of 20 reads"
