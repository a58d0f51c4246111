"""The buffer's record format: rows as stored and read back, and how readings and events become rows."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import NamedTuple

from drivers.model import Event, Reading

KIND_DATA = 0
KIND_EVENT = 1
KIND_DROP = 2  # an announcement of loss or lineage: never dropped itself, so every loss stays announced
KIND_REPORT = 3  # a daily energy report (agent/energy): ts is the local midnight ending its day
ANNOUNCEMENTS = frozenset({"dropped", "dropped_unbuffered", "buffer_reset"})

RecordRow = tuple[int, str, int, str]  # kind, device, ts, body (JSON object text)


class Row(NamedTuple):  # a tuple: a day of backlog is read at several 100k rows/s
    seq: int
    kind: int
    device: str
    ts: int
    body: str  # JSON object text: {"values":…,"q":…} for data, {"event":…,…} for events
    epoch: str = ""  # the lineage the seq was drawn in (agent/store/opening.py)

    def json(self) -> dict[str, object]:
        parsed: dict[str, object] = json.loads(self.body)
        return parsed


@dataclass(frozen=True)
class Stats:
    unsent: int
    total: int
    oldest_unsent_ts: int | None
    last_seq: int
    dropped_unsent: int
    size_bytes: int
    budget_bytes: int
    epoch: str = ""


def as_rows(rows: list[tuple[int, int, str, int, str, str]]) -> list[Row]:
    """Result tuples as Rows without a Python call per row (a day of backlog is 864k rows)."""
    return list(map(tuple.__new__, repeat(Row), rows))


def seq_runs(ids: list[int]) -> list[tuple[int, int]]:
    """Sorted seqs as (first, last) runs of consecutive values."""
    runs: list[tuple[int, int]] = []
    for seq in ids:
        if runs and runs[-1][1] == seq - 1:
            runs[-1] = (runs[-1][0], seq)
        else:
            runs.append((seq, seq))
    return runs


def row_bytes(row: RecordRow) -> int:
    return len(row[3]) + len(row[1]) + 24


def record_row(r: Reading | Event) -> RecordRow:
    if isinstance(r, Reading):
        body = json.dumps({"values": r.values, "q": r.quality}, ensure_ascii=False, separators=(",", ":"))
        return (KIND_DATA, r.device, r.ts_ms, body)
    body = json.dumps({"event": r.event, **r.details}, ensure_ascii=False, separators=(",", ":"))
    return (KIND_DROP if r.event in ANNOUNCEMENTS else KIND_EVENT, r.device, r.ts_ms, body)


def report_row(end_ms: int, report: dict[str, object]) -> RecordRow:
    """A daily report as a row on `_site`, published retained on report/daily (docs/energy.md)."""
    return (KIND_REPORT, "_site", end_ms, json.dumps(report, ensure_ascii=False, separators=(",", ":")))


def records_from(rows: Sequence[Row]) -> list[Reading | Event]:
    """Rows back into records (tests and tools)."""
    out: list[Reading | Event] = []
    for row in rows:
        body = json.loads(row.body)
        if row.kind == KIND_DATA:
            out.append(Reading(row.device, row.ts, body["values"], body["q"]))
        else:
            out.append(Event(row.device, row.ts, body.pop("event", "report"), body))
    return out
