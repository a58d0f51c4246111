"""The daily report over the whole chain: pvgate-sim (3 inverters and a meter), the agent as a
process, mosquitto, a subscriber; the report validated against docs/schemas/report-daily.json.

What a day means here, and why. A reading's ts is the agent's wall clock, while the simulator's
counters follow its own accelerated clock: a simulated day passes in minutes, a wall-clock day
does not. A report is about a local day *by the readings' timestamps*, so a full simulated day
cannot become one report in a test. Hence two tests, each showing one half honestly:

1. ``test_report_matches_the_simulated_energy``: the simulator runs at 240x from 10:30 (three
   simulated hours in 45 s) with one inverter silent for two simulated hours around noon; the
   site's time zone is chosen so that the test runs at local midday. The day's report is asked for
   on demand (the ``report`` command: the day so far) and compared with the simulator's
   closed-form counters: each device's counter_start and counter_end are what the simulator
   served at the first and last poll, its yield is their difference to the counter's resolution,
   and the silent inverter's yield still includes the energy made while it was silent (the
   counter difference across the gap is kept). Availability and completeness: the silent
   inverter answered as many polls fewer as the silence lasted. Meter vs inverters: the
   simulated meter exports 97 % of what inverters of its rating make (simulator/physics.py: its
   own use and losses), so the difference is -3 % of the inverters' sum, inside the band; the
   simulator's 0.8 kW base load shows in the meter's import counter (at 40 %), and the report's
   import_kwh matches it.
   Availability is a share of the polls expected since sunrise (06:00 local without a location)
   and the agent ran only for this test, so absolute shares are small: the test compares them.
2. ``test_the_report_is_issued_after_local_midnight``: the agent's wall clock is moved (the
   PVGATE_TEST_CLOCK_FILE test hook) to 20 s before a UTC midnight; without any command the
   complete report of the ending day appears retained on report/daily, revision 0, ts at
   midnight, with the yields of that day's readings.

Not shown here: a full 24-hour day at once, and a revision over the chain (unit-tested in
tests/test_energy_report.py, like resets, rollovers and gaps in tests/test_energy_counters.py).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from drivers.devicemap import ProfileLibrary
from support.chain import SimDev, agent_cmd, readings, sim_device, start_sim, write_site
from support.collector import publish
from support.ports import free_port
from support.schemas import validate_all

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "docs/schemas/report-daily.json").read_text())
INVERTERS = [SimDev("inv01", 1, "huawei-sun2000"), SimDev("inv02", 2, "huawei-sun2000"),
             SimDev("inv03", 3, "huawei-sun2000")]
METER = SimDev("meter", 11, "chint-dtsu666", rated_kw=150.0)  # the three inverters' rating together
DEVICES = [*INVERTERS, METER]
SPEED = 240.0
# The report judges a counter's step against the station's capacity in wall-clock time (a faster
# rise is another counter: a replaced device). The simulator's counters rise SPEED times faster,
# so its site file declares SPEED times the 150 kWp its inverters have.
CAPACITY = 150.0 * SPEED


def control(port: int, msg: dict[str, Any]) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall((json.dumps(msg) + "\n").encode())
        reply = json.loads(s.makefile().readline())
    assert reply.get("ok"), reply


def midday_zone() -> str:
    """A fixed-offset zone where it is about noon now (Etc/GMT-N is UTC+N)."""
    off = max(-12, min(14, 12 - datetime.now(timezone.utc).hour))
    return "Etc/GMT" if off == 0 else f"Etc/GMT{-off:+d}"


def site_file(tmp: Path, site_id: str, broker_port: int, modbus_port: int, tz: str) -> Path:
    site = write_site(tmp / "site.yaml", site_id=site_id, broker_port=broker_port, modbus_port=modbus_port,
                      devices=DEVICES, interval="1s")
    text = site.read_text(encoding="utf-8").replace(
        "  timezone: Asia/Shanghai", f"  timezone: {tz}\n  capacity_kwp: {CAPACITY:g}\n  meter_tolerance: 0.05")
    # the test machine's kernel may not be synchronised: its clock is right, trust it
    text = text.replace("agent:\n", "agent:\n  clock_sync: assume\n", 1)
    site.write_text(text, encoding="utf-8")
    return site


def served_counter(dev: SimDev, clock: Any, ts_ms: int, key: str, window_s: float = 0.6) -> tuple[float, float]:
    """The lowest and highest counter the simulator served between the poll's start and window_s later."""
    sim = sim_device(dev, clock)
    point = next(p for p in ProfileLibrary.default().get(dev.profile).points if p.key == key)
    values = [float(sim.values_at(clock.sim(ts_ms / 1000 + t))[key]) for t in (-0.05, window_s)]
    return min(values) - abs(point.scale), max(values) + abs(point.scale)


