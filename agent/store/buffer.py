"""The SQLite buffer: the only hand-off between polling and publishing.

One connection, serialised by a lock, is the single writer (limits.md §3: a WAL-reset bug
needs several writers). `seq` is an AUTOINCREMENT rowid, so SQLite itself guarantees it is never
reused, also after rows are deleted or the process is killed. Inserts commit with
synchronous=FULL, so a committed seq survives a power cut and can never be given again.
"Sent" is the absence of a row in the small `unsent` table: marking a PUBACKed message sent
deletes a few bytes per reading instead of rewriting each reading's page, and those commits run
with synchronous=NORMAL (losing one to a power cut only means a duplicate later).

Every seq belongs to an epoch (the `epoch` table: seq ranges); a new buffer file, a replaced
one or a damaged one set aside starts a new epoch (agent/store/opening.py), and the side file
(agent/store/lineage.py) keeps seq from going backwards across files. A damaged file found
while running is set aside and replaced by `recover()` without a restart; the Buffer object
stays the same, so the publisher holding it goes on.

Size: `max_mb` bounds the database file plus its WAL; agent/store/room.py keeps it there and
announces every unsent row it has to delete. The record format is in agent/store/rows.py.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from agent import private
from agent.logutil import RateLimitedLog
from agent.store import alarms, lineage, opening, readonly, restamp, schema, sql
from agent.store.lineage import Lineage
from agent.store.listeners import Listeners
from agent.store.room import NEW_PAGE_SIZE, Budget, Room
from agent.store.rows import RecordRow, Row, Stats, as_rows, record_row, row_bytes, seq_runs
from drivers.errors import StorageError
from drivers.model import Event, Reading

log = logging.getLogger(__name__)

SCHEMA_VERSION = schema.SCHEMA_VERSION
LEASE_SLACK = 64  # seqs one append may add beyond its records (drop announcements)


class PartialWrite(StorageError):
    """append() stored only the records whose seqs are in `seqs` (a prefix, maybe empty).
    `kind` says why: sql.FULL (no room even after pruning), sql.CORRUPT (the file is damaged:
    call recover()), sql.TRANSIENT (I/O error, busy, read-only: retry later)."""

    def __init__(self, message: str, seqs: list[int], kind: str = sql.TRANSIENT) -> None:
        super().__init__(message)
        self.seqs = seqs
        self.kind = kind


class _Damaged(Exception):
    pass


class Buffer(Listeners):
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
        self.resets = 0  # damaged files replaced while running
        Listeners.__init__(self)
        try:
            private.prepare_database(self.path)  # 0600, with its -wal and -shm
            self.start_events = self._open()
        except (OSError, sqlite3.Error) as err:
            raise StorageError(f"cannot open buffer {self.path}: {err}") from err

    def _open(self, floor: int = 0, problem: str | None = None, lin: Lineage | None = None) -> list[Event]:
        """Open (or create) the file, setting a damaged one aside; returns the events stored.
        `lin`: the lineage this process holds (a reopen), instead of the side file's."""
        lin = lin if lin is not None else lineage.read(self.path)
        damage = opening.quarantine(self.path, problem) if problem else None
        while True:
            db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            try:
                existing = damage is None and self.path.exists() and self.path.stat().st_size > 0
                if existing and (found := opening.check(db)) is not None:
                    raise _Damaged(found)
                self.budget = self.budget.in_pages(sql.pragma(db, "page_size") if existing else NEW_PAGE_SIZE)
                schema.configure(db, self.budget)
                schema.migrate(db, self.path, self.budget)
                self._lineage, events = opening.establish(db, self.path, lin, damage, floor)
                break
            except (_Damaged, sqlite3.DatabaseError) as err:
                db.close()
                if damage is not None or (isinstance(err, sqlite3.Error) and sql.classify(err) != sql.CORRUPT):
                    raise
                damage = opening.quarantine(self.path, str(err))
            except BaseException:
                db.close()
                raise
        self._db = db
        self.room = Room(db, self.path, self.budget)
        self._epochs = sql.epochs(db)
        self._last_given = sql.last_seq(db)
        lineage.write(self.path, self._lineage)
        self.room.shrink_to_budget()
        return events

    @property
    def epoch(self) -> str:
        """The epoch new seqs are drawn in."""
        return self._epochs[-1][1] if self._epochs else ""

    def recover(self, problem: str) -> list[Event]:
        """The file turned out damaged while running: set it aside, open a fresh one (a new
        epoch above every seq given) and return the events stored there (`buffer_reset`)."""
        with self._lock:
            floor = max(self._last_given, self._lineage.seq_ceiling)
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            try:
                # what the writer noted as held is still held (and written next), not lost
                events = self._open(floor, problem, Lineage(self._lineage.epoch, self._lineage.seq_seen,
                                                            self._lineage.seq_ceiling))
            except (OSError, sqlite3.Error) as err:
                raise StorageError(f"cannot replace damaged buffer {self.path}: {err}") from err
            self.resets += 1
            return events

    def close(self) -> None:
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                # the exact last seq: a file found below it at the next start is an older copy
                self._lineage = self._lineage.extended(sql.last_seq(self._db))
                lineage.write(self.path, self._lineage)
            except sqlite3.Error:
                pass
            self._db.close()

    def note_unbuffered(self, summary: Mapping[str, Any] | None) -> bool:
        """Records the writer holds and may not get to write (count, first_ts, last_ts,
        devices, reason), kept in the side file so the next start announces them as
        `dropped_unbuffered`; None clears it. False when the side file cannot be written."""
        with self._lock:
            self._lineage = Lineage(self._lineage.epoch, self._lineage.seq_seen, self._lineage.seq_ceiling,
                                    dict(summary) if summary else None)
            return lineage.write(self.path, self._lineage)

    @property
    def newest_seq(self) -> int:
        """The highest seq this process committed (or found at opening), without a query:
        the publisher looks for live rows only when this moved past what it has read."""
        return self._last_given

    # -- writing -----------------------------------------------------------------------------

    def append(self, records: Iterable[Reading | Event]) -> list[int]:
        """Insert in the given order; returns the seqs given. Commits once, or in a few
        transactions when the batch is larger than the WAL slice. Raises PartialWrite (a
        StorageError) naming the seqs stored before a failure and what kind of failure it was."""
        return self.append_rows([record_row(r) for r in records])

    def append_rows(self, rows: list[RecordRow]) -> list[int]:
        """append() for rows already in the stored format (salvage)."""
        seqs: list[int] = []
        try:
            with self._lock:
                for chunk in self._chunks(rows):
                    try:
                        seqs.extend(self._append_chunk(chunk))
                    except (sqlite3.Error, OSError) as err:
                        kind = sql.classify(err)
                        text = f"buffer full: no room for {len(chunk)} records even after pruning ({err})" \
                            if kind == sql.FULL else f"buffer write failed ({kind}): {err}"
                        raise PartialWrite(text, seqs, kind) from err
        finally:
            if seqs:  # outside the lock: the publisher reads at once
                self._tell("records")
        return seqs

    def _chunks(self, rows: list[RecordRow]) -> Iterator[list[RecordRow]]:
        limit = max(1, self.budget.txn_pages - 6) * self.budget.page_size * 3 // 4
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
        """Only a real lack of room (SQLITE_FULL under max_page_count, ENOSPC) makes room, which
        may drop unsent rows; every other error is raised for the writer to classify."""
        need = 3 + math.ceil(sum(row_bytes(r) for r in rows) / (self.budget.page_size * 0.8))
        full: sqlite3.Error | None = None
        self._lease(len(rows))
        for attempt in range(3):
            try:
                room, by_disk = self.room.available()
                if room < need or full is not None:  # after a full error, the estimate was short
                    self.room.make(need * (attempt + 1), by_disk)
                return self._insert(rows)
            except sqlite3.Error as err:
                if sql.classify(err) != sql.FULL:
                    raise
                full = err
                self._rl.warning("full", "device=_site buffer full while writing %d records (%s); making room",
                                 len(rows), err)
        assert full is not None
        raise full

    def _insert(self, rows: list[RecordRow]) -> list[int]:
        db = self._db
        before = sql.last_seq(db)
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT INTO record(kind, device, ts, body) VALUES (?,?,?,?)", rows)
            db.execute("INSERT INTO unsent(seq) SELECT seq FROM record WHERE seq > ?", (before,))
            sql.count(db, "rows", len(rows))
            alarms.track(db, rows)
            after = sql.last_seq(db)
            db.execute("COMMIT")
        except BaseException:
            sql.rollback(db)
            raise
        self._last_given = after
        # AUTOINCREMENT under one writer: the seqs of one transaction are consecutive.
        if after - before == len(rows):
            return list(range(before + 1, after + 1))
        return [r[0] for r in db.execute("SELECT seq FROM record WHERE seq BETWEEN ? AND ? ORDER BY seq",
                                         (before + 1, after))]

    def _lease(self, n: int) -> None:
        """The side file first: no seq above the recorded lease is committed. Before making
        room too, because every drop announcement takes a seq as well."""
        last = sql.last_seq(self._db)
        if last + n + LEASE_SLACK > self._lineage.seq_ceiling:
            self._lineage = self._lineage.extended(last, n + LEASE_SLACK)
            lineage.write(self.path, self._lineage)

    def mark_sent(self, seqs: Iterable[int]) -> int:
        """The broker acknowledged these seqs; returns how many were still unsent."""
        runs = seq_runs(sorted(set(seqs)))
        if not runs:
            return 0
        step = max(8, self.budget.txn_pages - 4)  # runs per transaction: each may touch a leaf page
        with self._lock:
            try:
                return sql.mark_sent(self._db, runs, step)
            except sqlite3.Error as err:
                raise StorageError(f"cannot mark records sent: {err}") from err

    # -- room ------------------------------------------------------------------------------

    def size_bytes(self) -> int:
        """Database file plus WAL on disk: what max_mb bounds."""
        return self.room.size_bytes()

    def prune_sent(self, now_ms: int | None = None) -> int:
        """Delete sent rows older than keep_sent_days (periodic housekeeping); returns rows deleted."""
        cutoff = (now_ms if now_ms is not None else int(time.time() * 1000)) - self.keep_sent_ms
        with self._lock:
            try:
                before = sql.counter(self._db, "rows")
                self.room.prune_sent(cutoff)
                return before - sql.counter(self._db, "rows")
            except sqlite3.Error as err:
                raise StorageError(f"cannot prune the buffer: {err}") from err

    def restamp(self, first: int, last: int, delta_ms: int, flag: str, new_flag: str) -> int:
        """Re-stamp unsent readings after a clock step (agent/store/restamp.py); returns the count."""
        with self._lock:
            return restamp.restamp(self._db, first, last, delta_ms, flag, new_flag)

    # -- identities and alarms -----------------------------------------------------------------

    def put_identity(self, device: str, identity: dict[str, object]) -> None:
        """A device's nameplate (model, serial, rating), for the retained meta message."""
        body = json.dumps(identity, ensure_ascii=False, sort_keys=True)
        with self._lock:
            try:
                self._db.execute("INSERT INTO identity(device, body) VALUES (?, ?) "
                                 "ON CONFLICT(device) DO UPDATE SET body=excluded.body", (device, body))
            except sqlite3.Error as err:
                self._rl.warning(f"identity-{device}", "device=%s cannot store identity: %s", device, err)
                return
        self._tell("identity")

    def identities(self) -> dict[str, dict[str, object]]:
        with self._lock:
            rows = self._db.execute("SELECT device, body FROM identity").fetchall()
        return {device: json.loads(body) for device, body in rows}

    def active_alarms(self) -> dict[str, dict[str, int]]:
        """device -> alarm point -> the raw bits last announced: what a restarted poller
        compares its first reading with (no duplicate `alarm`, and the `alarm_cleared` that
        happened while the agent was down). Kept up to date by every stored alarm event."""
        with self._lock:
            return alarms.active(self._db)

    def set_alarms(self, device: str, bits: Mapping[str, int]) -> None:
        """Replace a device's active alarm bits (e.g. forget a device removed from the site)."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                alarms.replace(db, device, bits)
                db.execute("COMMIT")
            except BaseException:
                sql.rollback(db)
                raise

    # -- reading -----------------------------------------------------------------------------

    def _parts(self, lo: int, hi: int) -> list[tuple[int, int, str]]:
        """lo..hi cut at epoch boundaries: (first, last, epoch), oldest first."""
        out = []
        segs = self._epochs
        for i, (first, epoch) in enumerate(segs):
            end = segs[i + 1][0] - 1 if i + 1 < len(segs) else 2**62
            if max(lo, first) <= min(hi, end):
                out.append((max(lo, first), min(hi, end), epoch))
        return out or [(lo, hi, "")]

    def _select(self, query: str, lo: int, hi: int, limit: int) -> list[Row]:
        """Rows of `query` (seq bounds and a limit as parameters), each with its epoch."""
        got: list[tuple[int, int, str, int, str, str]] = []
        for first, last, epoch in self._parts(lo, hi):
            got += self._db.execute(query, (epoch, first, last, limit - len(got))).fetchall()
            if len(got) >= limit:
                break
        return as_rows(got)

    def unsent(self, after_seq: int, up_to_seq: int | None = None, limit: int = 1000) -> list[Row]:
        """Unsent rows with after_seq < seq <= up_to_seq, oldest first."""
        hi = up_to_seq if up_to_seq is not None else 2**62
        with self._lock:
            return self._select(
                "SELECT r.seq, r.kind, r.device, r.ts, r.body, ? FROM unsent AS u CROSS JOIN record AS r "
                "ON r.seq = u.seq WHERE u.seq >= ? AND u.seq <= ? ORDER BY u.seq LIMIT ?", after_seq + 1, hi, limit)

    def range(self, first: int, last: int, limit: int = 100_000) -> list[Row]:
        """Rows still kept (sent or not) with first <= seq <= last, oldest first."""
        with self._lock:
            return self._select("SELECT seq, kind, device, ts, body, ? FROM record WHERE seq BETWEEN ? AND ? "
                                "ORDER BY seq LIMIT ?", first, last, limit)

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
            return readonly.stats(self._db, self.path, self.budget_bytes)


class BufferSettings(Protocol):
    """What open_buffer needs of the site file's `buffer:` section (agent.config.BufferConfig)."""

    @property
    def path(self) -> str: ...
    @property
    def max_mb(self) -> float: ...
    @property
    def keep_sent_days(self) -> float: ...
    @property
    def min_free_mb(self) -> float: ...


def open_buffer(cfg: BufferSettings) -> tuple[Buffer, list[Event]]:
    """The buffer for the agent, and the events its opening stored (already in the buffer,
    unsent, first in their epoch: `buffer_reset`, `dropped_unbuffered`), for the log and the
    status. A damaged file is set aside and a fresh one opened; StorageError only when no
    buffer can be opened at all (the directory is not writable, ...)."""
    buf = Buffer(cfg.path, cfg.max_mb, cfg.keep_sent_days, cfg.min_free_mb)
    return buf, list(buf.start_events)
