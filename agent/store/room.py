"""Room in the buffer: max_mb and the file system's free space, and what is deleted to stay within them.

`max_mb` bounds the database file plus its WAL. The WAL gets a fixed slice of the budget
(wal_autocheckpoint + every transaction kept below it), the database the rest through
`max_page_count`, which also stops growth where the file system would fall below `min_free_mb`.
When that limit is reached, room is made in this order: sent rows older than keep_sent_days,
other sent rows, then the oldest unsent rows — every drop of unsent rows is a `dropped` event,
committed in the same transaction as the deletion, naming its seq range.

Runs on the buffer's connection, under the buffer's lock (the caller holds it).
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.store import sql
from agent.store.rows import KIND_DROP, record_row
from drivers.model import Event

log = logging.getLogger(__name__)

# New files use 1 KiB pages: every commit rewrites a handful of pages that change by a few bytes
# (page 1, the pointer map, `unsent`, `counter`, the last leaf of each tree), and at 4 KiB these
# were most of the bytes written per reading (issue #16: -43 % at 20 devices x 1 s). A file keeps
# the page size it was created with (SQLite cannot change it in WAL mode): older 4 KiB files stay
# 4 KiB, and their budget is counted in their own pages.
NEW_PAGE_SIZE = 1024
WAL_FRAME_HEADER = 24
WAL_HEADER = 32
WAL_MAX_BYTES = 4 * 1024 * 1024  # the WAL's slice never grows beyond this, whatever the page size
SCHEMA_PAGES = 8  # page 1, ptrmap, record, sqlite_sequence, unsent, counter, identity, spare


@dataclass(frozen=True)
class Budget:
    """How max_mb is shared between the database and its WAL, in pages and frames."""

    budget_bytes: int
    min_free_bytes: int
    keep_sent_ms: int
    wal_frames: int
    wal_bytes: int
    checkpoint_frames: int
    txn_pages: int
    max_pages: int
    page_size: int = NEW_PAGE_SIZE

    @classmethod
    def of(cls, max_mb: float, min_free_mb: float, keep_sent_days: float, page_size: int = NEW_PAGE_SIZE) -> Budget:
        budget_bytes = int(max_mb * 1024 * 1024)
        budget_pages = budget_bytes // page_size
        # The WAL's slice: a checkpoint every quarter of it, and no transaction larger than the
        # rest, so the WAL file never outgrows its slice (limits.md §3: keep the WAL small).
        wal_frames = min(WAL_MAX_BYTES // page_size, max(12, budget_pages // 16, min(64, budget_pages // 4)))
        wal_bytes = WAL_HEADER + wal_frames * (page_size + WAL_FRAME_HEADER)
        checkpoint_frames = max(3, wal_frames // 4)
        return cls(budget_bytes=budget_bytes, min_free_bytes=int(min_free_mb * 1024 * 1024),
                   keep_sent_ms=int(keep_sent_days * 86_400_000), wal_frames=wal_frames, wal_bytes=wal_bytes,
                   checkpoint_frames=checkpoint_frames, txn_pages=wal_frames - checkpoint_frames,
                   max_pages=max(SCHEMA_PAGES + 2, (budget_bytes - wal_bytes) // page_size), page_size=page_size)

    def in_pages(self, page_size: int) -> Budget:
        """The same limits counted in pages of page_size (an existing file keeps its own)."""
        return Budget.of(self.budget_bytes / 2**20, self.min_free_bytes / 2**20, self.keep_sent_ms / 86_400_000,
                         page_size)


class Room:
    """Keeps the buffer file within its budget; every unsent row it deletes is announced."""

    def __init__(self, db: sqlite3.Connection, path: Path, budget: Budget) -> None:
        self._db = db
        self.path = path
        self.wal_path = Path(f"{path}-wal")
        self.budget = budget
        self.max_pages = budget.max_pages
        self.txn_pages = budget.txn_pages
        self.wal_bytes = budget.wal_bytes
        self.min_free_bytes = budget.min_free_bytes
        self.keep_sent_ms = budget.keep_sent_ms

    def size_bytes(self) -> int:
        """Database file plus WAL on disk: what max_mb bounds."""
        total = 0
        for p in (self.path, self.wal_path):
            try:
                total += p.stat().st_size
            except OSError:  # no -wal yet, or the file was deleted under us: nothing on disk
                pass
        return total

    def _disk_spare(self) -> int | None:
        """Bytes the file system can still give, or None when it cannot be asked (then only
        max_mb limits: a failing statvfs must not stop the writer)."""
        try:
            st = os.statvfs(self.path.parent)
        except OSError as err:
            log.warning("device=_site cannot read free space of %s: %s", self.path.parent, err)
            return None
        return st.f_bavail * st.f_frsize

    def _pragma(self, name: str) -> int:
        return int(self._db.execute(f"PRAGMA {name}").fetchone()[0])

    def available(self) -> tuple[int, bool]:
        """Pages an insert may use now, and whether the file system (not max_mb) is the limit.
        Sets max_page_count so SQLite itself enforces both limits. The database may not take the
        room its WAL may need."""
        pages = sql.pragma(self._db, "page_count")
        try:
            wal = self.wal_path.stat().st_size
        except OSError:
            wal = 0
        wal_need = self.wal_bytes  # the WAL may grow to its whole slice
        page_size = self.budget.page_size
        free = self._disk_spare()
        if free is None:
            free = (self.max_pages + 1) * page_size + self.min_free_bytes + wal_need
        spare = free - self.min_free_bytes - max(0, wal_need - wal)
        by_disk = pages + max(0, spare) // page_size < self.max_pages
        limit = min(self.max_pages, pages + max(0, spare) // page_size)
        self._db.execute(f"PRAGMA max_page_count={max(limit, 1)}")
        return limit - pages + sql.pragma(self._db, "freelist_count"), by_disk

    def make(self, pages: int, by_disk: bool) -> None:
        """Free at least `pages` pages (and up to one transaction's worth, so that drops come in
        few, large steps): old sent rows, then other sent rows, then the oldest unsent rows."""
        target = max(pages, min(self.max_pages // 16, self.txn_pages - 8), 2)
        reason = ("disk full (free space below buffer.min_free_mb)" if by_disk
                  else "buffer full (buffer.max_mb reached)")
        start = sql.pragma(self._db, "freelist_count")

        def freed() -> int:
            return sql.pragma(self._db, "freelist_count") - start

        self._delete_sent(target, int(time.time() * 1000) - self.keep_sent_ms)
        if freed() < target:
            self._delete_sent(target - freed(), None)
        while freed() < target and self._drop_unsent(self._rows_for(target - freed()), reason):
            pass

    def _rows_for(self, pages: int) -> int:
        """About how many rows fill `pages` pages (a few more: a first leaf may be shared), at
        most what one transaction may delete: every leaf touched is a WAL frame."""
        used = max(1, sql.pragma(self._db, "page_count") - sql.pragma(self._db, "freelist_count") - SCHEMA_PAGES)
        per_page = max(1.0, self._rows() / used)
        return max(1, min(math.ceil((pages + 1) * per_page * 1.25), int((self.txn_pages - 8) * per_page * 0.8)))

    def _rows(self) -> int:
        return sql.counter(self._db, "rows")

    def _delete_sent(self, pages: int, older_than: int | None) -> None:
        """Delete sent rows, oldest first, until `pages` pages are free. With older_than: only
        rows polled before it, stopping at the first newer one (seq order is time order)."""
        if self._rows() <= sql.unsent_count(self._db):
            return
        start = sql.pragma(self._db, "freelist_count")
        for lo, hi in self._sent_ranges():
            newer = None
            if older_than is not None:
                newer = self._db.execute("SELECT min(seq) FROM record WHERE seq BETWEEN ? AND ? AND ts >= ?",
                                         (lo, hi, older_than)).fetchone()[0]
                hi = hi if newer is None else newer - 1
            while lo <= hi:
                freed = sql.pragma(self._db, "freelist_count") - start
                if freed >= pages:
                    return
                lo = self._delete_range(lo, hi, self._rows_for(pages - freed)) + 1
            if newer is not None or sql.pragma(self._db, "freelist_count") - start >= pages:
                return

    def _sent_ranges(self) -> Iterator[tuple[int, int]]:
        """Seq ranges holding no unsent row, oldest first, from the oldest row kept."""
        db = self._db
        lo = db.execute("SELECT min(seq) FROM record").fetchone()[0]
        last = sql.last_seq(self._db)
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
            sql.count(self._db, "rows", -n)
            db.execute("COMMIT")
            return int(top)
        except BaseException:
            sql.rollback(self._db)
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
            sql.count(self._db, "rows", 1 - gone)
            sql.count(self._db, "dropped_unsent", count)
            event = Event("_site", int(time.time() * 1000), "dropped",
                          {"first_seq": first, "last_seq": last, "count": count, "reason": reason})
            db.execute("INSERT INTO record(kind, device, ts, body) VALUES (?,?,?,?)",
                       (KIND_DROP, *record_row(event)[1:]))
            db.execute("INSERT INTO unsent(seq) VALUES (?)", (sql.last_seq(self._db),))
            db.execute("COMMIT")
        except BaseException:
            sql.rollback(self._db)
            raise
        log.error("device=_site buffer dropped %d unsent records, seq %d..%d: %s", count, first, last, reason)
        return True

    def prune_sent(self, cutoff_ms: int) -> None:
        """Delete sent rows polled before cutoff_ms, then shrink a file above its budget."""
        self._delete_sent(2**62, cutoff_ms)
        self.shrink_to_budget()

    def shrink_to_budget(self) -> None:
        """A buffer above max_mb (max_mb was lowered, or a file from `sqlite3 .recover`) is
        pruned and vacuumed, in small steps. Bounded: it stops when a step frees nothing."""
        if sql.pragma(self._db, "page_count") <= self.max_pages:
            return
        if sql.pragma(self._db, "auto_vacuum") != 2:
            self._convert()
        shrunk = False
        while sql.pragma(self._db, "page_count") > self.max_pages:
            before = sql.pragma(self._db, "page_count"), self._rows()
            free = sql.pragma(self._db, "freelist_count")
            if free == 0:
                self.make(sql.pragma(self._db, "page_count") - self.max_pages, False)
            else:
                # executescript frees all asked pages; execute() would free one (limits.md §3).
                self._db.executescript(f"PRAGMA incremental_vacuum({max(1, min(free, self.txn_pages // 4))});")
                shrunk = True
            if (sql.pragma(self._db, "page_count"), self._rows()) == before and \
                    sql.pragma(self._db, "freelist_count") == free:
                log.warning("device=_site buffer %s stays above max_mb: nothing more can be freed", self.path)
                break
        if shrunk:  # the file itself only gets shorter when the WAL is checkpointed
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _convert(self) -> None:
        """A file without incremental auto_vacuum (made by another tool) cannot give pages
        back step by step: convert it once with a VACUUM (it needs free disk space about the
        size of the file; without it the file stays as it is, and room is made inside it)."""
        log.info("device=_site buffer %s has no incremental auto_vacuum: converting it once (VACUUM)", self.path)
        try:
            self._db.execute(f"PRAGMA max_page_count={2**31 - 2}")  # VACUUM rewrites the whole file
            self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            self._db.execute("VACUUM")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as err:
            log.warning("device=_site cannot convert buffer %s (%s): pruning inside it instead", self.path, err)
