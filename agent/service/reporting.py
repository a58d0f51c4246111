"""Daily reports in the running agent: issued after local midnight, revised when late data
changes them, and on demand (the ``report`` command); also the site facts ``pvgate report`` uses.

The report job runs on the poll schedule every CHECK_S, off the event loop. For each of the last
REVISE_DAYS local days that ended at least DELAY_S ago (the last polls before midnight get
committed first) it builds the day's report from the buffer over a read-only connection and
compares it with the last one stored for that day: none, revision 0; a different one (data
buffered after midnight with timestamps in that day, e.g. re-stamped after a clock correction),
the next revision; the same, nothing; fewer readings than the last one (sent rows pruned from a
full buffer), nothing either: a revision is made of late data, never of loss. A day is only
rebuilt when data rows with its timestamps were buffered, or a clock step announced, since it
was last built (one query over the new rowids per day), so the job is cheap. The
report is stored as a KIND_REPORT row: it gets its seq from the buffer like every record and
the publisher sends it retained on ``P/S/report/daily`` (docs/energy.md).

While the wall clock is not trusted the job waits: an untrusted clock does not know which day
ended.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from agent.clock import device_kind
from agent.config import SiteConfig
from agent.energy.counters import GAP_MIN_S, CounterSpec
from agent.energy.daily import DeviceFacts, SiteFacts, build, same_content
from agent.energy.source import day_bounds, day_rows, issued, local_day, rows_before
from agent.logutil import RateLimitedLog
from agent.store.buffer import Buffer
from agent.store.readonly import connect_ro
from agent.store.rows import KIND_DATA, KIND_EVENT, report_row
from drivers.errors import StorageError
from drivers.model import Device, Point

log = logging.getLogger(__name__)
CHECK_S = 30.0
DELAY_S = 30.0
REVISE_DAYS = 3
_UNSIGNED_BITS = {"u16": 16, "u32": 32, "u64": 64}


def _spec(point: Point, max_kw: float | None, interval_s: float) -> CounterSpec:
    gap_s = max(GAP_MIN_S, 3 * interval_s)  # a step longer than this is a gap, flagged
    name = point.type.name_
    if name in ("f32", "f64"):  # a float counter: its resolution is its precision near 10^5 kWh
        return CounterSpec(resolution=0.01, max_kw=max_kw, gap_s=gap_s)
    bits = _UNSIGNED_BITS.get(name)
    return CounterSpec(resolution=abs(point.scale), wrap=2**bits * abs(point.scale) if bits else None,
                       max_kw=max_kw, gap_s=gap_s)


def device_facts(device: Device, max_kw: float | None) -> DeviceFacts:
    points = {p.key: p for p in device.profile.points if p.publish}
    kind = device_kind(points)
    counters = [p for p in points.values() if p.counter]
    preferred = "energy_export" if kind == "meter" else "energy_total"
    chosen = points.get(preferred) if preferred in points and points[preferred].counter else None
    if chosen is None and kind != "meter" and counters:
        chosen = counters[0]
    imp = points.get("energy_import")
    return DeviceFacts(device.id, kind, device.interval_s, chosen.key if chosen else None,
                       _spec(chosen, max_kw, device.interval_s) if chosen else CounterSpec(),
                       imp.key if kind == "meter" and imp is not None and imp.counter else None)


def site_facts(cfg: SiteConfig) -> SiteFacts:
    """What a report needs of the site file, as plain values (agent/energy never reads config)."""
    site = cfg.site
    # No device of a station makes more than the station's capacity (and a little more).
    devices = tuple(device_facts(d, site.capacity_kwp) for d in cfg.devices)
    return SiteFacts(site.id, site.timezone, site.capacity_kwp, site.lat, site.lon, devices, site.meter_tolerance)


def build_report(db: sqlite3.Connection, facts: SiteFacts, day: date, until_ms: int | None = None) -> dict[str, Any]:
    """The report of one local day from a (read-only) buffer connection."""
    start, end = day_bounds(day, facts.timezone)
    db.execute("BEGIN")  # one snapshot: the rows and the reading before the day agree
    try:
        keep = frozenset({"ac_power", *(k for d in facts.devices for k in (d.counter, d.import_counter) if k)})
        rows = day_rows(db, start, end, keep)
        keys = {d.id: d.counter for d in facts.devices if d.counter}
        before = rows_before(db, start, list(keys), {k: v for k, v in keys.items() if v})
    finally:
        db.execute("COMMIT")
    return build(facts, day, before, rows, until_ms)


class DailyReports:
    """The runtime's report job (see the module docstring)."""

    def __init__(self, facts: SiteFacts, buffer: Buffer) -> None:
        self.buffer = buffer
        self.built_upto: dict[str, int] = {}  # day -> last seq when it was last built
        self.issued = 0
        self.facts = facts
        self._lock = threading.Lock()  # the job and the `report` command: one revision at a time
        self._rl = RateLimitedLog(log)

    def configure(self, facts: SiteFacts) -> None:
        """A reload: new devices or tolerance may change what the days' reports say."""
        self.facts = facts
        self.built_upto.clear()

    def check(self, trusted: bool, now_ms: int | None = None) -> list[dict[str, Any]]:
        """Issue or revise the reports of the days that ended (runs off the event loop)."""
        if not trusted:
            return []
        now = now_ms if now_ms is not None else int(time.time() * 1000)
        today = local_day(now - int(DELAY_S * 1000), self.facts.timezone)
        out = []
        try:
            for back in range(REVISE_DAYS, 0, -1):
                got = self.issue(today - timedelta(days=back), None, quiet_if_empty=True)
                if got is not None:
                    out.append(got)
        except (sqlite3.Error, StorageError) as err:  # tried again at the next check
            self._rl.warning("report", "device=_site daily report not stored this time: %s", err)
        return out

    def on_demand(self, day: date | None) -> dict[str, Any]:
        """The `report` command: the day so far (today by default), stored when it says something new."""
        now = int(time.time() * 1000)
        day = day if day is not None else local_day(now, self.facts.timezone)
        self.built_upto.pop(day.isoformat(), None)
        try:
            stored = self.issue(day, now)
        except (sqlite3.Error, StorageError) as err:
            return {"_ok": False, "_error": f"cannot read the buffer: {err}", "date": day.isoformat()}
        if stored is not None:
            return {"stored": True, **stored}
        with _ro(self.buffer.path) as db:
            last = issued(db, day_bounds(day, self.facts.timezone)[1])
        return {"stored": False, **(last or {"date": day.isoformat()})}

    def issue(self, day: date, until_ms: int | None, quiet_if_empty: bool = False) -> dict[str, Any] | None:
        """Build the day's report; store it when it is new or says something new. Returns it
        when stored."""
        with self._lock:
            return self._issue(day, until_ms, quiet_if_empty)

    def _issue(self, day: date, until_ms: int | None, quiet_if_empty: bool) -> dict[str, Any] | None:
        start, end = day_bounds(day, self.facts.timezone)
        last = self.buffer.last_seq()
        with _ro(self.buffer.path) as db:
            seen = self.built_upto.get(day.isoformat())
            if seen is not None and not _new_rows(db, seen, start, end):
                return None
            report = build_report(db, self.facts, day, until_ms)
            previous = issued(db, end)
        if (quiet_if_empty and report["seq_first"] is None) or (
                previous is not None and (same_content(previous, report) or _thinned(previous, report))):
            self.built_upto[day.isoformat()] = last
            return None
        report["revision"] = 0 if previous is None else int(previous.get("revision", 0)) + 1
        report["issued_ts"] = int(time.time() * 1000)
        self.buffer.append_rows([report_row(end, report)])  # a failure: built again at the next check
        self.built_upto[day.isoformat()] = last
        self.issued += 1
        log.info("device=_site daily report %s revision %d stored: %.3f kWh", report["date"], report["revision"],
                 report["station"]["yield_kwh"])
        return report


