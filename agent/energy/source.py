"""Reading a buffer file for a local day, and the report records kept in it.

Everything here runs on a read-only connection (agent/store/readonly.py ``connect_ro``): the
agent's report job and ``pvgate report`` beside a live agent or on a copied file alike never
write, prune or checkpoint the buffer. Reports are stored as ``KIND_REPORT`` rows on ``_site``
whose ``ts`` is the local midnight that ends their day, so the latest one for a day is an
index look-up on ``record_ts``, not a scan.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from agent.store.readonly import iter_data
from agent.store.rows import KIND_DATA, KIND_REPORT

LOOKBACK_DAYS = 7  # how far back the reading before a day's start is looked for


@dataclass(frozen=True, slots=True)  # a day of a large station is a million of them
class DataRow:
    seq: int
    device: str
    ts: int
    values: dict[str, Any]
    q: tuple[str, ...]


def day_bounds(day: date, tz: str) -> tuple[int, int]:
    """UTC ms of the local midnights that begin and end the day (23 or 25 h across DST)."""
    zone = ZoneInfo(tz)
    start = datetime.combine(day, datetime.min.time(), zone)
    end = datetime.combine(day + timedelta(days=1), datetime.min.time(), zone)
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)


def local_day(ts_ms: int, tz: str) -> date:
    return datetime.fromtimestamp(ts_ms / 1000, ZoneInfo(tz)).date()


def _row(seq: int, device: str, ts: int, body: str, keep: frozenset[str] | None = None) -> DataRow:
    parsed = json.loads(body)
    values = parsed.get("values")
    values = values if isinstance(values, dict) else {}
    if keep is not None:  # a day of a large station: only what the report reads stays in memory
        values = {k: v for k, v in values.items() if k in keep}
    return DataRow(int(seq), str(device), int(ts), values, tuple(str(x) for x in parsed.get("q") or ()))


def day_rows(db: sqlite3.Connection, start_ms: int, end_ms: int, keep: frozenset[str] | None = None) -> list[DataRow]:
    """Every data row with start <= ts < end, in seq order (the order of the polls, also when
    the wall clock stepped back); of the values only the keys in `keep` (all without it)."""
    rows = [_row(seq, dev, ts, body, keep) for seq, dev, ts, body, _ in iter_data(db, start_ms, end_ms)]
    rows.sort(key=lambda r: r.seq)
    return rows


def rows_before(db: sqlite3.Connection, start_ms: int, devices: list[str], key_of: dict[str, str]) -> list[DataRow]:
    """Each device's last reading before the day that carries its counter: where its day starts."""
    out: list[DataRow] = []
    floor = start_ms - LOOKBACK_DAYS * 86_400_000
    for device in devices:
        for seq, dev, ts, body in db.execute(
                "SELECT seq, device, ts, body FROM record WHERE kind = ? AND device = ? AND ts < ? AND ts >= ? "
                "ORDER BY ts DESC, seq DESC LIMIT 50", (KIND_DATA, device, start_ms, floor)):
            row = _row(seq, dev, ts, body)
            if isinstance(row.values.get(key_of.get(device, "")), (int, float)):
                out.append(row)
                break
    out.sort(key=lambda r: r.seq)
    return out


def issued(db: sqlite3.Connection, end_ms: int) -> dict[str, Any] | None:
    """The latest report stored for the day ending at end_ms (its body), or None."""
    got = db.execute("SELECT body FROM record WHERE ts = ? AND kind = ? ORDER BY seq DESC LIMIT 1",
                     (end_ms, KIND_REPORT)).fetchone()
    if got is None:
        return None
    body: dict[str, Any] = json.loads(got[0])
    return body
