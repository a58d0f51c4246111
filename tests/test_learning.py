"""Register sets learned exactly: bisection over refused blocks, re-merged plans, kept across restarts.

Unit tests use a fake reader or link (named so); the chain test holds pvgate's Huawei map against
a register image written from the vendor table with one more register taken out, served by
pvgate-sim over TCP, with the agent as a process.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from test_poller_unit import LINK, FakeClient, Recorder, Unit, device, run

from agent.poller import LinkWorker
from agent.poller.learning import Bisection, Learned, fingerprint
from drivers.errors import DeviceError
from drivers.model import DataType, DeviceMap, Point, Table
from support.chain import SimDev, agent_cmd, readings, write_site
from support.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
HUAWEI_IMAGE = ROOT / "config" / "images" / "huawei-sun2000-50ktl-m3.yaml"


def u16_map(*addresses: int, max_gap: int = 16) -> DeviceMap:
    points = tuple(Point(f"p{a}", Table.HOLDING, a, DataType.U16, 1) for a in addresses)
    return DeviceMap("sparse", "sparse", "test", points, max_block=125, max_gap=max_gap)


class FakeDevice:
    """Injected: a device that refuses any read touching an address it does not have."""

    def __init__(self, missing: set[int], max_count: int = 125) -> None:
        self.missing = missing
        self.max_count = max_count
        self.reads: list[tuple[int, int]] = []

    async def read(self, table: Table, start: int, count: int) -> list[int]:
        self.reads.append((start, count))
        if count > self.max_count or any(start <= a < start + count for a in self.missing):
            raise DeviceError("illegal address", exception_code=2)
        return [0] * count


def test_bisection_finds_the_hole_between_two_readable_halves() -> None:
    dmap = u16_map(0, 1, 2, 3, 4, 6, 7, 8, 9, 10)  # the map bridges 5; the device has no 5
    dev, learned = FakeDevice({5}), Learned(fingerprint(dmap))
    run(Bisection(dev.read, learned).run(list(dmap.points)))
    assert learned.holes == {(Table.HOLDING, 5, 5)} and not learned.unsupported and not learned.splits
    assert len(dev.reads) == 2


def test_bisection_marks_a_refused_point_unsupported_and_a_size_limit_as_a_split() -> None:
    dmap = u16_map(0, 1, 2, 3, 20, 21, 22, 23)
    dev, learned = FakeDevice({21}), Learned(fingerprint(dmap))
    run(Bisection(dev.read, learned).run(list(dmap.points)))
    assert learned.unsupported == {"p21"}
    contiguous = u16_map(*range(8))
    small, learned2 = FakeDevice(set(), max_count=4), Learned(fingerprint(contiguous))
    run(Bisection(small.read, learned2).run(list(contiguous.points)))
    assert learned2.splits == {(Table.HOLDING, 4)} and not learned2.holes


def test_bisection_stops_at_its_budget() -> None:
    dmap = u16_map(*range(0, 200, 2))  # every odd register missing: the worst case
    dev, learned = FakeDevice(set(range(1, 200, 2))), Learned(fingerprint(dmap))
    run(Bisection(dev.read, learned, budget=10).run(list(dmap.points)))
    assert len(dev.reads) <= 10 and learned.splits  # the rest is left to plain splits, no endless probing


def test_learned_sets_survive_json() -> None:
    learned = Learned("abc", {(Table.HOLDING, 5, 7)}, {(Table.INPUT, 9)}, {"p3"}, 123.0, "SUN2000|V1")
    assert Learned.from_json(json.loads(json.dumps(learned.to_json()))) == learned


class RefusingClient(FakeClient):
    """Injected: units refuse reads that touch their missing addresses (exception 2)."""

    def __init__(self, units: dict[int, Unit]) -> None:
        super().__init__(LINK, units)
        self.refused = 0

    async def read(self, table: Table, address: int, count: int, unit: int, timeout: float) -> list[int]:
        try:
            return await super().read(table, address, count, unit, timeout)
        except DeviceError as err:
            if err.exception_code == 2:
                self.refused += 1
            raise


def test_one_device_learns_and_its_siblings_start_from_it() -> None:
    dmap = u16_map(0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 40, 41)
    devices = [device(f"inv{u}", u, dmap) for u in (1, 2, 3)]
    client = RefusingClient({u: Unit(refuse={5}) for u in (1, 2, 3)})
    taught: list[str] = []

    async def body() -> None:
        worker = LinkWorker(LINK, devices, Recorder(), client=client,  # type: ignore[arg-type]
                            learned_sink=lambda d, _l: taught.append(d))
        task = asyncio.create_task(worker.run())
        try:
            for _ in range(2):
                for d in devices:
                    worker.request(d.id)
                while any(s.queued for s in worker.states.values()):
                    await asyncio.sleep(0.01)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert client.refused == 1, "only the first device's merged read was refused"
        for state in worker.states.values():
            assert [(b.start, b.count) for b in state.blocks] == [(0, 5), (6, 5), (40, 2)]
            assert state.polls == 2 and state.failed_polls == 0
        assert sorted(taught) == ["inv1", "inv2", "inv3"]

    run(body())


def _image_without(tmp_path: Path, address: int) -> Path:
    """The vendor image with one more register taken out: a device our map does not describe."""
    text = HUAWEI_IMAGE.read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    data["tables"]["holding"].pop(address)
    path = tmp_path / "image.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_a_map_held_against_a_device_it_does_not_describe(tmp_path: Path, broker, collector_factory, procs) -> None:
    port = free_port()
    image = _image_without(tmp_path, 32078)  # no peak power register on this device
    sim = procs([sys.executable, "-m", "simulator.cli", "--listen",
                 f"tcp://127.0.0.1:{port}", "--device", f"1:huawei-sun2000:image={image}", "--night", "standby"],
                "sim")
    sim.wait_for_line(r'^\{"event": "ready".*$', timeout=15, stream="stdout")
    site = write_site(tmp_path / "site.yaml", site_id="sparse", broker_port=broker.port, modbus_port=port,
                      devices=[SimDev("inv01", 1, "huawei-sun2000")], interval="1s")
    col = collector_factory(["pvgate/sparse/#"])

    def run_agent(name: str) -> tuple[list[dict[str, Any]], str]:
        col.clear()
        agent = procs(agent_cmd(site), name)
        agent.wait_for_line(r"running: site", timeout=20, stream="stderr")
        col.wait_for(lambda ms: len(readings([m for m in ms if "/data/" in m.topic])) >= 4, timeout=30,
                     desc="4 readings")
        assert agent.terminate(timeout=15) == 0
        return readings([m for m in col.messages() if "/data/" in m.topic]), agent.stderr()

    first, log1 = run_agent("agent1")
    assert re.search(r"device=inv01 block holding \d+\+\d+ refused: learned", log1), log1
    learned = json.loads((tmp_path / "learned-registers.json").read_text())["inv01"]
    assert "peak_power_today" in learned["unsupported"] and learned["holes"]
    for r in first:
        assert "peak_power_today" not in r["values"] and "unsupported:peak_power_today" in r["q"], r
        assert r["values"]["ac_power"] == 48.21 and r["values"]["energy_total"] == 123456.78  # the vendor's words
        # every other point the map has and the device serves is published
        assert {"pv1_voltage", "grid_frequency", "internal_temperature", "reactive_power"} <= set(r["values"])
    time.sleep(0.2)
    second, log2 = run_agent("agent2")
    assert "refused" not in log2, "after a restart the learned set is used: no read is refused again"
    assert second and all("unsupported:peak_power_today" in r["q"] for r in second)
