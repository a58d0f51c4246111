"""The daily report from a real buffer file: yields, availability, completeness, meter vs
inverters, revisions after late data, and the retained message on report/daily (validated
against docs/schemas/report-daily.json)."""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import jsonschema
import pytest

from agent.energy.counters import CounterSpec
from agent.energy.daily import DeviceFacts, SiteFacts
from agent.energy.source import day_bounds
from agent.service.reporting import DailyReports, build_report
from agent.store.buffer import Buffer
from agent.store.readonly import connect_ro
from agent.uplink.messages import MessageBuilder, Topics
from drivers.model import Reading

TZ = "Asia/Shanghai"
DAY = date(2026, 12, 2)
STEP_S = 300
SCHEMA = json.loads((Path(__file__).resolve().parent.parent / "docs/schemas/report-daily.json").read_text())
SPEC = CounterSpec(resolution=0.1, wrap=2**32 * 0.1, max_kw=100.0)
FACTS = SiteFacts("demo-site", TZ, 100.0, None, None, (
    DeviceFacts("inv01", "inverter", STEP_S, "energy_total", SPEC),
    DeviceFacts("inv02", "inverter", STEP_S, "energy_total", SPEC),
    DeviceFacts("meter", "meter", STEP_S, "energy_export", CounterSpec(0.01, None, 100.0), "energy_import"),
), meter_share=0.05)


def at(hour: float) -> int:
    start = datetime.combine(DAY, datetime.min.time(), ZoneInfo(TZ))
    return int((start + timedelta(hours=hour)).timestamp() * 1000)


def kw(hour: float) -> float:
    return max(0.0, 40.0 * (1 - ((hour - 12) / 6) ** 2))  # 0 at 06:00 and 18:00, 40 kW at noon


def day_of_readings(silent: tuple[float, float] = (12.0, 14.0)) -> tuple[list[Reading], dict[str, float]]:
    """Two inverters and a meter polled every 5 min from 23:00 the day before to 24:00;
    inv02 silent over `silent`. The meter exports the inverters' power less a 0.8 kW base load."""
    out: list[Reading] = []
    c = {"inv01": 1000.0, "inv02": 5000.0, "exp": 200.0, "imp": 50.0}
    h = -1.0
    while h < 24.0 - 1e-9:
        p = kw(h)
        for inv in ("inv01", "inv02"):
            if not (inv == "inv02" and silent[0] <= h < silent[1]):
                out.append(Reading(inv, at(h), {"ac_power": round(p, 3), "energy_total": round(c[inv], 1)}))
        out.append(Reading("meter", at(h), {"ac_power": round(2 * p - 0.8, 3), "energy_export": round(c["exp"], 2),
                                            "energy_import": round(c["imp"], 2)}))
        dt = STEP_S / 3600
        c["inv01"] += p * dt
        c["inv02"] += p * dt
        c["exp"] += max(0.0, 2 * p - 0.8) * dt
        c["imp"] += max(0.0, 0.8 - 2 * p) * dt
        h += dt
    return out, c


@pytest.fixture
def buffer(tmp_path: Path) -> Buffer:
    buf = Buffer(tmp_path / "buffer.sqlite", max_mb=16)
    yield buf  # type: ignore[misc]
    buf.close()


def counters_at(readings: list[Reading], device: str, key: str, start: int, end: int) -> tuple[float, float]:
    """The device's counter at the last reading before the day and the last reading in it."""
    mine = [r for r in readings if r.device == device and key in r.values]
    before = [r for r in mine if r.ts_ms < start][-1]
    last = [r for r in mine if r.ts_ms < end][-1]
    return float(before.values[key]), float(last.values[key])


