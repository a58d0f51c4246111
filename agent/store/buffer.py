"""The SQLite buffer: the only hand-off between polling and publishing.

One connection, serialised by a lock, is the single writer (limits.md §3: a WAL-reset bug
needs several writers). `seq` is an AUTOINCREMENT rowid, so SQLite itself guarantees it is never
reused, also after rows are deleted or the process is killed. Inserts commit with
synchronous=FULL, so a committed seq survives a power cut and can never be given again.
"Sent" is the absence of a row in the small `unsent` table: marking a PUBACKed message sent
deletes a few bytes per reading instead of rewriting each reading's page, and those commits run
with synchronous=NORMAL (losing one to a power cut only means a duplicate later).

Size: `max_mb` bounds the database file plus its WAL; agent/store/room.py keeps it there and
announces every unsent row it has to delete. The record format is in agent/store/rows.py.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from agent.logutil import RateLimitedLog
from agent.store import sql
from agent.store.room import PAGE_SIZE, Budget, Room
from agent.store.rows import (
    KIND_DATA,
    RecordRow,
    Row,
    Stats,
    as_rows,
    record_row,
    row_bytes,
    seq_runs,
)
from drivers.errors import StorageError
from drivers.model import Event, Reading

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS record (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    kind   INTEGER NOT NULL,
    device TEXT    NOT NULL,
    ts     INTEGER NOT NULL,
    body   TEXT    NOT NULL
);
CREATE TABLE IF NOT EXISTS unsent (seq INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS counter (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS identity (device TEXT PRIMARY KEY, body TEXT NOT NULL) WITHOUT ROWID;
"""

class PartialWrite(StorageError):
    """append() stored only the records whose seqs are in `seqs` (a prefix, maybe empty)."""

    def __init__(self, message: str, seqs: list[int]) -> None:
        super().__init__(message)
        self.seqs = seqs


