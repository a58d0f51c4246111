"""A SunSpec meter's vendor decides its W sign: read at discovery, applied to the meter's values only.

SolarEdge meters report + = export, where pvgate reads SunSpec meters IEC-style (+ = import) and
negates (drivers/sign.py cites the sources). The device is pvgate-sim's SunSpec inverter with its
meter model 203, over a real TCP socket, its common model's Mn set to each vendor in turn. The
simulator writes IEC-style W whatever its Mn says, so under "SolarEdge" the meter's published power
must come out with the other sign: that proves pvgate read Mn and applied the rule to the meter only.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from test_sunspec import NOON, TZ, ServerThread

from agent.poller import LinkWorker
from agent.poller.vendor import meter_prefix, vendor_values
from drivers.model import Device, DeviceMap, Link, LinkType, Reading
from simulator import sunspec as sim_sunspec
from simulator.physics import PvPlant, SimClock, Sun
from simulator.server import Listen
from support.ports import free_port

PLACEHOLDER = DeviceMap(id="sunspec", name="SunSpec device", source="site", points=(), sunspec=True)


def test_meter_prefix_and_vendor_values() -> None:
    assert meter_prefix([1, 103, 120, 160]) is None
    assert meter_prefix([1, 203]) == ""
    assert meter_prefix([1, 103, 203]) == "meter_"
    values = {"ac_power": 40.0, "meter_ac_power": -5.0, "meter_phase_a_power": -1.7, "meter_energy_export": 20.0}
    assert vendor_values(values, "SolarEdge", "meter_") == {**values, "meter_ac_power": 5.0, "meter_phase_a_power": 1.7}
    assert vendor_values(values, "Fronius", "meter_") == values
    assert vendor_values({"ac_power": -5.0}, "SolarEdge", "") == {"ac_power": 5.0}
    assert vendor_values({"ac_power": -5.0}, "SolarEdge", None) == {"ac_power": -5.0}


async def _poll(port: int) -> Reading:
    link = Link("lan", LinkType.TCP, host="127.0.0.1", port=port, timeout=2.0, retries=1)
    got: list[Reading] = []
    worker = LinkWorker(link, [Device("sun", "lan", 1, PLACEHOLDER)],
                        lambda r: got.append(r) if isinstance(r, Reading) else None)
    task = asyncio.create_task(worker.run())
    try:
        worker.request("sun")
        deadline = time.monotonic() + 20
        while not got and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert got, "no reading"
    return got[0]


@pytest.mark.parametrize("vendor", ["pvgate", "SolarEdge"])
def test_the_meter_sign_follows_the_vendor_read_at_discovery(vendor: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sim_sunspec, "MANUFACTURER", vendor)
    clock = SimClock(time.time(), NOON, 0.0)
    dev = sim_sunspec.make_sim_device(1, PvPlant(rated_kw=50.0, seed=1, sun=Sun(TZ)), clock)
    served = dev.values_at(clock.sim())
    port = free_port()
    with ServerThread(Listen("tcp", "127.0.0.1", port), {1: dev}):
        reading = asyncio.run(_poll(port))
    flip = -1.0 if vendor == "SolarEdge" else 1.0
    assert reading.values["meter_ac_power"] == pytest.approx(flip * float(served["meter_ac_power"]), abs=0.01)
    assert reading.values["ac_power"] == pytest.approx(float(served["ac_power"]), abs=0.01), "the inverter's own"
    assert reading.values["meter_energy_export"] == pytest.approx(float(served["meter_energy_export"]), rel=1e-3)