def test_a_day_from_the_buffer(buffer: Buffer) -> None:
    readings, _ = day_of_readings()
    buffer.append(readings)
    start, end = day_bounds(DAY, TZ)
    db = connect_ro(buffer.path)
    report = build_report(db, FACTS, DAY)
    db.close()
    for dev in ("inv01", "inv02"):
        a, b = counters_at(readings, dev, "energy_total", start, end)
        entry = report["devices"][dev]
        assert (entry["counter_start"], entry["counter_end"]) == (a, b)
        assert entry["yield_kwh"] == pytest.approx(b - a, abs=0.1)
    inv02 = report["devices"]["inv02"]
    assert inv02["polls_expected"] == 144 and inv02["polls_answered"] == 144 - 24  # 2 h of 12 h silent
    assert inv02["availability"] == pytest.approx(120 / 144, abs=1e-4)
    assert inv02["completeness"] == pytest.approx(120 / 144, abs=1e-4)
    assert report["devices"]["inv01"]["availability"] == 1.0
    # the counter difference across the silence is kept, not invented and not lost
    assert inv02["yield_kwh"] == pytest.approx(report["devices"]["inv01"]["yield_kwh"], abs=0.2)
    meter = report["devices"]["meter"]
    assert meter["completeness"] == 1.0
    ea, eb = counters_at(readings, "meter", "energy_export", start, end)
    station = report["station"]
    assert station["export_kwh"] == pytest.approx(eb - ea, abs=0.01)
    assert station["yield_kwh"] == pytest.approx(inv02["yield_kwh"] + report["devices"]["inv01"]["yield_kwh"])
    assert station["specific_yield"] == pytest.approx(station["yield_kwh"] / 100.0, abs=1e-4)
    # base load 0.8 kW while the sun is up (12 h) is what the meter sees less than the inverters
    assert station["meter_vs_inverters"]["difference_kwh"] == pytest.approx(-0.8 * 12, abs=0.5)
    assert station["meter_vs_inverters"]["within"] is True and "meter_mismatch" not in station["flags"]
    assert station["peak_kw"] == pytest.approx(80.0, abs=0.5)
    assert report["seq_first"] is not None and report["complete"] is True


def test_a_meter_far_from_the_inverters_is_flagged(buffer: Buffer) -> None:
    readings, _ = day_of_readings()
    buffer.append(readings)
    tight = SiteFacts(FACTS.site_id, TZ, 100.0, None, None, FACTS.devices, meter_share=0.01)
    db = connect_ro(buffer.path)
    report = build_report(db, tight, DAY)
    db.close()
    assert report["station"]["meter_vs_inverters"]["within"] is False
    assert "meter_mismatch" in report["station"]["flags"]


def test_issued_after_midnight_once_and_revised_after_late_data(buffer: Buffer) -> None:
    readings, c = day_of_readings()
    buffer.append(readings)
    reports = DailyReports(FACTS, buffer)
    _, end = day_bounds(DAY, TZ)
    assert reports.check(trusted=False, now_ms=end + 120_000) == []  # an untrusted clock does not know the day
    early = reports.check(trusted=True, now_ms=end + 10_000)  # midnight + less than the delay
    assert [(r["date"], r["revision"]) for r in early] == [("2026-12-01", 0)]  # its last hour is buffered
    first = reports.check(trusted=True, now_ms=end + 120_000)
    assert [(r["date"], r["revision"]) for r in first] == [("2026-12-02", 0)]
    assert reports.check(trusted=True, now_ms=end + 180_000) == []  # nothing new: nothing issued
    # A reading of 23:59 re-stamped after a clock correction arrives after the report.
    buffer.append([Reading("inv01", end - 30_000, {"ac_power": 0.0, "energy_total": round(c["inv01"] + 2.0, 1)},
                           ["clock:corrected"])])
    second = reports.check(trusted=True, now_ms=end + 240_000)
    assert [(r["date"], r["revision"]) for r in second] == [("2026-12-02", 1)]
    assert second[0]["devices"]["inv01"]["yield_kwh"] == pytest.approx(first[0]["devices"]["inv01"]["yield_kwh"] + 2.0,
                                                                       abs=0.1)
    assert "clock_corrected" in second[0]["devices"]["inv01"]["flags"]


def test_the_report_goes_out_retained_on_report_daily(buffer: Buffer) -> None:
    readings, _ = day_of_readings()
    buffer.append(readings)
    _, end = day_bounds(DAY, TZ)
    DailyReports(FACTS, buffer).check(trusted=True, now_ms=end + 120_000)
    rows = buffer.unsent(buffer.last_seq() - 1)
    msgs = MessageBuilder(Topics("pvgate", "demo-site"), "demo-site", 100).build(rows, "live")
    report = [m for m in msgs if m.topic == "pvgate/demo-site/report/daily"]
    assert len(report) == 1 and report[0].retain
    payload = json.loads(report[0].payload)
    jsonschema.validate(payload, SCHEMA)
    assert payload["seq"] == buffer.last_seq() and payload["ts"] == end and payload["epoch"] == buffer.epoch
    assert all(not m.retain for m in msgs if m is not report[0])


