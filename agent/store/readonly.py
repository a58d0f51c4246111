"""Read-only access to a buffer file, for `pvgate buffer stats` and `export`.

These tools run beside a live agent, often while it is in trouble (an outage, a full disk). So
they open the file with `mode=ro`: they never prune, vacuum, checkpoint, migrate or change a
pragma — a technician looking at the buffer must not be what deletes unsent data. Export reads
in chunks over the `record_ts` index, each chunk its own short read transaction, so a long
export neither holds a snapshot that stops the agent's checkpoints (and grows the WAL) nor
loads a day of readings into memory.
"""

from __future__ import annotations

import csv
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from agent.store import sql
from agent.store.rows import KIND_DATA, Stats

EXPORT_CHUNK = 5000  # rows per read transaction


def connect_ro(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA busy_timeout=5000")
    return db


def size_bytes(path: Path) -> int:
    total = 0
    for p in (path, Path(f"{path}-wal")):
        try:
            total += p.stat().st_size
        except OSError:
            pass
    return total


def stats(db: sqlite3.Connection, path: Path, budget_bytes: int) -> Stats:
    """Counts and bounds, in one read transaction (a consistent snapshot)."""
    db.execute("BEGIN")
    try:
        unsent = sql.unsent_count(db)
        oldest = db.execute("SELECT ts FROM record WHERE seq = (SELECT min(seq) FROM unsent)").fetchone()
        epochs = sql.epochs(db)
        return Stats(unsent, sql.counter(db, "rows"), oldest[0] if oldest else None, sql.last_seq(db),
                     sql.counter(db, "dropped_unsent"), size_bytes(path), budget_bytes,
                     epochs[-1][1] if epochs else "")
    finally:
        db.execute("COMMIT")


def iter_data(db: sqlite3.Connection, since_ms: int, until_ms: int,
              chunk: int = EXPORT_CHUNK) -> Iterator[tuple[int, str, int, str, int]]:
    """(seq, device, ts, body, unsent) of data rows with since <= ts < until, by ts then seq,
    read EXPORT_CHUNK rows per statement (each statement is its own read transaction)."""
    ts, seq = since_ms, -1
    while True:
        rows = db.execute(
            "SELECT seq, device, ts, body, EXISTS (SELECT 1 FROM unsent AS u WHERE u.seq = record.seq) "
            "FROM record WHERE ts >= ? AND ts < ? AND (ts > ? OR seq > ?) AND kind = ? "
            "ORDER BY ts, seq LIMIT ?", (ts, until_ms, ts, seq, KIND_DATA, chunk)).fetchall()
        yield from rows
        if len(rows) < chunk:
            return
        seq, ts = int(rows[-1][0]), int(rows[-1][2])


def export_csv(rows: Iterator[tuple[int, str, int, str, int]], out: IO[str]) -> int:
    """Data rows as CSV (seq, ts, device, key, value, sent), for the technician."""
    writer = csv.writer(out)
    writer.writerow(["seq", "ts_utc_ms", "device", "key", "value", "sent"])
    n = 0
    for seq, device, ts, body, unsent in rows:
        for key, value in json.loads(body)["values"].items():
            writer.writerow([seq, ts, device, key, value, 0 if unsent else 1])
        n += 1
    return n