class Buffer:
    """Thread-safe access to the buffer file through one connection."""

    def __init__(self, path: str | Path, max_mb: float = 1024.0, keep_sent_days: float = 7.0,
                 min_free_mb: float = 64.0) -> None:
        self.path = Path(path)
        self.wal_path = Path(f"{self.path}-wal")
        self.budget = Budget.of(max_mb, min_free_mb, keep_sent_days)
        self.budget_bytes = self.budget.budget_bytes
        self.keep_sent_ms = self.budget.keep_sent_ms
        self._lock = threading.RLock()
        self._rl = RateLimitedLog(log, window_s=60.0)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self.room = Room(self._db, self.path, self.budget)
            self._setup()
            self.room.shrink_to_budget()
        except (OSError, sqlite3.Error) as err:
            raise StorageError(f"cannot open buffer {self.path}: {err}") from err

    def _setup(self) -> None:
        db = self._db
        db.execute(f"PRAGMA page_size={PAGE_SIZE}")
        db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # before the first table: the file can shrink
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=5000")
        db.execute(f"PRAGMA wal_autocheckpoint={self.budget.checkpoint_frames}")
        db.execute(f"PRAGMA journal_size_limit={self.budget.wal_bytes}")
        db.execute(f"PRAGMA max_page_count={self.budget.max_pages}")
        columns = [r[1] for r in db.execute("PRAGMA table_info(record)")]
        db.executescript(SCHEMA)
        if "sent" in columns:
            self._migrate_v1()
        if db.execute("SELECT value FROM counter WHERE name='rows'").fetchone() is None:
            db.execute("INSERT INTO counter(name, value) SELECT 'rows', count(*) FROM record")
        if sql.pragma(self._db, "user_version") != SCHEMA_VERSION:  # no write on every open (`pvgate buffer`)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _migrate_v1(self) -> None:
        """Buffers written before the `unsent` table kept a `sent` column in every row."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT OR IGNORE INTO unsent(seq) SELECT seq FROM record WHERE sent=0")
        db.execute("DROP INDEX IF EXISTS record_unsent")
        db.execute("DROP INDEX IF EXISTS record_sent")
        db.execute("COMMIT")
        log.info("device=_site buffer %s migrated to schema %d", self.path, SCHEMA_VERSION)

    def close(self) -> None:
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            self._db.close()

    # -- writing -----------------------------------------------------------------------------

    def append(self, records: Iterable[Reading | Event]) -> list[int]:
        """Insert in the given order; returns the seqs given. Commits once, or in a few
        transactions when the batch is larger than the WAL slice. Raises PartialWrite (a
        StorageError) naming the seqs stored before a failure."""
        rows = [record_row(r) for r in records]
        seqs: list[int] = []
        with self._lock:
            for chunk in self._chunks(rows):
                try:
                    seqs.extend(self._append_chunk(chunk))
                except StorageError as err:
                    raise PartialWrite(str(err), seqs) from err
        return seqs

    def _chunks(self, rows: list[RecordRow]) -> Iterator[list[RecordRow]]:
        limit = max(1, self.budget.txn_pages - 6) * PAGE_SIZE * 3 // 4
        chunk: list[RecordRow] = []
        size = 0
        for row in rows:
            n = row_bytes(row)
            if chunk and size + n > limit:
                yield chunk
                chunk, size = [], 0
            chunk.append(row)
            size += n
        if chunk:
            yield chunk

    def _append_chunk(self, rows: list[RecordRow]) -> list[int]:
        need = 3 + math.ceil(sum(row_bytes(r) for r in rows) / (PAGE_SIZE * 0.8))
        error: sqlite3.OperationalError | None = None
        for attempt in range(3):
            try:
                room, by_disk = self.room.available()
                if room < need or error is not None:  # after a full error, the estimate was short
                    self.room.make(need * (attempt + 1), by_disk)
                return self._insert(rows)
            except sqlite3.OperationalError as err:
                if not _is_full(err):
                    raise StorageError(f"buffer write failed: {err}") from err
                error = err
                self._rl.warning("full", "device=_site buffer full while writing %d records (%s); making room",
                                 len(rows), err)
            except sqlite3.Error as err:
                raise StorageError(f"buffer write failed: {err}") from err
        raise StorageError(f"buffer full: no room for {len(rows)} records even after pruning ({error})")

    def _insert(self, rows: list[RecordRow]) -> list[int]:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            before = sql.last_seq(self._db)
            db.executemany("INSERT INTO record(kind, device, ts, body) VALUES (?,?,?,?)", rows)
            db.execute("INSERT INTO unsent(seq) SELECT seq FROM record WHERE seq > ?", (before,))
            sql.count(self._db, "rows", len(rows))
            after = sql.last_seq(self._db)
            db.execute("COMMIT")
        except BaseException:
            sql.rollback(self._db)
            raise
        # AUTOINCREMENT under one writer: the seqs of one transaction are consecutive.
        if after - before == len(rows):
            return list(range(before + 1, after + 1))
        return [r[0] for r in db.execute("SELECT seq FROM record WHERE seq BETWEEN ? AND ? ORDER BY seq",
                                         (before + 1, after))]

    def mark_sent(self, seqs: Iterable[int]) -> int:
        """The broker acknowledged these seqs; returns how many were still unsent."""
        runs = seq_runs(sorted(set(seqs)))
        if not runs:
            return 0
        n = 0
        step = max(8, self.budget.txn_pages - 4)  # runs per transaction: each may touch a leaf page
        with self._lock:
            db = self._db
            db.execute("PRAGMA synchronous=NORMAL")  # a lost mark is a duplicate, never a loss
            try:
                for i in range(0, len(runs), step):
                    db.execute("BEGIN IMMEDIATE")
                    n += db.executemany("DELETE FROM unsent WHERE seq BETWEEN ? AND ?", runs[i:i + step]).rowcount
                    db.execute("COMMIT")
            except sqlite3.Error as err:
                sql.rollback(self._db)
                raise StorageError(f"cannot mark records sent: {err}") from err
            finally:
                db.execute("PRAGMA synchronous=FULL")
        return n

    # -- room ------------------------------------------------------------------------------

    def size_bytes(self) -> int:
        """Database file plus WAL on disk: what max_mb bounds."""
        return self.room.size_bytes()

    def prune_sent(self, now_ms: int | None = None) -> int:
        """Delete sent rows older than keep_sent_days (periodic housekeeping); returns rows deleted."""
        cutoff = (now_ms if now_ms is not None else int(time.time() * 1000)) - self.keep_sent_ms
        with self._lock:
            before = sql.counter(self._db, "rows")
            try:
                self.room.prune_sent(cutoff)
            except sqlite3.Error as err:
                raise StorageError(f"cannot prune the buffer: {err}") from err
            return before - sql.counter(self._db, "rows")

    def restamp(self, first: int, last: int, delta_ms: int, flag: str, new_flag: str) -> int:
        """Move the unsent readings with first <= seq <= last that carry `flag` by delta_ms, and flag
        them `new_flag` instead (a clock step brought the wall clock into trust). Returns the count."""
        if last < first:
            return 0
        old, new = f'"{flag}"', f'"{new_flag}"'  # flags are JSON strings inside the body's "q" array
        with self._lock:
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                n = db.execute("UPDATE record SET ts = ts + ?, body = replace(body, ?, ?) "
                               "WHERE seq BETWEEN ? AND ? AND kind = ? AND instr(body, ?) > 0 "
                               "AND seq IN (SELECT seq FROM unsent WHERE seq BETWEEN ? AND ?)",
                               (delta_ms, old, new, first, last, KIND_DATA, old, first, last)).rowcount
                db.execute("COMMIT")
            except sqlite3.Error as err:
                sql.rollback(db)
                raise StorageError(f"cannot re-stamp buffered readings: {err}") from err
        return int(n)

    # -- identities --------------------------------------------------------------------------

    def put_identity(self, device: str, identity: dict[str, object]) -> None:
        """A device's nameplate (model, serial, rating), for the retained meta message."""
        body = json.dumps(identity, ensure_ascii=False, sort_keys=True)
        with self._lock:
            try:
                self._db.execute("INSERT INTO identity(device, body) VALUES (?, ?) "
                                 "ON CONFLICT(device) DO UPDATE SET body=excluded.body", (device, body))
            except sqlite3.Error as err:
                self._rl.warning(f"identity-{device}", "device=%s cannot store identity: %s", device, err)

    def identities(self) -> dict[str, dict[str, object]]:
        with self._lock:
            rows = self._db.execute("SELECT device, body FROM identity").fetchall()
        return {device: json.loads(body) for device, body in rows}

    # -- reading -----------------------------------------------------------------------------

    def unsent(self, after_seq: int, up_to_seq: int | None = None, limit: int = 1000) -> list[Row]:
        """Unsent rows with after_seq < seq <= up_to_seq, oldest first."""
        hi = up_to_seq if up_to_seq is not None else 2**62
        with self._lock:
            cur = self._db.execute(
                "SELECT r.seq, r.kind, r.device, r.ts, r.body FROM unsent AS u CROSS JOIN record AS r "
                "ON r.seq = u.seq WHERE u.seq > ? AND u.seq <= ? ORDER BY u.seq LIMIT ?", (after_seq, hi, limit))
            return as_rows(cur.fetchall())

    def range(self, first: int, last: int, limit: int = 100_000) -> list[Row]:
        """Rows still kept (sent or not) with first <= seq <= last, oldest first."""
        with self._lock:
            cur = self._db.execute("SELECT seq, kind, device, ts, body FROM record WHERE seq BETWEEN ? AND ? "
                                   "ORDER BY seq LIMIT ?", (first, last, limit))
            return as_rows(cur.fetchall())

    def kept_bounds(self, first: int, last: int) -> tuple[int, int] | None:
        """The lowest and highest seq kept within first..last, or None if nothing is kept there."""
        with self._lock:
            try:
                lo, hi = self._db.execute("SELECT min(seq), max(seq) FROM record WHERE seq BETWEEN ? AND ?",
                                          (first, last)).fetchone()
            except sqlite3.Error as err:
                raise StorageError(f"cannot read the buffer: {err}") from err
        return None if lo is None else (int(lo), int(hi))

    def last_seq(self) -> int:
        with self._lock:
            return sql.last_seq(self._db)

    def stats(self) -> Stats:
        with self._lock:
            unsent = sql.unsent_count(self._db)
            oldest = self._db.execute(
                "SELECT ts FROM record WHERE seq = (SELECT min(seq) FROM unsent)").fetchone()
            dropped = sql.counter(self._db, "dropped_unsent")
            return Stats(unsent, sql.counter(self._db, "rows"), oldest[0] if oldest else None, sql.last_seq(self._db),
                         dropped, self.size_bytes(), self.budget_bytes)

    def export_csv(self, out: IO[str], since_ms: int, until_ms: int) -> int:
        """Data rows in a time range as CSV (seq, ts, device, key, value), for the technician."""
        writer = csv.writer(out)
        writer.writerow(["seq", "ts_utc_ms", "device", "key", "value", "sent"])
        n = 0
        for seq, device, ts, body, unsent in self._iter_data(since_ms, until_ms):
            for key, value in json.loads(body)["values"].items():
                writer.writerow([seq, ts, device, key, value, 0 if unsent else 1])
            n += 1
        return n

    def _iter_data(self, since_ms: int, until_ms: int) -> Iterator[tuple[int, str, int, str, int]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, device, ts, body, EXISTS (SELECT 1 FROM unsent AS u WHERE u.seq = record.seq) "
                "FROM record WHERE kind=? AND ts>=? AND ts<? ORDER BY seq", (KIND_DATA, since_ms, until_ms)).fetchall()
        yield from rows


def _is_full(err: sqlite3.OperationalError) -> bool:
    text = str(err).lower()
    return "full" in text or "disk i/o" in text