SITE = """site:
  id: s1
  capacity_kwp: 120
{extra}
mqtt: {{host: 127.0.0.1}}
agent: {{state_dir: {state}}}
links:
  - {{id: bus1, type: tcp, host: 127.0.0.1, port: 1502}}
devices:
  - {{id: inv01, link: bus1, unit: 1, profile: huawei-sun2000, interval: 10s}}
  - {{id: meter, link: bus1, unit: 11, profile: chint-dtsu666}}
"""


def test_the_site_file_gives_counters_and_the_meter_tolerance(tmp_path: Path) -> None:
    from agent.config import load_site
    from agent.service.reporting import site_facts

    site = tmp_path / "site.yaml"
    site.write_text(SITE.format(extra="  meter_tolerance: 0.03", state=tmp_path))
    facts = site_facts(load_site(site))
    assert facts.meter_share == 0.03 and facts.capacity_kwp == 120.0
    inv, meter = facts.devices
    assert (inv.kind, inv.counter, inv.spec.resolution, inv.spec.wrap) == ("inverter", "energy_total", 0.01,
                                                                          2**32 * 0.01)
    assert inv.spec.max_kw == 120.0 and inv.interval_s == 10.0
    assert (meter.kind, meter.counter, meter.import_counter, meter.spec.wrap) == ("meter", "energy_export",
                                                                                  "energy_import", None)
    site.write_text(SITE.format(extra="", state=tmp_path))
    assert site_facts(load_site(site)).meter_share == 0.05


def test_a_wrong_meter_tolerance_names_its_line(tmp_path: Path) -> None:
    from agent.config import load_site
    from drivers.errors import ConfigError

    site = tmp_path / "site.yaml"
    site.write_text(SITE.format(extra="  meter_tolerance: 5", state=tmp_path))
    with pytest.raises(ConfigError) as err:
        load_site(site)
    problems = [p for p in err.value.problems if "site.meter_tolerance" in str(p)]
    assert problems and problems[0].line == 4 and "between 0 and 1" in str(problems[0])


def test_pvgate_report_reads_the_buffer_without_changing_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import hashlib

    from agent.cli import main

    readings, _ = day_of_readings()
    path = tmp_path / "buffer.sqlite"
    buf = Buffer(path, max_mb=16)
    buf.append([r for r in readings if r.device in ("inv01", "meter")])
    buf.close()
    site = tmp_path / "site.yaml"
    site.write_text(SITE.format(extra=f"  timezone: {TZ}", state=tmp_path).replace(
        "agent:", f"buffer: {{path: {path}}}\nagent:"))
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    assert main(["report", "-c", str(site), "--day", DAY.isoformat(), "--csv"]) == 0
    rows = {line.split(",")[0]: line.split(",") for line in capsys.readouterr().out.splitlines()[1:]}
    start, end = day_bounds(DAY, TZ)
    a, b = counters_at(readings, "inv01", "energy_total", start, end)
    assert float(rows["inv01"][2]) == pytest.approx(b - a, abs=0.01)
    assert main(["report", "-c", str(site), "--month", "2026-12"]) == 0
    out = capsys.readouterr().out
    assert "2026-12-02" in out and "TOTAL" in out
    assert main(["report", "-c", str(site), "--day", "yesterday"]) == 64
    assert "expected --day YYYY-MM-DD" in capsys.readouterr().err
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_readings_restamped_into_a_reported_day_revise_it(buffer: Buffer) -> None:
    from drivers.model import Event

    readings, c = day_of_readings()
    buffer.append(readings)
    _, end = day_bounds(DAY, TZ)
    # Taken at 23:55 on a clock 10 min fast: stamped 00:05 the next day, unsynced.
    late = Reading("inv01", end + 300_000, {"ac_power": 0.0, "energy_total": round(c["inv01"] + 1.5, 1)},
                   ["clock:unsynced"])
    seq = buffer.append([late])[0]
    reports = DailyReports(FACTS, buffer)
    first = [r for r in reports.check(trusted=True, now_ms=end + 600_000) if r["date"] == DAY.isoformat()]
    assert first and first[0]["revision"] == 0
    assert buffer.restamp(seq, seq, -600_000, "clock:unsynced", "clock:corrected") == 1  # the clock came right
    assert reports.check(trusted=True, now_ms=end + 630_000) == []  # no new seq in the day: not seen yet
    buffer.append([Event("_site", end + 640_000, "clock_step", {"step_ms": -600_000, "trusted": True})])
    second = reports.check(trusted=True, now_ms=end + 660_000)
    assert [(r["date"], r["revision"]) for r in second] == [(DAY.isoformat(), 1)]
    assert second[0]["devices"]["inv01"]["yield_kwh"] == pytest.approx(first[0]["devices"]["inv01"]["yield_kwh"] + 1.5,
                                                                       abs=0.1)


