"""Time over the whole chain: wall-clock steps, re-stamping, and a night of sleeping inverters.

Real parts: mosquitto, pvgate-sim over TCP, the agent as a process, a subscriber. Two injected
faults, named as the agent names them (agent/service/timekeeping.py):
- PVGATE_TEST_CLOCK_FILE moves the agent's wall time (Python's time.time, the monotonic clock
  untouched) and its kernel-sync answer, the way NTP or a 4G modem steps a gateway's clock: the OS
  could only do that to the whole machine;
- PVGATE_TEST_SUN_CLOCK lets the agent's night policy read the simulator's accelerated clock, so
  a night passes in a minute.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from agent.clock.trust import RELEASE_FLOOR_MS
from simulator.physics import SimClock
from support.chain import (
    SimDev,
    agent_cmd,
    assert_every_seq_once_in_content,
    buffer_seqs,
    data_and_events,
    readings,
    records,
    seqs_of,
    sim_cmd,
    start_sim,
    write_site,
)
from support.ports import free_port
from support.uplink import Uplink

DEVICES = [SimDev("inv01", 1, "huawei-sun2000"), SimDev("meter", 11, "chint-dtsu666")]
YEAR_S = 365 * 86400


def set_clock(path: Path, offset_s: float, synced: bool) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"offset_s": offset_s, "synced": synced}))
    os.replace(tmp, path)


def _unsent(buffer: Path) -> set[int]:
    with sqlite3.connect(f"file:{buffer}?mode=ro", uri=True) as db:
        return {int(r[0]) for r in db.execute("SELECT seq FROM unsent")}


def start_agent_with(procs: Any, site: Path, env: dict[str, str], name: str = "agent") -> Any:
    proc = procs(agent_cmd(site), name, env={**os.environ, **env})
    proc.wait_for_line(r"running: site", timeout=20, stream="stderr")
    return proc


def events(msgs: list[Any], kind: str) -> list[dict[str, Any]]:
    return [m.json() for m in msgs if "/events/" in m.topic and m.json().get("event") == kind]


@pytest.mark.slow
def test_polling_keeps_its_interval_through_clock_steps(tmp_path: Path, broker, collector_factory, procs) -> None:
    port = free_port()
    _, sim_clock = start_sim(procs, port, DEVICES, speed=1)  # the inverter's own clock: simulated time
    site = write_site(tmp_path / "site.yaml", site_id="steps", broker_port=broker.port, modbus_port=port,
                      devices=DEVICES, interval="1s")
    clock = tmp_path / "clock.json"
    # Boot with a clock at 1970 and no sync, as a gateway without a battery-backed clock does.
    boot_offset = -(time.time() - 86400)
    set_clock(clock, boot_offset, synced=False)
    col = collector_factory(["pvgate/steps/#"])
    agent = start_agent_with(procs, site, {"PVGATE_TEST_CLOCK_FILE": str(clock)})
    phases = [(0.0, "to now"), (-600.0, "back 10 min"), (10 * YEAR_S, "forward 10 years"),
              (10 * YEAR_S + 8 * 3600, "forward 8 h")]
    windows: list[tuple[float, float]] = []
    time.sleep(5)
    for offset, _ in phases:
        set_clock(clock, offset, synced=True)
        start = time.monotonic()
        time.sleep(6)
        windows.append((start, time.monotonic()))
    assert agent.terminate(timeout=15) == 0
    last, _ = buffer_seqs(tmp_path / "buffer.sqlite")
    unsent = _unsent(tmp_path / "buffer.sqlite")  # committed at the stop, published at the next start
    col.wait_for(lambda ms: set(range(1, last + 1)) - unsent <= set(seqs_of(data_and_events(ms))), timeout=15,
                 desc="every seq the station sent")
    msgs = data_and_events(col.messages("pvgate/steps/#"))

    steps = events(msgs, "clock_step")
    assert len(steps) == 4, steps
    expected = [-boot_offset * 1000, -600_000, (10 * YEAR_S + 600) * 1000, 8 * 3600 * 1000]
    for step, want in zip(steps, expected):
        assert abs(step["step_ms"] - want) < 3000, (step, want)
        assert step["trusted"] is True and step["device"] == "_site"
    assert steps[0]["trusted_before"] is False
    # The inverter's clock (Huawei system time, read with its nameplate) as a witness: after each
    # step the event reports it against the gateway's new clock.
    for step, (offset, _) in zip(steps, phases):
        witness = dict(item.split(":") for item in step["device_offsets_ms"].split(","))
        want = (sim_clock.sim0 - sim_clock.real0 - offset) * 1000
        assert abs(int(witness["inv01"]) - want) < 2500, (witness, want)

    got, _ = records(msgs)
    assert_every_seq_once_in_content(got, last, allowed_missing=unsent)  # no seq gap, no duplicate
    data = readings([m for m in msgs if "/data/" in m.topic])
    for dev in ("inv01", "meter"):
        arrivals = sorted(m.t for m in msgs if m.topic.endswith(f"/data/{dev}"))
        for (start, end), (_, what) in zip(windows, phases):
            # After each step the device keeps its 1 s interval: no pause, no burst, no catch-up.
            n = sum(1 for t in arrivals if start + 1.5 <= t < end)
            assert 3 <= n <= 6, f"{dev} after the step {what}: {n} readings in {end - start - 1.5:.1f} s"
    for r in data:
        untrusted = r["ts"] < RELEASE_FLOOR_MS
        assert ("clock:unsynced" in r["q"]) == untrusted, r


def test_readings_buffered_on_an_unsynchronised_clock_are_restamped(tmp_path: Path, broker_factory,
                                                                   collector_factory, procs) -> None:
    broker = broker_factory(start=False)
    port = free_port()
    start_sim(procs, port, DEVICES, speed=60)
    clock = tmp_path / "clock.json"
    set_clock(clock, -(time.time() - 86400), synced=False)
    with Uplink(broker.port) as uplink:
        uplink.open.clear()
        site = write_site(tmp_path / "site.yaml", site_id="restamp", broker_port=uplink.port, modbus_port=port,
                          devices=DEVICES, interval="500ms")
        started_ms = time.time() * 1000
        agent = start_agent_with(procs, site, {"PVGATE_TEST_CLOCK_FILE": str(clock)})
        time.sleep(4)
        set_clock(clock, 0.0, synced=True)  # NTP reaches the gateway while the broker is still down
        time.sleep(2.5)
        stepped_ms = time.time() * 1000
        broker.start()
        col = collector_factory(["pvgate/restamp/#"], broker=broker)
        uplink.open.set()
        col.wait_for(lambda ms: len(events(data_and_events(ms), "clock_step")) == 1, timeout=40, desc="clock_step")
        step = events(data_and_events(col.messages()), "clock_step")[0]
        before = step["seq_before"]
        col.wait_for(lambda ms: set(range(1, before + 1)) <= set(seqs_of(data_and_events(ms))), timeout=40,
                     desc="everything buffered before the step")
        agent.terminate(timeout=15)
    early = [r for r in readings([m for m in col.messages() if "/data/" in m.topic]) if r["seq"] <= before]
    corrected = [r for r in early if "clock:corrected" in r["q"]]
    assert len(corrected) >= 8 and step["restamped"] == len(corrected)
    assert not [r for r in early if "clock:unsynced" in r["q"]], "every reading stamped before the step is corrected"
    # The untrusted stretch starts right after the new buffer's buffer_reset (seq 1).
    assert step["unsynced_first_seq"] == 2 and step["trusted"] is True
    for r in corrected:
        assert started_ms - 2000 <= r["ts"] <= stepped_ms + 1000, r  # today, not 1970


@pytest.mark.slow
def test_a_night_of_sleeping_inverters_over_the_chain(tmp_path: Path, broker, collector_factory, procs) -> None:
    """From 11:30 to 06:40 next day at 1200x (about 58 s): three inverters and a meter, inverter 3
    silent from the start (a fault at noon). pvgate-sim's inverters stop answering at 18:00
    and answer again from 06:00; the site is at 30°N 120°E, where the sun sets at about 18:13 and
    rises at about 06:07 on 20 March (NOAA)."""
    devices = [SimDev("inv01", 1, "huawei-sun2000"), SimDev("inv02", 2, "huawei-sun2000"),
               SimDev("inv03", 3, "huawei-sun2000"), SimDev("meter", 11, "chint-dtsu666")]
    port = free_port()
    cmd = sim_cmd(port, devices, speed=1200, start="2026-03-20T11:30") + ["--fault", "3:silent"]
    sim = procs(cmd, "sim")
    ready = json.loads(sim.wait_for_line(r'^\{"event": "ready".*$', timeout=15, stream="stdout").group(0))
    c = ready["clock"]
    sim_clock = SimClock(c["real0"], c["sim0"], c["speed"])
    site = write_site(tmp_path / "site.yaml", site_id="night", broker_port=broker.port, modbus_port=port,
                      devices=devices, interval="1s")
    site.write_text(site.read_text().replace("  timezone: Asia/Shanghai",
                                             "  timezone: Asia/Shanghai\n  location: {lat: 30.0, lon: 120.0}"))
    col = collector_factory(["pvgate/night/#"])
    agent = start_agent_with(procs, site, {"PVGATE_TEST_SUN_CLOCK": f"{c['real0']},{c['sim0']},{c['speed']}"})
    end_sim = sim_clock.sim0 + 19.2 * 3600
    col.wait_for(lambda ms: sim_clock.sim(time.time()) >= end_sim and len(events(ms, "wake")) >= 2,
                 timeout=90, desc="dawn and two wake events")
    agent.terminate(timeout=15)
    msgs = col.messages("pvgate/night/#")

    def local_h(ev: dict[str, Any]) -> float:  # simulated local hours since midnight of the first day
        return 11.5 + (sim_clock.sim(ev["ts"] / 1000) - sim_clock.sim0) / 3600

    for dev in ("inv01", "inv02"):
        mine = [e for e in data_and_events(msgs) if e.topic.endswith(f"/events/{dev}")]
        kinds = [m.json()["event"] for m in mine]
        assert "offline" not in kinds, f"{dev}: no offline at dusk: {kinds}"
        sleep = [m.json() for m in mine if m.json()["event"] == "sleep"]
        wake = [m.json() for m in mine if m.json()["event"] == "wake"]
        assert len(sleep) == 1 and len(wake) == 1, kinds
        # Silent from 18:00; three failed polls, each a tick plus its timeouts: at 1200x a real
        # second is 20 simulated minutes, so the verdict comes about 1.5 h after dusk.
        assert 18.0 <= local_h(sleep[0]) <= 20.5, local_h(sleep[0])
        assert 24 + 5.2 <= local_h(wake[0]) <= 24 + 6.9, local_h(wake[0])  # probing resumes 45 min before sunrise
    inv3 = [m.json() for m in data_and_events(msgs) if m.topic.endswith("/events/inv03")]
    assert [e["event"] for e in inv3][:1] == ["offline"], inv3  # silent at noon: a fault, not sleep
    assert local_h(inv3[0]) < 13.5 and "daylight" in inv3[0]["reason"]
    assert not [e for e in inv3 if e["event"] in ("sleep", "wake")]
    meter = sorted(m.t for m in msgs if m.topic.endswith("/data/meter"))
    # The meter is polled through the night. It shares its link with the inverters, whose silent
    # polls cost timeouts at dusk: a few seconds' delay there, never a stop.
    assert max(b - a for a, b in zip(meter, meter[1:])) < 5.0, "the meter is polled through the night"
    assert len(meter) >= 0.8 * (meter[-1] - meter[0]), "about one meter reading per 1 s interval"
    assert not [m for m in data_and_events(msgs) if m.topic.endswith("/events/meter")
                and m.json()["event"] in ("offline", "sleep")]
