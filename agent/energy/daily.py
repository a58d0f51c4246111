"""The daily report of Contract 2 (``P/S/report/daily``), built from a local day's buffer rows.

Pure: rows in, a JSON-ready dict out (the message's own ``v``, ``site``, ``epoch``, ``seq`` and
``ts`` are added by the publisher from the row the report is stored in). docs/energy.md says
what every field means.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time
from typing import Any
from zoneinfo import ZoneInfo

from agent.clock.sun import sun_times
from agent.energy.counters import CounterSpec, DayEnergy, Sample, daily
from agent.energy.source import DataRow, day_bounds

FALLBACK_DAYLIGHT = (6, 18)  # local hours, when the site has no location
DEFAULT_METER_SHARE = 0.05  # site.meter_tolerance: |meter export - inverters| / inverters allowed


@dataclass(frozen=True)
class DeviceFacts:
    id: str
    kind: str  # "inverter", "meter" or "unknown" (agent.clock.device_kind)
    interval_s: float
    counter: str | None  # the key of the counter its energy is read from
    spec: CounterSpec = CounterSpec()
    import_counter: str | None = None  # a meter's energy_import, reported beside its export


@dataclass(frozen=True)
class SiteFacts:
    site_id: str
    timezone: str
    capacity_kwp: float | None
    lat: float | None
    lon: float | None
    devices: tuple[DeviceFacts, ...] = field(default_factory=tuple)
    meter_share: float = DEFAULT_METER_SHARE


def daylight(day: date, site: SiteFacts) -> tuple[int, int]:
    """UTC ms of sunrise and sunset at the site (06:00-18:00 local without a location)."""
    if site.lat is not None and site.lon is not None:
        rise, set_ = sun_times(day, site.lat, site.lon, site.timezone)
        if rise is not None and set_ is not None:  # also the midnight sun: the whole day
            return int(rise.timestamp() * 1000), int(set_.timestamp() * 1000)
        start, _ = day_bounds(day, site.timezone)
        return start, start  # polar night: no poll is expected in the sun
    zone = ZoneInfo(site.timezone)
    a, b = (datetime.combine(day, time(h), zone) for h in FALLBACK_DAYLIGHT)
    return int(a.timestamp() * 1000), int(b.timestamp() * 1000)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _samples(rows: Iterable[DataRow], key: str) -> list[Sample]:
    out = []
    for r in rows:
        value = _num(r.values.get(key))
        if value is not None:
            out.append(Sample(r.ts, value, r.q, r.seq))
    return out


def _share(count: int, expected: float) -> float | None:
    return None if expected <= 0 else round(min(1.0, count / expected), 4)


def _energy(rows: Sequence[DataRow], key: str | None, spec: CounterSpec, day: date, tz: str) -> DayEnergy:
    if key is None:
        return DayEnergy()
    zone = ZoneInfo(tz)
    iso = day.isoformat()
    start, _ = day_bounds(day, tz)
    got = daily(_samples(rows, key), spec, lambda ts: datetime.fromtimestamp(ts / 1000, zone).date().isoformat(),
                lambda d: start if d == iso else 0)
    return got.get(iso, DayEnergy())


def device_report(dev: DeviceFacts, before: Sequence[DataRow], rows: Sequence[DataRow], day: date,
                  site: SiteFacts, until_ms: int) -> dict[str, Any]:
    """One device's entry: its counter's day, peak power, availability and completeness."""
    start, end = day_bounds(day, site.timezone)
    end = min(end, until_ms)
    rise, set_ = daylight(day, site)
    rise, set_ = max(rise, start), min(set_, end)
    e = _energy([*before, *rows], dev.counter, dev.spec, day, site.timezone)
    in_day = [r for r in rows if start <= r.ts < end]
    sunny = sum(1 for r in in_day if rise <= r.ts < set_)
    sun_expected = max(0, set_ - rise) / 1000 / dev.interval_s
    # Inverters sleep at night (docs/clock-and-night.md): their record is complete with the
    # daylight polls; a meter's spans the whole day.
    span = (rise, set_) if dev.kind == "inverter" else (start, end)
    spanned = sunny if dev.kind == "inverter" else len(in_day)
    span_expected = max(0, span[1] - span[0]) / 1000 / dev.interval_s
    peak_kw, peak_ts = None, None
    for r in in_day:
        p = _num(r.values.get("ac_power"))
        if p is not None and (peak_kw is None or p > peak_kw):
            peak_kw, peak_ts = p, r.ts
    out: dict[str, Any] = {
        "kind": dev.kind, "yield_kwh": round(e.energy_kwh, 3) if dev.counter else None, "counter": dev.counter,
        "counter_start": e.counter_start, "counter_end": e.counter_end,
        "peak_kw": peak_kw, "peak_ts": peak_ts,
        "availability": _share(sunny, sun_expected), "completeness": _share(spanned, span_expected),
        "polls_expected": round(sun_expected), "polls_answered": sunny, "readings": len(in_day),
        "gap_s": round(e.gap_s), "flags": list(e.flags) + ([] if e.samples or dev.counter is None else ["no_data"]),
    }
    if dev.import_counter is not None:
        imp = _energy([*before, *rows], dev.import_counter, dev.spec, day, site.timezone)
        out["import_kwh"] = round(imp.energy_kwh, 3)
    return out


def _station_peak(rows: Sequence[DataRow], inverters: set[str], bucket_ms: int) -> tuple[float | None, int | None]:
    """The highest sum of the inverters' power within one poll bucket (each inverter's highest there)."""
    buckets: dict[int, dict[str, float]] = {}
    for r in rows:
        p = _num(r.values.get("ac_power"))
        if r.device in inverters and p is not None:
            slot = buckets.setdefault(r.ts // bucket_ms, {})
            slot[r.device] = max(p, slot.get(r.device, p))
    if not buckets:
        return None, None
    slot_id, slot = max(buckets.items(), key=lambda kv: sum(kv[1].values()))
    return round(sum(slot.values()), 3), slot_id * bucket_ms


def station_report(site: SiteFacts, devices: dict[str, dict[str, Any]], rows: Sequence[DataRow]) -> dict[str, Any]:
    """The station: the inverters' sum always; the meter's export beside it when there is one."""
    inverters = [d for d in site.devices if d.kind == "inverter" and d.counter]
    meters = [d for d in site.devices if d.kind == "meter" and d.counter]
    total = round(sum(devices[d.id]["yield_kwh"] or 0.0 for d in inverters), 3)
    flags = sorted({f for entry in devices.values() for f in entry["flags"]})
    export = round(sum(devices[d.id]["yield_kwh"] or 0.0 for d in meters), 3) if meters else None
    bucket = int(max([60.0, *(d.interval_s for d in inverters)]) * 1000)
    peak_kw, peak_ts = _station_peak(rows, {d.id for d in inverters}, bucket)
    avail = [devices[d.id]["availability"] for d in inverters if devices[d.id]["availability"] is not None]
    complete = [e["completeness"] for e in devices.values() if e["completeness"] is not None]
    out: dict[str, Any] = {
        "yield_kwh": total,
        "specific_yield": round(total / site.capacity_kwp, 4) if site.capacity_kwp else None,
        "export_kwh": export, "peak_kw": peak_kw, "peak_ts": peak_ts,
        "availability": round(sum(avail) / len(avail), 4) if avail else None,
        "completeness": round(sum(complete) / len(complete), 4) if complete else None,
        "flags": flags,
    }
    if export is not None:
        diff = round(export - total, 3)
        share = round(diff / total, 4) if total > 0 else None
        mismatch = share is not None and abs(share) > site.meter_share
        out["meter_vs_inverters"] = {"difference_kwh": diff, "share": share, "band": site.meter_share,
                                     "within": not mismatch}
        if mismatch:
            out["flags"] = sorted({*flags, "meter_mismatch"})
    return out


def build(site: SiteFacts, day: date, before: Sequence[DataRow], rows: Sequence[DataRow],
          until_ms: int | None = None) -> dict[str, Any]:
    """The report of one local day (up to until_ms when the day is not over: `complete` false)."""
    start, end = day_bounds(day, site.timezone)
    until = end if until_ms is None else min(end, until_ms)
    per: dict[str, list[DataRow]] = {}
    for r in rows:  # one pass: a large station has 100 devices and a million readings a day
        per.setdefault(r.device, []).append(r)
    prior: dict[str, list[DataRow]] = {}
    for r in before:
        prior.setdefault(r.device, []).append(r)
    devices = {dev.id: device_report(dev, prior.get(dev.id, []), per.get(dev.id, []), day, site, until)
               for dev in site.devices}
    seqs = [r.seq for r in rows if start <= r.ts < end]
    return {
        "date": day.isoformat(), "timezone": site.timezone, "revision": 0, "complete": until >= end,
        "from_ts": start, "until_ts": until,
        "station": station_report(site, devices, [r for r in rows if start <= r.ts < until]),
        "devices": devices,
        "seq_first": min(seqs) if seqs else None, "seq_last": max(seqs) if seqs else None,
    }


def same_content(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two reports of one day say the same (revision and issue time aside)."""
    skip = ("revision", "issued_ts")
    return {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}