@pytest.mark.slow
def test_report_matches_the_simulated_energy(tmp_path: Path, broker, collector_factory, procs) -> None:
    port, ctl = free_port(), free_port()
    _, clock = start_sim(procs, port, DEVICES, speed=SPEED, start="10:30", control_port=ctl)
    site = site_file(tmp_path, "energy", broker.port, port, midday_zone())
    col = collector_factory(["pvgate/energy/#"])
    agent = procs(agent_cmd(site), "agent")
    agent.wait_for_line(r"running: site", timeout=20, stream="stderr")
    time.sleep(15)  # simulated 10:30 -> 11:30
    control(ctl, {"unit": 2, "fault": "silent"})
    silent_from = time.time()
    time.sleep(30)  # two simulated hours around noon
    control(ctl, {"unit": 2, "fault": "none"})
    silent_s = time.time() - silent_from
    time.sleep(6)
    publish(broker.host, broker.port, "pvgate/energy/cmd/report", json.dumps({"id": "r1"}))
    # the reply and the report travel separately (reply from the command thread, the report
    # through the buffer): either may arrive first
    col.wait_for(
        lambda ms: {"pvgate/energy/report/daily", "pvgate/energy/reply/report"} <= {m.topic for m in ms},
        timeout=30,
    )
    reply_msgs = [m for m in col.messages() if m.topic == "pvgate/energy/reply/report"]
    reply = [m.json() for m in reply_msgs]
    assert reply and reply[0]["ok"], reply
    assert validate_all(reply_msgs) == len(reply_msgs), "each reply checked against docs/schemas/reply-report.json"
    report = next(m.json() for m in col.messages() if m.topic == "pvgate/energy/report/daily")
    jsonschema.validate(report, SCHEMA)
    assert report["complete"] is False and report["revision"] == 0
    got = [r for r in readings(col.messages("pvgate/energy/data/#")) if r["seq"] <= report["seq_last"]]
    check_devices(report, got, clock)
    check_station(report, got, silent_s)
    # a center that subscribes later gets the report, retained
    late = collector_factory(["pvgate/energy/report/daily"])
    late.wait_for(lambda ms: len(ms) > 0, timeout=10)
    assert late.messages()[0].retain and late.messages()[0].json()["seq"] == report["seq"]
    assert agent.terminate(timeout=20) == 0
    check_cli_on_a_copy(tmp_path, site, report)


def check_devices(report: dict[str, Any], got: list[dict[str, Any]], clock: Any) -> None:
    for dev in DEVICES:
        key = "energy_export" if dev is METER else "energy_total"
        mine = [r for r in got if r["device"] == dev.id and key in r["values"]]
        entry = report["devices"][dev.id]
        first, last = mine[0], mine[-1]
        assert (entry["counter_start"], entry["counter_end"]) == (first["values"][key], last["values"][key])
        for r in (first, last):  # what the simulator's closed-form counter was at that poll
            lo, hi = served_counter(dev, clock, r["ts"], key)
            assert lo <= r["values"][key] <= hi, (dev.id, r, lo, hi)
        resolution = 0.01
        assert abs(entry["yield_kwh"] - (entry["counter_end"] - entry["counter_start"])) <= resolution
        sim = sim_device(dev, clock)
        integrated = (float(sim.values_at(clock.sim(last["ts"] / 1000))[key])
                      - float(sim.values_at(clock.sim(first["ts"] / 1000))[key]))
        slack = 60.0 * 0.6 * SPEED / 3600 + resolution  # the poll's own duration, at full power
        assert abs(entry["yield_kwh"] - integrated) <= slack, (dev.id, entry["yield_kwh"], integrated)
        assert entry["flags"] == [] or dev.id == "inv02" and set(entry["flags"]) <= {"gap"}


