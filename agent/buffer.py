"""The SQLite buffer: the only hand-off between polling and publishing.

One connection, serialised by a lock, is the single writer (limits.md §3: a WAL-reset bug
needs several writers). `seq` is an AUTOINCREMENT rowid, so SQLite itself guarantees it is never
reused, also after rows are deleted or the process is killed. synchronous=FULL makes every
commit durable across a power cut; commits are batched (one per poll cycle, at most one per
`commit_interval`) so the fsync cost and SD-card wear stay small.

When the buffer reaches its size budget (or the file system its free-space floor) room is made
in this order: sent rows older than keep_sent_days, other sent rows, then the oldest unsent rows
— and every drop of unsent rows becomes a `dropped` event naming the seq range.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from drivers.errors import StorageError
from drivers.model import Event, Reading

log = logging.getLogger(__name__)

KIND_DATA = 0
KIND_EVENT = 1
PAGE_SIZE = 4096
PRUNE_CHUNK = 500

SCHEMA = """
CREATE TABLE IF NOT EXISTS record (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    kind   INTEGER NOT NULL,
    device TEXT    NOT NULL,
    ts     INTEGER NOT NULL,
    body   TEXT    NOT NULL,
    sent   INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS record_unsent ON record(seq) WHERE sent = 0;
CREATE INDEX IF NOT EXISTS record_sent ON record(sent) WHERE sent > 0;
CREATE TABLE IF NOT EXISTS counter (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS identity (device TEXT PRIMARY KEY, body TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Row:
    seq: int
    kind: int
    device: str
    ts: int
    body: dict[str, Any]


@dataclass(frozen=True)
class Stats:
    unsent: int
    total: int
    oldest_unsent_ts: int | None
    last_seq: int
    dropped_unsent: int
    size_bytes: int
    budget_bytes: int


class Buffer:
    """Thread-safe access to the buffer file through one connection."""

    def __init__(
        self,
        path: str | Path,
        max_mb: float = 1024.0,
        keep_sent_days: float = 7.0,
        min_free_mb: float = 64.0,
    ) -> None:
        self.path = Path(path)
        self.keep_sent_ms = int(keep_sent_days * 86_400_000)
        self.min_free_bytes = int(min_free_mb * 1024 * 1024)
        self.budget_bytes = int(max_mb * 1024 * 1024)
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self._setup()
        except (OSError, sqlite3.Error) as err:
            raise StorageError(f"cannot open buffer {self.path}: {err}") from err

    def _setup(self) -> None:
        db = self._db
        db.execute(f"PRAGMA page_size={PAGE_SIZE}")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=5000")
        db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        # The WAL counts against max_mb too: keep it a small slice of the budget.
        budget_pages = max(16, self.budget_bytes // PAGE_SIZE)
        wal_pages = max(8, min(256, budget_pages // 8))
        db.execute(f"PRAGMA wal_autocheckpoint={wal_pages}")
        db.execute(f"PRAGMA journal_size_limit={wal_pages * PAGE_SIZE}")
        db.execute(f"PRAGMA max_page_count={max(32, budget_pages - 2 * wal_pages)}")
        db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            self._db.close()

    # -- writing -----------------------------------------------------------------------------

    def append(self, records: Iterable[Reading | Event]) -> list[int]:
        """Insert in one transaction, in the given order; returns the seqs given."""
        rows = [_record_row(r) for r in records]
        if not rows:
            return []
        with self._lock:
            self._make_room(len(rows))
            try:
                return self._insert(rows)
            except sqlite3.OperationalError as err:
                if not _is_full(err):
                    raise StorageError(f"buffer write failed: {err}") from err
                log.warning("device=_site buffer full while writing %d records; dropping oldest", len(rows))
                self._free(len(rows) * 4, reason="buffer full (disk or max_mb)")
                try:
                    return self._insert(rows)
                except sqlite3.OperationalError as err2:
                    raise StorageError(f"buffer write failed after pruning: {err2}") from err2

    def _insert(self, rows: list[tuple[int, str, int, str]]) -> list[int]:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            seqs = []
            for row in rows:
                cur = db.execute("INSERT INTO record(kind, device, ts, body) VALUES (?,?,?,?)", row)
                assert cur.lastrowid is not None
                seqs.append(cur.lastrowid)
            db.execute("COMMIT")
            return seqs
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def mark_sent(self, seqs: Iterable[int], now_ms: int | None = None) -> int:
        ids = list(seqs)
        if not ids:
            return 0
        stamp = now_ms if now_ms is not None else int(time.time() * 1000)
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                n = 0
                for i in range(0, len(ids), 500):
                    chunk = ids[i : i + 500]
                    q = f"UPDATE record SET sent=? WHERE sent=0 AND seq IN ({','.join('?' * len(chunk))})"
                    n += self._db.execute(q, [stamp, *chunk]).rowcount
                self._db.execute("COMMIT")
                return n
            except sqlite3.Error as err:
                self._rollback()
                raise StorageError(f"cannot mark records sent: {err}") from err

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    # -- room --------------------------------------------------------------------------------

    def size_bytes(self) -> int:
        with self._lock:
            pages = self._db.execute("PRAGMA page_count").fetchone()[0]
            free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        wal = Path(str(self.path) + "-wal")
        wal_size = wal.stat().st_size if wal.exists() else 0
        return int((pages - free) * PAGE_SIZE + wal_size)

    def _disk_free(self) -> int:
        st = os.statvfs(self.path.parent)
        return st.f_bavail * st.f_frsize

    def _make_room(self, incoming: int) -> None:
        """Prune before a write would cross the budget or the free-space floor."""
        need = incoming * 400 + 8 * PAGE_SIZE
        if self.size_bytes() + need <= self.budget_bytes * 0.9 and self._disk_free() - need > self.min_free_bytes:
            return
        self._free(max(incoming, PRUNE_CHUNK), reason="buffer full (disk or max_mb)")

    def _free(self, rows: int, reason: str) -> None:
        db = self._db
        cutoff = int(time.time() * 1000) - self.keep_sent_ms
        steps = (
            ("DELETE FROM record WHERE seq IN (SELECT seq FROM record WHERE sent>0 AND ts<? ORDER BY seq LIMIT ?)", (cutoff, rows)),
            ("DELETE FROM record WHERE seq IN (SELECT seq FROM record WHERE sent>0 ORDER BY seq LIMIT ?)", (rows,)),
        )
        for sql, args in steps:
            if db.execute(sql, args).rowcount:
                self._vacuum()
                return
        self._drop_unsent(rows, reason)

    def _drop_unsent(self, rows: int, reason: str) -> None:
        db = self._db
        got = db.execute("SELECT min(seq), max(seq), count(*) FROM (SELECT seq FROM record WHERE sent=0 ORDER BY seq LIMIT ?)", (rows,)).fetchone()
        first, last, count = got
        if not count:
            return
        db.execute("DELETE FROM record WHERE sent=0 AND seq BETWEEN ? AND ?", (first, last))
        db.execute("INSERT INTO counter(name, value) VALUES ('dropped_unsent', ?) "
                   "ON CONFLICT(name) DO UPDATE SET value=value+excluded.value", (count,))
        self._vacuum()
        log.error("device=_site buffer dropped %d unsent records seq %d..%d: %s", count, first, last, reason)
        event = Event("_site", int(time.time() * 1000), "dropped",
                      {"first_seq": first, "last_seq": last, "count": count, "reason": reason})
        self._insert([(KIND_EVENT, event.device, event.ts_ms, _event_body(event))])

    def _vacuum(self) -> None:
        # executescript frees every free page; execute() would free only one (limits.md §3).
        self._db.executescript("PRAGMA incremental_vacuum;")

    def prune_sent(self, now_ms: int | None = None) -> int:
        """Delete sent rows older than keep_sent_days, in small steps (keeps the WAL small)."""
        cutoff = (now_ms if now_ms is not None else int(time.time() * 1000)) - self.keep_sent_ms
        total = 0
        with self._lock:
            while True:
                n = self._db.execute(
                    "DELETE FROM record WHERE seq IN (SELECT seq FROM record WHERE sent>0 AND sent<? ORDER BY seq LIMIT ?)",
                    (cutoff, PRUNE_CHUNK)).rowcount
                total += n
                if n < PRUNE_CHUNK:
                    break
            if total:
                self._vacuum()
        return total

    def put_identity(self, device: str, identity: dict[str, Any]) -> None:
        """A device's nameplate (model, serial, rating), for the retained meta message."""
        body = json.dumps(identity, ensure_ascii=False, sort_keys=True)
        with self._lock:
            self._db.execute("INSERT INTO identity(device, body) VALUES (?, ?) "
                             "ON CONFLICT(device) DO UPDATE SET body=excluded.body", (device, body))

    def identities(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT device, body FROM identity").fetchall()
        return {device: json.loads(body) for device, body in rows}

    # -- reading -----------------------------------------------------------------------------

    def unsent(self, after_seq: int, up_to_seq: int | None = None, limit: int = 1000) -> list[Row]:
        """Unsent rows with after_seq < seq <= up_to_seq, oldest first."""
        hi = up_to_seq if up_to_seq is not None else 2**62
        with self._lock:
            cur = self._db.execute(
                "SELECT seq, kind, device, ts, body FROM record WHERE sent=0 AND seq>? AND seq<=? ORDER BY seq LIMIT ?",
                (after_seq, hi, limit))
            return [_row(r) for r in cur.fetchall()]

    def range(self, first: int, last: int, limit: int = 100_000) -> list[Row]:
        """Rows still kept (sent or not) with first <= seq <= last."""
        with self._lock:
            cur = self._db.execute(
                "SELECT seq, kind, device, ts, body FROM record WHERE seq BETWEEN ? AND ? ORDER BY seq LIMIT ?",
                (first, last, limit))
            return [_row(r) for r in cur.fetchall()]

    def last_seq(self) -> int:
        with self._lock:
            got = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name='record'").fetchone()
        return int(got[0]) if got else 0

    def stats(self) -> Stats:
        with self._lock:
            unsent, oldest = self._db.execute("SELECT count(*), min(ts) FROM record WHERE sent=0").fetchone()
            total = self._db.execute("SELECT count(*) FROM record").fetchone()[0]
            got = self._db.execute("SELECT value FROM counter WHERE name='dropped_unsent'").fetchone()
        return Stats(unsent, total, oldest, self.last_seq(), got[0] if got else 0,
                     self.size_bytes(), self.budget_bytes)

    def export_csv(self, out: IO[str], since_ms: int, until_ms: int) -> int:
        """Data rows in a time range as CSV (seq, ts, device, key, value), for the technician."""
        writer = csv.writer(out)
        writer.writerow(["seq", "ts_utc_ms", "device", "key", "value", "sent"])
        n = 0
        for seq, device, ts, body, sent in self._iter_data(since_ms, until_ms):
            for key, value in json.loads(body)["values"].items():
                writer.writerow([seq, ts, device, key, value, 1 if sent else 0])
            n += 1
        return n

    def _iter_data(self, since_ms: int, until_ms: int) -> Iterator[tuple[int, str, int, str, int]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, device, ts, body, sent FROM record WHERE kind=? AND ts>=? AND ts<? ORDER BY seq",
                (KIND_DATA, since_ms, until_ms)).fetchall()
        yield from rows


def _row(r: tuple[int, int, str, int, str]) -> Row:
    return Row(r[0], r[1], r[2], r[3], json.loads(r[4]))


def _record_row(r: Reading | Event) -> tuple[int, str, int, str]:
    if isinstance(r, Reading):
        body = json.dumps({"values": r.values, "q": r.quality}, ensure_ascii=False, separators=(",", ":"))
        return (KIND_DATA, r.device, r.ts_ms, body)
    return (KIND_EVENT, r.device, r.ts_ms, _event_body(r))


def _event_body(e: Event) -> str:
    return json.dumps({"event": e.event, **e.details}, ensure_ascii=False, separators=(",", ":"))


def _is_full(err: sqlite3.OperationalError) -> bool:
    text = str(err).lower()
    return "full" in text or "disk i/o" in text
