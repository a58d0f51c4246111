"""Every shipped device map, served by pvgate-sim over Modbus TCP, decodes back to the simulator's own state."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from drivers.decode import decode_blocks
from drivers.devicemap import ProfileLibrary
from drivers.link import LinkClient
from drivers.model import Link, LinkType, Point
from drivers.plan import plan_device
from simulator.device import SimDevice, status_code
from support.chain import SimDev, sim_device, start_sim
from support.ports import free_port

LIBRARY = ProfileLibrary.default()
FLAT_MAPS = [i for i in LIBRARY.ids() if not LIBRARY.get(i).sunspec]
# GoodWe's PV input power and the Acrel meter's power words are signed 16-bit W (32.767 kW at
# most): plants that fit them.
RATED_KW = {"goodwe-dt": 25.0, "acrel-adl3000": 25.0}
DEVICES = [SimDev(f"d{i}", i + 1, pid, RATED_KW.get(pid, 40.0 + i)) for i, pid in enumerate(FLAT_MAPS)]


def _close(point: Point, got: object, want: object) -> bool:
    if isinstance(want, str) or isinstance(got, str):
        return got == want
    assert isinstance(got, (int, float)) and isinstance(want, (int, float))
    return abs(got - want) <= abs(point.scale) / 2 + 1e-6 * abs(want) + 1e-9


async def _read_all(port: int, devs: list[SimDevice]) -> dict[int, tuple[dict[str, object], list[str]]]:
    client = LinkClient(Link("sim", LinkType.TCP, host="127.0.0.1", port=port, timeout=2.0))
    out = {}
    try:
        for dev in devs:
            blocks = plan_device(dev.profile)
            regs = {i: await client.read(b.table, b.start, b.count, dev.unit, 2.0) for i, b in enumerate(blocks)}
            out[dev.unit] = decode_blocks(blocks, regs)
    finally:
        client.close()
    return out


@pytest.mark.parametrize("start", ["12:00", "23:00"], ids=["noon", "night"])
def test_every_shipped_map_decodes_back_to_the_simulated_state(start: str, procs, tmp_path: Path) -> None:
    assert len(FLAT_MAPS) >= 6
    port = free_port()
    # A frozen clock: nothing moves. Standby: the inverters answer at night too (what is tested
    # here is the decoding; silence at night is tested in test_sim_night.py).
    _, clock = start_sim(procs, port, DEVICES, speed=0, start=start, night="standby")
    devs = [sim_device(d, clock) for d in DEVICES]
    decoded = asyncio.run(_read_all(port, devs))
    for dev in devs:
        values, quality = decoded[dev.unit]
        want = dev.values_at(clock.sim0)
        # A point valid only in some states (valid_when) is left out while its state is another.
        off = {p.key for p in dev.profile.points if p.valid_when is not None
               and want[p.valid_when[0]] not in p.valid_when[1]}
        assert quality == [f"invalid:{k}" for k in sorted(off)], (dev.profile.id, quality)
        assert not off & set(values), (dev.profile.id, off & set(values))
        wrong = {p.key: (values.get(p.key), want[p.key]) for p in dev.profile.points
                 if p.publish and p.key not in off and not _close(p, values.get(p.key), want[p.key])}
        assert not wrong, f"{dev.profile.id}: decoded vs served {wrong}"
        status = next((p for p in dev.profile.points if p.key == "status" and p.enum), None)
        if status is not None:  # each vendor's own code for producing / idle, named by its enum
            assert values["status"] == status_code(status, start == "12:00")
            assert values["status"] in dict(status.enum)