def check_station(report: dict[str, Any], got: list[dict[str, Any]], silent_s: float) -> None:
    devices, station = report["devices"], report["station"]
    inv01, inv02 = devices["inv01"], devices["inv02"]
    # inv02 was silent for silent_s; the agent found it again at its next backed-off probe (the
    # offline backoff doubles from the 1 s interval: at most 16 s late after 30 s)
    ts2 = [r["ts"] for r in got if r["device"] == "inv02"]
    hole_s = max(b - a for a, b in zip(ts2, ts2[1:])) / 1000
    assert silent_s - 2 <= hole_s <= silent_s + 17, (hole_s, silent_s)
    missing = inv01["polls_answered"] - inv02["polls_answered"]  # 1 s polls not answered
    assert abs(missing - (hole_s - 1)) <= 3, (missing, hole_s)
    assert inv02["readings"] == len([r for r in got if r["device"] == "inv02"])
    assert inv02["availability"] < inv01["availability"] and inv02["completeness"] < inv01["completeness"]
    assert abs(inv02["yield_kwh"] - inv01["yield_kwh"]) <= 0.5  # equal plants: the silence lost no kWh
    total = sum(devices[d.id]["yield_kwh"] for d in INVERTERS)
    assert abs(station["yield_kwh"] - total) <= 0.01
    assert abs(station["specific_yield"] - total / CAPACITY) <= 1e-3
    assert station["export_kwh"] == devices["meter"]["yield_kwh"]
    mvi = station["meter_vs_inverters"]
    assert abs(mvi["share"] - (-0.03)) <= 0.01, mvi  # the simulated station's own use and losses
    assert mvi["within"] is True and "meter_mismatch" not in station["flags"]
    # the base load itself (0.8 kW) is in the meter's import counter, at 40 % (physics.py)
    meter = [r for r in got if r["device"] == "meter" and "energy_import" in r["values"]]
    sim_h = (meter[-1]["ts"] - meter[0]["ts"]) / 1000 * SPEED / 3600
    assert abs(devices["meter"]["import_kwh"] - 0.8 * 0.4 * sim_h) <= 0.02, (devices["meter"], sim_h)


def check_cli_on_a_copy(tmp_path: Path, site: Path, report: dict[str, Any]) -> None:
    """`pvgate report --csv` offline, on a copied buffer file: the yields of the whole buffer."""
    copy = tmp_path / "copy.sqlite"
    shutil.copy(tmp_path / "buffer.sqlite", copy)
    out = subprocess.run([sys.executable, "-m", "agent.cli", "report", "-c", str(site), "--day", report["date"],
                          "--csv", "--buffer", str(copy)], capture_output=True, text=True, timeout=60, check=True)
    rows = {line.split(",")[0]: line.split(",") for line in out.stdout.splitlines()[1:]}
    assert set(rows) == {"inv01", "inv02", "inv03", "meter", "STATION"}
    for dev in ("inv01", "inv02", "inv03"):  # at least what the on-demand report said: the day went on
        assert float(rows[dev][2]) >= report["devices"][dev]["yield_kwh"] - 0.01
    text = subprocess.run([sys.executable, "-m", "agent.cli", "report", "-c", str(site), "--day", report["date"],
                           "--buffer", str(copy)], capture_output=True, text=True, timeout=60, check=True).stdout
    assert "meter - inverters" in text and "STATION" in text


@pytest.mark.slow
def test_the_report_is_issued_after_local_midnight(tmp_path: Path, broker, collector_factory, procs) -> None:
    port = free_port()
    start_sim(procs, port, DEVICES, speed=60.0, start="11:00")
    site = site_file(tmp_path, "midnight", broker.port, port, "UTC")
    now = time.time()
    midnight = (int(now // 86400) + 1) * 86400
    clock = tmp_path / "clock.json"
    clock.write_text(json.dumps({"offset_s": midnight - 20 - now, "synced": True}))
    col = collector_factory(["pvgate/midnight/#"])
    agent = procs(agent_cmd(site), "agent", env={**os.environ, "PVGATE_TEST_CLOCK_FILE": str(clock)})
    agent.wait_for_line(r"running: site", timeout=20, stream="stderr")
    col.wait_for(lambda ms: any(m.topic == "pvgate/midnight/report/daily" for m in ms), timeout=90)
    report = next(m.json() for m in col.messages() if m.topic == "pvgate/midnight/report/daily")
    jsonschema.validate(report, SCHEMA)
    day = datetime.fromtimestamp(midnight - 1, timezone.utc).date().isoformat()
    assert (report["date"], report["revision"], report["complete"], report["ts"]) == (day, 0, True, midnight * 1000)
    got = [r for r in readings(col.messages("pvgate/midnight/data/#")) if r["ts"] < midnight * 1000]
    for dev in INVERTERS:
        mine = [r["values"]["energy_total"] for r in got if r["device"] == dev.id and "energy_total" in r["values"]]
        entry = report["devices"][dev.id]
        assert (entry["counter_start"], entry["counter_end"]) == (mine[0], mine[-1])
        assert abs(entry["yield_kwh"] - (mine[-1] - mine[0])) <= 0.01
    assert report["seq_last"] < report["seq"]
    assert agent.terminate(timeout=20) == 0
