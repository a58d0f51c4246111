"""The buffer file's schema, its connection settings and its migrations (writer side only:
the read-only tools never run any of this)."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from agent.store import sql
from agent.store.room import Budget

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3
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
TS_INDEX = "CREATE INDEX IF NOT EXISTS record_ts ON record(ts)"  # export by time, in chunks
TS_INDEX_MIN_PAGES = 256  # below 1 MB the index's pages are better spent on data (export scans)
# `counter` holds every small named integer, so that a 0.1 MB buffer still has room for data
# (each table costs a page at least): `rows`, `dropped_unsent`, one `epoch:<epoch>` per epoch
# (its first seq), one `alarm:<device>/<point>` per active alarm point (its raw bits).


def configure(db: sqlite3.Connection, budget: Budget) -> None:
    """Pragmas, on every connection that writes (limits.md §3: max_page_count is per connection)."""
    db.execute(f"PRAGMA page_size={budget.page_size}")  # new files only
    db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # before the first table: the file can shrink
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA busy_timeout=5000")
    db.execute(f"PRAGMA wal_autocheckpoint={budget.checkpoint_frames}")
    db.execute(f"PRAGMA journal_size_limit={budget.wal_bytes}")
    db.execute(f"PRAGMA max_page_count={budget.max_pages}")


def migrate(db: sqlite3.Connection, path: Path, budget: Budget) -> None:
    """Create what is missing; bring older schemas up to date."""
    columns = [r[1] for r in db.execute("PRAGMA table_info(record)")]
    db.executescript(SCHEMA)
    if budget.max_pages >= TS_INDEX_MIN_PAGES:
        db.execute(TS_INDEX)
    if "sent" in columns:
        _migrate_v1(db, path)
    if db.execute("SELECT value FROM counter WHERE name='rows'").fetchone() is None:
        db.execute("INSERT INTO counter(name, value) SELECT 'rows', count(*) FROM record")
    if sql.pragma(db, "user_version") != SCHEMA_VERSION:  # no write on every open
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")


def _migrate_v1(db: sqlite3.Connection, path: Path) -> None:
    """Buffers written before the `unsent` table kept a `sent` column in every row."""
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT OR IGNORE INTO unsent(seq) SELECT seq FROM record WHERE sent=0")
    db.execute("DROP INDEX IF EXISTS record_unsent")
    db.execute("DROP INDEX IF EXISTS record_sent")
    db.execute("COMMIT")
    log.info("device=_site buffer %s migrated to schema %d", path, SCHEMA_VERSION)
