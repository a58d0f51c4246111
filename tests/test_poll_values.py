"""What the poller does to decoded values before they reach the buffer: strict JSON and meter signs.

The link is a fake (unit test); the decoding, the sign correction and the reading are real.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from test_poller_unit import LINK, FakeClient, Recorder, Unit, run

from agent.config import load_site
from agent.poller import LinkWorker
from drivers.errors import ConfigError
from drivers.model import DataType, Device, DeviceMap, Point, Reading, Table
from drivers.publishable import finite_only

INF_F32 = [0x7F80, 0x0000]  # IEEE 754 +Infinity
NAN_F32 = [0x7FC0, 0x0000]
KW_5 = [0x40A0, 0x0000]  # 5.0


class Registers(FakeClient):
    """Answers each read from a fixed register image (holding table)."""

    def __init__(self, image: dict[int, int]) -> None:
        super().__init__(LINK, {1: Unit()})
        self.image = image

    async def read(self, table: Table, address: int, count: int, unit: int, timeout: float) -> list[int]:
        await asyncio.sleep(0.001)
        return [self.image.get(a, 0) for a in range(address, address + count)]


def f32_map(*keys: str) -> DeviceMap:
    points = tuple(Point(k, Table.HOLDING, 2 * i, DataType.F32, 2) for i, k in enumerate(keys))
    return DeviceMap("f32", "f32", "test", points, max_block=125, max_gap=16)


async def one_reading(dev: Device, image: dict[int, int]) -> Reading:
    rec = Recorder()
    worker = LinkWorker(LINK, [dev], rec, client=Registers(image))  # type: ignore[arg-type]
    task = asyncio.create_task(worker.run())
    try:
        worker.request(dev.id)
        while not rec.readings(dev.id):
            await asyncio.sleep(0.01)
        return rec.readings(dev.id)[0]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_infinity_and_nan_from_a_float_register_are_left_out_and_flagged() -> None:
    dmap = f32_map("ac_power", "grid_frequency", "temperature")
    image = dict(zip(range(6), [*KW_5, *INF_F32, *NAN_F32]))
    reading = run(one_reading(Device("inv", "bus1", 1, dmap), image))
    assert reading.values == {"ac_power": 5.0}
    assert "invalid:grid_frequency" in reading.quality
    json.dumps(reading.values, allow_nan=False)  # strict JSON: raises on NaN or Infinity


def test_finite_only_keeps_finite_values_and_flags_each_bad_key_once() -> None:
    values, quality = finite_only({"a": 1.5, "b": float("-inf"), "c": "text"}, ["invalid:b"])
    assert values == {"a": 1.5, "c": "text"}
    assert quality == ["invalid:b"]


def test_an_inverted_meter_publishes_export_positive_and_swaps_its_counters() -> None:
    dmap = f32_map("ac_power", "energy_import", "energy_export")
    image = dict(zip(range(6), [*KW_5, 0x4120, 0, 0x4248, 0]))  # 5 kW, import 10, export 50
    plain = run(one_reading(Device("m", "bus1", 1, dmap), image))
    inverted = run(one_reading(Device("m", "bus1", 1, dmap, invert_power=True), image))
    assert plain.values == {"ac_power": 5.0, "energy_import": 10.0, "energy_export": 50.0}
    assert inverted.values == {"ac_power": -5.0, "energy_import": 50.0, "energy_export": 10.0}


SITE = """site: {id: s1}
mqtt: {host: 127.0.0.1}
buffer: {path: %s}
links:
  - {id: bus1, type: tcp, host: 127.0.0.1, port: 1502}
devices:
  - {id: meter, link: bus1, unit: 11, profile: chint-dtsu666, invert_power: %s}
"""


def test_invert_power_is_read_from_the_site_file_and_must_be_a_boolean(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(SITE % (tmp_path / "b.sqlite", "true"))
    assert load_site(site).devices[0].invert_power is True
    site.write_text(SITE % (tmp_path / "b.sqlite", "42"))
    with pytest.raises(ConfigError) as err:
        load_site(site)
    assert any(p.line == 7 and "invert_power" in str(p) for p in err.value.problems), err.value.problems


def _strict(text: str) -> object:
    def refuse(token: str) -> object:
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def test_infinity_from_a_real_float_register_never_reaches_the_center(tmp_path: Path, broker, collector_factory,
                                                                      procs) -> None:
    """pvgate-sim serves +Infinity in the DTSU666's float register for the A-B line voltage (set at
    run time through its control port); the center, parsing strictly, gets every message."""
    import socket

    from support.chain import SimDev, readings, start_agent, start_sim, write_site
    from support.ports import free_port

    port, ctl = free_port(), free_port()
    meter = SimDev("meter", 11, "chint-dtsu666")
    _, clock = start_sim(procs, port, [meter], speed=60, control_port=ctl)
    site = write_site(tmp_path / "site.yaml", site_id="inf", broker_port=broker.port, modbus_port=port,
                      devices=[meter], interval="500ms")
    col = collector_factory(["pvgate/inf/data/#"])
    start_agent(procs, site, sim_clock=clock)
    with socket.create_connection(("127.0.0.1", ctl), timeout=5) as s:
        s.sendall(b'{"unit": 11, "set": {"line_ab_voltage": Infinity}}\n')
        assert json.loads(s.makefile().readline())["ok"]
    col.wait_for(lambda ms: any("invalid:line_ab_voltage" in r["q"] for r in readings(ms)), timeout=20,
                 desc="a reading with the infinite point flagged")
    for m in col.messages():
        _strict(m.payload.decode())  # raises on Infinity or NaN
    flagged = [r for r in readings(col.messages()) if "invalid:line_ab_voltage" in r["q"]]
    assert all("line_ab_voltage" not in r["values"] and "line_bc_voltage" in r["values"] for r in flagged)
