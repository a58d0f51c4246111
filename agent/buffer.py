"""The SQLite buffer: the only hand-off between polling and publishing.

One connection, serialised by a lock, is the single writer (limits.md §3: a WAL-reset bug
needs several writers). `seq` is an AUTOINCREMENT rowid, so SQLite itself guarantees it is never
reused, also after rows are deleted or the process is killed. Inserts commit with
synchronous=FULL, so a committed seq survives a power cut and can never be given again.
"Sent" is the absence of a row in the small `unsent` table: marking a PUBACKed message sent
deletes a few bytes per reading instead of rewriting each reading's page, and those commits run
with synchronous=NORMAL (losing one to a power cut only means a duplicate later).

Size: `max_mb` bounds the database file plus its WAL. The WAL gets a fixed slice of the budget
(wal_autocheckpoint + every transaction kept below it), the database the rest through
`max_page_count`, which also stops growth where the file system would fall below `min_free_mb`.
When that limit is reached, room is made in this order: sent rows older than keep_sent_days,
other sent rows, then the oldest unsent rows — every drop of unsent rows is a `dropped` event,
committed in the same transaction as the deletion, naming its seq range.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import IO, NamedTuple

from agent.logutil import RateLimitedLog
from drivers.errors import StorageError
from drivers.model import Event, Reading

log = logging.getLogger(__name__)

KIND_DATA = 0
KIND_EVENT = 1
KIND_DROP = 2  # a `dropped` event: never dropped itself, so every drop stays announced
PAGE_SIZE = 4096
WAL_FRAME = PAGE_SIZE + 24
WAL_HEADER = 32
SCHEMA_PAGES = 8  # page 1, ptrmap, record, sqlite_sequence, unsent, counter, identity, spare
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

RecordRow = tuple[int, str, int, str]  # kind, device, ts, body (JSON object text)


class Row(NamedTuple):  # a tuple: a day of backlog is read at several 100k rows/s
    seq: int
    kind: int
    device: str
    ts: int
    body: str  # JSON object text: {"values":…,"q":…} for data, {"event":…,…} for events

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
        self.keep_sent_ms = int(keep_sent_days * 86_400_000)
        self.min_free_bytes = int(min_free_mb * 1024 * 1024)
        self.budget_bytes = int(max_mb * 1024 * 1024)
        budget_pages = self.budget_bytes // PAGE_SIZE
        # The WAL's slice: a checkpoint every quarter of it, and no transaction larger than the
        # rest, so the WAL file never outgrows its slice (limits.md §3: keep the WAL small).
        self.wal_frames = min(1024, max(12, budget_pages // 16, min(64, budget_pages // 4)))
        self.wal_bytes = WAL_HEADER + self.wal_frames * WAL_FRAME
        self.checkpoint_frames = max(3, self.wal_frames // 4)
        self.txn_pages = self.wal_frames - self.checkpoint_frames
        self.max_pages = max(SCHEMA_PAGES + 2, (self.budget_bytes - self.wal_bytes) // PAGE_SIZE)
        self._lock = threading.RLock()
        self._rl = RateLimitedLog(log, window_s=60.0)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self._setup()
            self._shrink_to_budget()
        except (OSError, sqlite3.Error) as err:
            raise StorageError(f"cannot open buffer {self.path}: {err}") from err

    def _setup(self) -> None:
        db = self._db
        db.execute(f"PRAGMA page_size={PAGE_SIZE}")
        db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # before the first table: the file can shrink
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=5000")
        db.execute(f"PRAGMA wal_autocheckpoint={self.checkpoint_frames}")
        db.execute(f"PRAGMA journal_size_limit={self.wal_bytes}")
        db.execute(f"PRAGMA max_page_count={self.max_pages}")
        columns = [r[1] for r in db.execute("PRAGMA table_info(record)")]
        db.executescript(SCHEMA)
        if "sent" in columns:
            self._migrate_v1()
        if db.execute("SELECT value FROM counter WHERE name='rows'").fetchone() is None:
            db.execute("INSERT INTO counter(name, value) SELECT 'rows', count(*) FROM record")
        if self._pragma("user_version") != SCHEMA_VERSION:  # no write on every open (`pvgate buffer`)
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
        rows = [_record_row(r) for r in records]
        seqs: list[int] = []
        with self._lock:
            for chunk in self._chunks(rows):
                try:
                    seqs.extend(self._append_chunk(chunk))
                except StorageError as err:
                    raise PartialWrite(str(err), seqs) from err
        return seqs

    def _chunks(self, rows: list[RecordRow]) -> Iterator[list[RecordRow]]:
        limit = max(1, self.txn_pages - 6) * PAGE_SIZE * 3 // 4
        chunk: list[RecordRow] = []
        size = 0
        for row in rows:
            n = _row_bytes(row)
            if chunk and size + n > limit:
                yield chunk
                chunk, size = [], 0
            chunk.append(row)
            size += n
        if chunk:
            yield chunk

    def _append_chunk(self, rows: list[RecordRow]) -> list[int]:
        need = 3 + math.ceil(sum(_row_bytes(r) for r in rows) / (PAGE_SIZE * 0.8))
        error: sqlite3.OperationalError | None = None
        for attempt in range(3):
            try:
                room, by_disk = self._room()
                if room < need or error is not None:  # after a full error, the estimate was short
                    self._make_room(need * (attempt + 1), by_disk)
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
            before = self._last_seq()
            db.executemany("INSERT INTO record(kind, device, ts, body) VALUES (?,?,?,?)", rows)
            db.execute("INSERT INTO unsent(seq) SELECT seq FROM record WHERE seq > ?", (before,))
            self._count("rows", len(rows))
            after = self._last_seq()
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        # AUTOINCREMENT under one writer: the seqs of one transaction are consecutive.
        if after - before == len(rows):
            return list(range(before + 1, after + 1))
        return [r[0] for r in db.execute("SELECT seq FROM record WHERE seq BETWEEN ? AND ? ORDER BY seq",
                                         (before + 1, after))]

    def _count(self, name: str, delta: int) -> None:
        self._db.execute("INSERT INTO counter(name, value) VALUES (?, ?) "
                         "ON CONFLICT(name) DO UPDATE SET value=value+excluded.value", (name, delta))

    def mark_sent(self, seqs: Iterable[int]) -> int:
        """The broker acknowledged these seqs; returns how many were still unsent."""
        runs = _runs(sorted(set(seqs)))
        if not runs:
            return 0
        n = 0
        step = max(8, self.txn_pages - 4)  # runs per transaction: each may touch a leaf page
        with self._lock:
            db = self._db
            db.execute("PRAGMA synchronous=NORMAL")  # a lost mark is a duplicate, never a loss
            try:
                for i in range(0, len(runs), step):
                    db.execute("BEGIN IMMEDIATE")
                    n += db.executemany("DELETE FROM unsent WHERE seq BETWEEN ? AND ?", runs[i:i + step]).rowcount
                    db.execute("COMMIT")
            except sqlite3.Error as err:
                self._rollback()
                raise StorageError(f"cannot mark records sent: {err}") from err
            finally:
                db.execute("PRAGMA synchronous=FULL")
        return n

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    # -- room --------------------------------------------------------------------------------

    def size_bytes(self) -> int:
        """Database file plus WAL on disk: what max_mb bounds."""
        return sum(p.stat().st_size for p in (self.path, self.wal_path) if p.exists())

    def _pragma(self, name: str) -> int:
        return int(self._db.execute(f"PRAGMA {name}").fetchone()[0])

    def _room(self) -> tuple[int, bool]:
        """Pages an insert may use now, and whether the file system (not max_mb) is the limit.
        Sets max_page_count so SQLite itself enforces both limits. The database may not take the
        room its WAL may need."""
        pages = self._pragma("page_count")
        wal = self.wal_path.stat().st_size if self.wal_path.exists() else 0
        wal_need = self.wal_bytes  # the WAL may grow to its whole slice
        st = os.statvfs(self.path.parent)
        spare = st.f_bavail * st.f_frsize - self.min_free_bytes - max(0, wal_need - wal)
        by_disk = pages + max(0, spare) // PAGE_SIZE < self.max_pages
        limit = min(self.max_pages, pages + max(0, spare) // PAGE_SIZE)
        self._db.execute(f"PRAGMA max_page_count={max(limit, 1)}")
        return limit - pages + self._pragma("freelist_count"), by_disk

    def _make_room(self, pages: int, by_disk: bool) -> None:
        """Free at least `pages` pages (and up to one transaction's worth, so that drops come in
        few, large steps): old sent rows, then other sent rows, then the oldest unsent rows."""
        target = max(pages, min(self.max_pages // 16, self.txn_pages - 8), 2)
        reason = ("disk full (free space below buffer.min_free_mb)" if by_disk
                  else "buffer full (buffer.max_mb reached)")
        start = self._pragma("freelist_count")

        def freed() -> int:
            return self._pragma("freelist_count") - start

        self._delete_sent(target, int(time.time() * 1000) - self.keep_sent_ms)
        if freed() < target:
            self._delete_sent(target - freed(), None)
        while freed() < target and self._drop_unsent(self._rows_for(target - freed()), reason):
            pass

    def _rows_for(self, pages: int) -> int:
        """About how many rows fill `pages` pages (a few more: a first leaf may be shared), at
        most what one transaction may delete: every leaf touched is a WAL frame."""
        used = max(1, self._pragma("page_count") - self._pragma("freelist_count") - SCHEMA_PAGES)
        per_page = max(1.0, self._rows() / used)
        return max(1, min(math.ceil((pages + 1) * per_page * 1.25), int((self.txn_pages - 8) * per_page * 0.8)))

    def _rows(self) -> int:
        got = self._db.execute("SELECT value FROM counter WHERE name='rows'").fetchone()
        return int(got[0]) if got else 0

    def _delete_sent(self, pages: int, older_than: int | None) -> None:
        """Delete sent rows, oldest first, until `pages` pages are free. With older_than: only
        rows polled before it, stopping at the first newer one (seq order is time order)."""
        if self._rows() <= self._unsent_count():
            return
        start = self._pragma("freelist_count")
        for lo, hi in self._sent_ranges():
            newer = None
            if older_than is not None:
                newer = self._db.execute("SELECT min(seq) FROM record WHERE seq BETWEEN ? AND ? AND ts >= ?",
                                         (lo, hi, older_than)).fetchone()[0]
                hi = hi if newer is None else newer - 1
            while lo <= hi:
                freed = self._pragma("freelist_count") - start
                if freed >= pages:
                    return
                lo = self._delete_range(lo, hi, self._rows_for(pages - freed)) + 1
            if newer is not None or self._pragma("freelist_count") - start >= pages:
                return

    def _sent_ranges(self) -> Iterator[tuple[int, int]]:
        """Seq ranges holding no unsent row, oldest first, from the oldest row kept."""
        db = self._db
        lo = db.execute("SELECT min(seq) FROM record").fetchone()[0]
        last = self._last_seq()
        while lo is not None and lo <= last:
            first_unsent = db.execute("SELECT min(seq) FROM unsent WHERE seq >= ?", (lo,)).fetchone()[0]
            if first_unsent is None:
                yield lo, last
                return
            if first_unsent > lo:
                yield lo, first_unsent - 1
            run_end = db.execute(
                "SELECT seq FROM unsent AS a WHERE seq >= ? AND NOT EXISTS "
                "(SELECT 1 FROM unsent AS b WHERE b.seq = a.seq + 1) ORDER BY seq LIMIT 1",
                (first_unsent,)).fetchone()[0]
            lo = db.execute("SELECT min(seq) FROM record WHERE seq > ?", (run_end,)).fetchone()[0]

    def _delete_range(self, lo: int, hi: int, limit: int) -> int:
        """Delete up to `limit` (sent) rows with lo <= seq <= hi; returns the last seq covered."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            top = db.execute("SELECT max(seq) FROM (SELECT seq FROM record WHERE seq BETWEEN ? AND ? "
                             "ORDER BY seq LIMIT ?)", (lo, hi, limit)).fetchone()[0]
            if top is None:
                db.execute("COMMIT")
                return hi
            n = db.execute("DELETE FROM record WHERE seq BETWEEN ? AND ?", (lo, top)).rowcount
            self._count("rows", -n)
            db.execute("COMMIT")
            return int(top)
        except BaseException:
            self._rollback()
            raise

    def _drop_unsent(self, rows: int, reason: str) -> bool:
        """Delete the oldest unsent rows and announce it, in one transaction. Earlier drop
        announcements inside the range are kept (they are how the center learns of a gap)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            first, last = db.execute(
                "SELECT min(seq), max(seq) FROM (SELECT u.seq FROM unsent AS u CROSS JOIN record AS r "
                "ON r.seq = u.seq WHERE r.kind != ? ORDER BY u.seq LIMIT ?)", (KIND_DROP, rows)).fetchone()
            if first is None:
                db.execute("COMMIT")
                return False
            keep = "SELECT seq FROM record WHERE seq BETWEEN ? AND ? AND kind = ?"
            count = db.execute(f"DELETE FROM unsent WHERE seq BETWEEN ? AND ? AND seq NOT IN ({keep})",
                               (first, last, first, last, KIND_DROP)).rowcount
            gone = db.execute("DELETE FROM record WHERE seq BETWEEN ? AND ? AND kind != ?",
                              (first, last, KIND_DROP)).rowcount
            self._count("rows", 1 - gone)
            self._count("dropped_unsent", count)
            event = Event("_site", int(time.time() * 1000), "dropped",
                          {"first_seq": first, "last_seq": last, "count": count, "reason": reason})
            db.execute("INSERT INTO record(kind, device, ts, body) VALUES (?,?,?,?)",
                       (KIND_DROP, *_record_row(event)[1:]))
            db.execute("INSERT INTO unsent(seq) VALUES (?)", (self._last_seq(),))
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        log.error("device=_site buffer dropped %d unsent records, seq %d..%d: %s", count, first, last, reason)
        return True

    def prune_sent(self, now_ms: int | None = None) -> int:
        """Delete sent rows older than keep_sent_days (periodic housekeeping); returns rows deleted."""
        cutoff = (now_ms if now_ms is not None else int(time.time() * 1000)) - self.keep_sent_ms
        with self._lock:
            before = self._rows()
            try:
                self._delete_sent(2**62, cutoff)
                self._shrink_to_budget()
            except sqlite3.Error as err:
                raise StorageError(f"cannot prune the buffer: {err}") from err
            return before - self._rows()

    def _shrink_to_budget(self) -> None:
        """A buffer above max_mb (max_mb was lowered) is pruned and vacuumed, in small steps."""
        shrunk = False
        while self._pragma("page_count") > self.max_pages:
            free = self._pragma("freelist_count")
            if free == 0:
                before = self._rows()
                self._make_room(self._pragma("page_count") - self.max_pages, False)
                if self._rows() == before:
                    break
                continue
            # executescript frees all asked pages; execute() would free one (limits.md §3).
            self._db.executescript(f"PRAGMA incremental_vacuum({max(1, min(free, self.txn_pages // 4))});")
            shrunk = True
        if shrunk:  # the file itself only gets shorter when the WAL is checkpointed
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

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
            return _as_rows(cur.fetchall())

    def range(self, first: int, last: int, limit: int = 100_000) -> list[Row]:
        """Rows still kept (sent or not) with first <= seq <= last, oldest first."""
        with self._lock:
            cur = self._db.execute("SELECT seq, kind, device, ts, body FROM record WHERE seq BETWEEN ? AND ? "
                                   "ORDER BY seq LIMIT ?", (first, last, limit))
            return _as_rows(cur.fetchall())

    def kept_bounds(self, first: int, last: int) -> tuple[int, int] | None:
        """The lowest and highest seq kept within first..last, or None if nothing is kept there."""
        with self._lock:
            try:
                lo, hi = self._db.execute("SELECT min(seq), max(seq) FROM record WHERE seq BETWEEN ? AND ?",
                                          (first, last)).fetchone()
            except sqlite3.Error as err:
                raise StorageError(f"cannot read the buffer: {err}") from err
        return None if lo is None else (int(lo), int(hi))

    def _last_seq(self) -> int:
        got = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name='record'").fetchone()
        return int(got[0]) if got else 0

    def last_seq(self) -> int:
        with self._lock:
            return self._last_seq()

    def _unsent_count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM unsent").fetchone()[0])

    def stats(self) -> Stats:
        with self._lock:
            unsent = self._unsent_count()
            oldest = self._db.execute(
                "SELECT ts FROM record WHERE seq = (SELECT min(seq) FROM unsent)").fetchone()
            got = self._db.execute("SELECT value FROM counter WHERE name='dropped_unsent'").fetchone()
            return Stats(unsent, self._rows(), oldest[0] if oldest else None, self._last_seq(),
                         int(got[0]) if got else 0, self.size_bytes(), self.budget_bytes)

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


def _as_rows(rows: list[tuple[int, int, str, int, str]]) -> list[Row]:
    """Result tuples as Rows without a Python call per row (a day of backlog is 864k rows)."""
    return list(map(tuple.__new__, repeat(Row), rows))


def _runs(ids: list[int]) -> list[tuple[int, int]]:
    """Sorted seqs as (first, last) runs of consecutive values."""
    runs: list[tuple[int, int]] = []
    for seq in ids:
        if runs and runs[-1][1] == seq - 1:
            runs[-1] = (runs[-1][0], seq)
        else:
            runs.append((seq, seq))
    return runs


def _row_bytes(row: RecordRow) -> int:
    return len(row[3]) + len(row[1]) + 24


def _record_row(r: Reading | Event) -> RecordRow:
    if isinstance(r, Reading):
        body = json.dumps({"values": r.values, "q": r.quality}, ensure_ascii=False, separators=(",", ":"))
        return (KIND_DATA, r.device, r.ts_ms, body)
    body = json.dumps({"event": r.event, **r.details}, ensure_ascii=False, separators=(",", ":"))
    return (KIND_EVENT, r.device, r.ts_ms, body)


def records_from(rows: Sequence[Row]) -> list[Reading | Event]:
    """Rows back into records (tests and tools)."""
    out: list[Reading | Event] = []
    for row in rows:
        body = json.loads(row.body)
        if row.kind == KIND_DATA:
            out.append(Reading(row.device, row.ts, body["values"], body["q"]))
        else:
            out.append(Event(row.device, row.ts, body.pop("event"), body))
    return out


def _is_full(err: sqlite3.OperationalError) -> bool:
    text = str(err).lower()
    return "full" in text or "disk i/o" in text