def test_pruned_readings_never_make_a_revision(buffer: Buffer) -> None:
    import sqlite3

    readings, _ = day_of_readings()
    buffer.append(readings)
    _, end = day_bounds(DAY, TZ)
    reports = DailyReports(FACTS, buffer)
    assert reports.check(trusted=True, now_ms=end + 120_000)
    db = sqlite3.connect(buffer.path)  # what the room keeper does to sent rows of a full buffer
    db.execute("DELETE FROM record WHERE kind = 0 AND ts < ?", (at(3),))
    db.commit()
    db.close()
    reports.built_upto.clear()  # as after a restart
    assert reports.check(trusted=True, now_ms=end + 180_000) == []


def test_daylight_from_the_location_or_six_to_six() -> None:
    from agent.energy.daily import daylight

    rise, set_ = daylight(DAY, FACTS)
    assert (rise, set_) == (at(6), at(18))
    located = SiteFacts("s", TZ, 100.0, 36.84, 112.85, FACTS.devices)
    rise, set_ = daylight(DAY, located)  # Shanxi in December: about 07:30 to 17:20 Beijing time
    assert at(7) < rise < at(8) and at(17) < set_ < at(18)


def test_the_report_command_checks_its_date() -> None:

    from agent.uplink.commands import CommandHandler

    asked: list[str | None] = []

    class Target:
        loop = None
        publisher = None

        def site_id(self) -> str:
            return "s1"

        def report_now(self, day: str | None) -> dict[str, Any]:
            asked.append(day)
            return {"stored": True, "date": day or "today", "revision": 0}

    handler = CommandHandler(Target())  # type: ignore[arg-type]
    _, ok = handler("report", b'{"id": "r1", "date": "2026-12-02"}')
    assert ok["ok"] and ok["result"]["date"] == "2026-12-02" and asked == ["2026-12-02"]
    _, today = handler("report", b'{"id": "r2"}')
    assert today["ok"] and asked[-1] is None
    for bad in (b'{"id": "r3", "date": "02.12.2026"}', b'{"id": "r4", "date": 20261202}',
                b'{"id": "r5", "day": "2026-12-02"}'):
        _, reply = handler("report", bad)
        assert not reply["ok"] and ("date" in reply["error"] or "unknown field" in reply["error"]), reply
    assert len(asked) == 2


def test_a_report_that_could_not_be_stored_is_stored_at_the_next_check(buffer: Buffer) -> None:
    from agent.store.buffer import PartialWrite

    readings, _ = day_of_readings()
    buffer.append(readings)
    _, end = day_bounds(DAY, TZ)
    reports = DailyReports(FACTS, buffer)
    real = buffer.append_rows

    def full(rows: Any) -> list[int]:
        raise PartialWrite("buffer full", [])

    buffer.append_rows = full  # type: ignore[method-assign]
    assert reports.check(trusted=True, now_ms=end + 120_000) == []
    buffer.append_rows = real  # type: ignore[method-assign]
    got = reports.check(trusted=True, now_ms=end + 150_000)
    assert (DAY.isoformat(), 0) in [(r["date"], r["revision"]) for r in got]


def test_pvgate_report_intervals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli import main

    readings, _ = day_of_readings()
    path = tmp_path / "buffer.sqlite"
    buf = Buffer(path, max_mb=16)
    buf.append([r for r in readings if r.device == "inv01"])
    buf.close()
    site = tmp_path / "site.yaml"
    site.write_text(SITE.format(extra=f"  timezone: {TZ}", state=tmp_path).replace(
        "agent:", f"buffer: {{path: {path}}}\nagent:"))
    assert main(["report", "-c", str(site), "--day", DAY.isoformat(), "--intervals"]) == 0
    lines = capsys.readouterr().out.splitlines()
    steps = [line.split(",") for line in lines[1:] if line.startswith("inv01,")]
    assert len(steps) == 288  # every 5 min step of the day, the first from 23:55 the day before
    start, end = day_bounds(DAY, TZ)
    a, b = counters_at(readings, "inv01", "energy_total", start, end)
    assert sum(float(s[6]) for s in steps) == pytest.approx(b - a, abs=0.01)
    assert int(steps[0][2]) < start <= int(steps[0][3])
