"""pvgate-sim at night: inverters sleep (no answer) from their dusk to their dawn, unless told to
stand by; meters always answer. Over a real TCP socket, with the simulator's own process."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from drivers.devicemap import ProfileLibrary
from drivers.errors import ConfigError, DeviceError
from drivers.link import LinkClient
from drivers.model import Link, LinkType
from drivers.plan import plan_device
from simulator.cli import _load_spec, _spec, build_buses, main
from simulator.device import Fault, SimDevice
from simulator.physics import PvPlant, SimClock, Sun
from support.chain import SimDev, start_sim
from support.ports import free_port

INV = SimDev("inv", 1, "huawei-sun2000")
INV2 = SimDev("inv2", 2, "sungrow-sg")
METER = SimDev("meter", 11, "chint-dtsu666")
TZ = "Asia/Shanghai"


async def _answers(port: int, units: list[int]) -> dict[int, bool]:
    """Whether each unit answers its first planned block, within a short timeout."""
    lib = ProfileLibrary.default()
    profiles = {INV.unit: INV.profile, INV2.unit: INV2.profile, METER.unit: METER.profile}
    client = LinkClient(Link("sim", LinkType.TCP, host="127.0.0.1", port=port, timeout=0.4, retries=0))
    out: dict[int, bool] = {}
    try:
        for unit in units:
            block = plan_device(lib.get(profiles[unit]))[0]
            try:
                await client.read(block.table, block.start, block.count, unit, 0.4)
                out[unit] = True
            except DeviceError:
                out[unit] = False
    finally:
        client.close()
    return out


def test_inverter_is_silent_at_midnight_and_the_meter_answers(procs) -> None:
    port = free_port()
    start_sim(procs, port, [INV, METER], speed=0, start="00:00")  # default: night silent
    assert asyncio.run(_answers(port, [INV.unit, METER.unit])) == {INV.unit: False, METER.unit: True}


def test_standby_inverter_answers_at_midnight(procs) -> None:
    port = free_port()
    start_sim(procs, port, [INV, METER], speed=0, start="00:00", night="standby")
    assert asyncio.run(_answers(port, [INV.unit, METER.unit])) == {INV.unit: True, METER.unit: True}


def test_night_mode_per_unit(procs) -> None:
    port = free_port()
    start_sim(procs, port, [INV, INV2, METER], speed=0, start="23:30", night="2:standby")
    got = asyncio.run(_answers(port, [INV.unit, INV2.unit, METER.unit]))
    assert got == {INV.unit: False, INV2.unit: True, METER.unit: True}


def test_silent_inverter_answers_at_noon(procs) -> None:
    port = free_port()
    start_sim(procs, port, [INV, METER], speed=0, start="12:00")
    assert asyncio.run(_answers(port, [INV.unit, METER.unit])) == {INV.unit: True, METER.unit: True}


# --- in process: the sleep window follows the simulator's own sun curve ------------------------


def _device(night: str, meter: bool = False) -> SimDevice:
    profile = ProfileLibrary.default().get(METER.profile if meter else INV.profile)
    return SimDevice(1, profile, PvPlant(seed=1, meter=meter, sun=Sun(TZ)), SimClock(0.0, 0.0, 0.0), Fault(),
                     night=night)


def _local(hh: int, mm: int) -> float:
    return datetime(2026, 6, 21, hh, mm, tzinfo=ZoneInfo(TZ)).timestamp()


@pytest.mark.parametrize(("hh", "mm", "asleep"), [
    (0, 0, True), (5, 59, True), (6, 0, True), (6, 1, False), (12, 0, False), (17, 59, False), (18, 0, True),
    (23, 59, True)])
def test_sleep_window_is_where_the_sun_curve_is_zero(hh: int, mm: int, asleep: bool) -> None:
    dev = _device("silent")
    t = _local(hh, mm)
    dev.clock = SimClock(0.0, t, 0.0)  # frozen at t
    assert dev.asleep() is asleep
    assert (dev.plant.sun.fraction(t) == 0.0) is asleep


def test_standby_and_meters_never_sleep() -> None:
    for dev in (_device("standby"), _device("silent", meter=True)):
        dev.clock = SimClock(0.0, _local(0, 0), 0.0)
        assert not dev.asleep()


def test_night_option_and_file_key(tmp_path: Path) -> None:
    import argparse

    base = {"config": None, "listen": "tcp://127.0.0.1:1", "device": ["1:huawei-sun2000", "11:chint-dtsu666"],
            "fault": [], "turnaround": [], "speed": None, "start": None, "timezone": None, "control": None,
            "profiles": [], "chaos": None}
    spec = _spec(argparse.Namespace(**base, night=[]))
    assert [d.night for d in spec.listeners[0].devices] == ["silent", "silent"]
    spec = _spec(argparse.Namespace(**base, night=["standby"]))
    assert [d.night for d in spec.listeners[0].devices] == ["standby", "standby"]
    spec = _spec(argparse.Namespace(**base, night=["standby", "1:silent"]))
    assert [d.night for d in spec.listeners[0].devices] == ["silent", "standby"]
    for bad in ("dark", "7:standby"):
        with pytest.raises(ValueError, match="--night"):
            _spec(argparse.Namespace(**base, night=[bad]))
    sim = tmp_path / "sim.yaml"
    sim.write_text("listeners:\n  - listen: tcp://127.0.0.1:1\n    devices:\n"
                   "      - {unit: 1, profile: huawei-sun2000, night: standby}\n"
                   "      - {unit: 2, profile: sungrow-sg}\n", encoding="utf-8")
    buses = build_buses(_load_spec(sim), SimClock(0.0, 0.0, 0.0))
    assert {u: d.night for u, d in buses[0].devices.items()} == {1: "standby", 2: "silent"}
    sim.write_text("listeners:\n  - listen: tcp://127.0.0.1:1\n    devices:\n"
                   "      - {unit: 1, profile: huawei-sun2000, night: dark}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        _load_spec(sim)
    assert "night" in str(err.value.problems[0]) and "silent, standby" in str(err.value.problems[0])


def test_bad_night_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--listen", f"tcp://127.0.0.1:{free_port()}", "--device", "1:huawei-sun2000", "--night", "dark"])
    assert rc == 64
    assert "--night dark: expected [UNIT:]MODE" in capsys.readouterr().err