class _ro:
    """A short-lived read-only connection (the agent's own writer is never blocked by it)."""

    def __init__(self, path: Path) -> None:
        self.db = connect_ro(path)

    def __enter__(self) -> sqlite3.Connection:
        return self.db

    def __exit__(self, *exc: object) -> None:
        self.db.close()


def _new_rows(db: sqlite3.Connection, after_seq: int, start: int, end: int) -> bool:
    """Data rows with the day's timestamps buffered after after_seq, or a clock step announced
    since (its re-stamping moves readings between days without new seqs). A range of the rowid:
    `+ts` keeps SQLite off the ts index, which would scan the whole day."""
    return db.execute(
        "SELECT 1 FROM record WHERE seq > ? AND (kind = ? AND +ts >= ? AND +ts < ? OR kind = ? AND "
        "device = '_site' AND body LIKE '{\"event\":\"clock_step\"%') LIMIT 1",
        (after_seq, KIND_DATA, start, end, KIND_EVENT)).fetchone() is not None


def _thinned(previous: dict[str, Any], report: dict[str, Any]) -> bool:
    """The new report rests on fewer readings than the last one (sent rows pruned from a full
    buffer): it would be a revision made of loss, not of late data."""
    if previous.get("seq_first") is not None and (report["seq_first"] is None
                                                  or report["seq_first"] > previous["seq_first"]):
        return True
    old = previous.get("devices", {})
    return any(isinstance(old.get(d), dict) and e["readings"] < old[d].get("readings", 0)
               for d, e in report["devices"].items())


__all__ = ["DailyReports", "build_report", "site_facts"]
