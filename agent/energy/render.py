"""Reports for people: the table and the CSV that `pvgate report` prints (pure text)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from datetime import datetime
from typing import IO, Any
from zoneinfo import ZoneInfo

COLUMNS = ("device", "kind", "yield_kwh", "counter_start", "counter_end", "peak_kw", "peak_time",
           "availability", "completeness", "readings", "flags")
MONTH_COLUMNS = ("date", "yield_kwh", "specific_yield", "export_kwh", "peak_kw", "availability", "completeness", "flags")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if abs(value) < 1e6 else f"{value:.1f}"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or ""
    return str(value)


def _time(ts: Any, tz: str) -> str | None:
    if not isinstance(ts, int):
        return None
    return datetime.fromtimestamp(ts / 1000, ZoneInfo(tz)).strftime("%H:%M")


def device_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per device, then the station."""
    tz = str(report["timezone"])
    out = []
    for dev, e in report["devices"].items():
        out.append([dev, e["kind"], *(_fmt(e[k]) for k in ("yield_kwh", "counter_start", "counter_end", "peak_kw")),
                    _fmt(_time(e["peak_ts"], tz)), _fmt(e["availability"]), _fmt(e["completeness"]),
                    _fmt(e["readings"]), _fmt(e["flags"])])
    s = report["station"]
    out.append(["STATION", "", _fmt(s["yield_kwh"]), "", "", _fmt(s["peak_kw"]), _fmt(_time(s["peak_ts"], tz)),
                _fmt(s["availability"]), _fmt(s["completeness"]), "", _fmt(s["flags"])])
    return out


def month_rows(reports: Sequence[dict[str, Any]]) -> list[list[str]]:
    out = []
    for r in reports:
        s = r["station"]
        out.append([r["date"], *(_fmt(s[k]) for k in MONTH_COLUMNS[1:])])
    total = round(sum(r["station"]["yield_kwh"] for r in reports), 3)
    exports = [r["station"]["export_kwh"] for r in reports if r["station"]["export_kwh"] is not None]
    out.append(["TOTAL", _fmt(total), "", _fmt(round(sum(exports), 3)) if exports else "-", "", "", "", ""])
    return out


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def day_text(report: dict[str, Any]) -> str:
    s = report["station"]
    head = (f"daily report {report['date']} ({report['timezone']})"
            f"{'' if report['complete'] else ' - so far, the day is not over'}: "
            f"station {_fmt(s['yield_kwh'])} kWh, {_fmt(s['specific_yield'])} kWh/kWp, "
            f"meter export {_fmt(s['export_kwh'])} kWh, seq {_fmt(report['seq_first'])}..{_fmt(report['seq_last'])}")
    mvi = s.get("meter_vs_inverters")
    if isinstance(mvi, dict):
        head += (f"\nmeter - inverters: {_fmt(mvi['difference_kwh'])} kWh ({_fmt(mvi['share'])} of the inverters; "
                 f"band {_fmt(mvi['band'])}: {'within' if mvi['within'] else 'OUTSIDE'})")
    return head + "\n" + table(COLUMNS, device_rows(report))


def write_csv(header: Sequence[str], rows: Sequence[Sequence[str]], out: IO[str]) -> None:
    w = csv.writer(out)
    w.writerow(header)
    w.writerows(rows)
