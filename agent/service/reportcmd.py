"""`pvgate report --day D | --month M [--csv] [--buffer FILE] -c site.yaml`: the daily report
from the local buffer, for the technician and for a settlement check on a copied buffer file.

The buffer is opened read-only (agent/store/readonly.py): it works beside the running agent,
and on a copy taken away from the station (``--buffer``), without changing a byte of either.
What it prints is what the agent would issue for that day now (a day not over yet: so far).
"""

from __future__ import annotations

import argparse
import calendar
import csv
import sqlite3
import sys
import time
from datetime import date
from pathlib import Path

from agent.config import load_site
from agent.energy.counters import Sample, intervals
from agent.energy.daily import SiteFacts
from agent.energy.render import COLUMNS, MONTH_COLUMNS, day_text, device_rows, month_rows, table, write_csv
from agent.energy.source import day_bounds, day_rows, local_day, rows_before
from agent.service.reporting import build_report, site_facts
from agent.store.readonly import connect_ro
from drivers.errors import StorageError

EX_USAGE = 64


def add_command(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    rep = sub.add_parser("report", help="the daily energy report from the local buffer (read-only)")
    rep.add_argument("-c", "--config", required=True, help="site file (YAML)")
    when = rep.add_mutually_exclusive_group()
    when.add_argument("--day", default=None, help="local date YYYY-MM-DD (default: today, so far)")
    when.add_argument("--month", default=None, help="local month YYYY-MM: one line per day and the total")
    rep.add_argument("--csv", action="store_true", help="CSV instead of a table")
    rep.add_argument("--buffer", default=None, help="a buffer file other than the site file's (e.g. a copy)")
    rep.add_argument("--intervals", action="store_true",
                     help="with --day: the energy of every poll interval of each device's counter, as CSV")
    rep.set_defaults(func=cmd_report)


def _days(args: argparse.Namespace, today: date) -> list[date]:
    try:
        if args.month:
            year, month = (int(x) for x in args.month.split("-"))
            last = calendar.monthrange(year, month)[1]
            return [d for d in (date(year, month, i) for i in range(1, last + 1)) if d <= today]
        return [date.fromisoformat(args.day) if args.day else today]
    except ValueError:
        return []


def _intervals(db: sqlite3.Connection, facts: SiteFacts, day: date) -> int:
    """device, from, to (UTC ms), kWh and flags of every step counted in the day."""
    start, end = day_bounds(day, facts.timezone)
    rows = day_rows(db, start, end)
    keys = {d.id: d.counter for d in facts.devices if d.counter}
    before = rows_before(db, start, list(keys), {k: v for k, v in keys.items() if v})
    out = csv.writer(sys.stdout)
    out.writerow(["device", "counter", "from_ts_utc_ms", "to_ts_utc_ms", "counter_from", "counter_to", "kwh", "flags"])
    for dev in facts.devices:
        if dev.counter is None:
            continue
        mine = [r for r in (*before, *rows) if r.device == dev.id]
        samples = [Sample(r.ts, float(r.values[dev.counter]), r.q, r.seq) for r in mine
                   if isinstance(r.values.get(dev.counter), (int, float))]
        for a, b, step in intervals(samples, dev.spec):
            if start <= b.ts_ms < end:
                out.writerow([dev.id, dev.counter, a.ts_ms, b.ts_ms, a.value, b.value, round(step.energy_kwh, 6),
                              " ".join(step.flags)])
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    cfg = load_site(args.config)
    facts = site_facts(cfg)
    path = Path(args.buffer or cfg.buffer.path)
    if not path.exists():
        raise StorageError(f"no buffer at {path} (has the agent run yet?)")
    now = int(time.time() * 1000)
    days = _days(args, local_day(now, facts.timezone))
    if not days:
        print(f"pvgate report: expected --day YYYY-MM-DD or --month YYYY-MM (not in the future), "
              f"got {args.day or args.month!r}", file=sys.stderr)
        return EX_USAGE
    try:
        db = connect_ro(path)
        try:
            if args.intervals and not args.month:
                return _intervals(db, facts, days[0])
            reports = [build_report(db, facts, d, now) for d in days]
        finally:
            db.close()
    except sqlite3.Error as err:
        raise StorageError(f"cannot read buffer {path}: {err}") from err
    if args.month:
        rows = month_rows(reports)
        if args.csv:
            write_csv(MONTH_COLUMNS, rows, sys.stdout)
        else:
            print(f"monthly report {args.month} ({facts.timezone}), from the days the buffer still holds")
            print(table(MONTH_COLUMNS, rows))
        return 0
    if args.csv:
        write_csv(COLUMNS, device_rows(reports[0]), sys.stdout)
    else:
        print(day_text(reports[0]))
    return 0
