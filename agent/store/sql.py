"""Small SQL helpers shared by the buffer and its room keeper; each runs on the caller's connection and lock."""

from __future__ import annotations

import errno
import sqlite3


def pragma(db: sqlite3.Connection, name: str) -> int:
    return int(db.execute(f"PRAGMA {name}").fetchone()[0])


def count(db: sqlite3.Connection, name: str, delta: int) -> None:
    """Add delta to a named counter (rows kept, unsent rows dropped)."""
    db.execute("INSERT INTO counter(name, value) VALUES (?, ?) "
               "ON CONFLICT(name) DO UPDATE SET value=value+excluded.value", (name, delta))


def counter(db: sqlite3.Connection, name: str) -> int:
    got = db.execute("SELECT value FROM counter WHERE name=?", (name,)).fetchone()
    return int(got[0]) if got else 0


def last_seq(db: sqlite3.Connection) -> int:
    """The highest seq ever given (AUTOINCREMENT keeps it even when that row is gone)."""
    got = db.execute("SELECT seq FROM sqlite_sequence WHERE name='record'").fetchone()
    return int(got[0]) if got else 0


def unsent_count(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT count(*) FROM unsent").fetchone()[0])


def mark_sent(db: sqlite3.Connection, runs: list[tuple[int, int]], step: int) -> int:
    """Delete seq runs from `unsent`, step runs per transaction; how many rows were deleted."""
    n = 0
    try:
        db.execute("PRAGMA synchronous=NORMAL")  # a lost mark is a duplicate, never a loss
        for i in range(0, len(runs), step):
            db.execute("BEGIN IMMEDIATE")
            n += db.executemany("DELETE FROM unsent WHERE seq BETWEEN ? AND ?", runs[i:i + step]).rowcount
            db.execute("COMMIT")
    except sqlite3.Error:
        rollback(db)
        raise
    finally:
        try:
            db.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error:
            pass
    return n


def rollback(db: sqlite3.Connection) -> None:
    try:
        db.execute("ROLLBACK")
    except sqlite3.Error:
        pass


# -- what a failed write means --------------------------------------------------------------

FULL = "full"  # no room: max_mb reached, SQLITE_FULL, ENOSPC. Only this may drop data.
CORRUPT = "corrupt"  # the file is damaged: set it aside, open a fresh one
TRANSIENT = "transient"  # EIO, SQLITE_IOERR, BUSY, a read-only remount...: hold and retry


def classify(err: BaseException) -> str:
    """FULL, CORRUPT or TRANSIENT. By SQLite's result code where there is one (the message
    text is only a fallback): a "disk I/O error" is not a full disk, and treating it as one
    deleted every unsent row."""
    if isinstance(err, OSError):
        return FULL if err.errno in (errno.ENOSPC, errno.EDQUOT) else TRANSIENT
    code = getattr(err, "sqlite_errorcode", None)
    if isinstance(code, int):
        primary = code & 0xFF
        if primary == sqlite3.SQLITE_FULL:
            return FULL
        if primary in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            return CORRUPT
        return TRANSIENT
    text = str(err).lower()
    if "database or disk is full" in text:
        return FULL
    if "malformed" in text or "not a database" in text:
        return CORRUPT
    return TRANSIENT


# -- epochs: which seqs were drawn in which lineage ---------------------------------------------


def epochs(db: sqlite3.Connection) -> list[tuple[int, str]]:
    """(first_seq, epoch) segments, oldest first; a seq belongs to the last segment at or below it."""
    return [(int(a), str(b)) for a, b in db.execute(
        "SELECT value, substr(name, 7) FROM counter WHERE name LIKE 'epoch:%' ORDER BY value")]


def add_epoch(db: sqlite3.Connection, first_seq: int, epoch: str) -> None:
    db.execute("INSERT INTO counter(name, value) VALUES (?, ?)", (f"epoch:{epoch}", first_seq))


def set_last_seq(db: sqlite3.Connection, seq: int) -> None:
    """Make the next AUTOINCREMENT seq seq + 1 (never lowers it)."""
    if db.execute("UPDATE sqlite_sequence SET seq=max(seq, ?) WHERE name='record'", (seq,)).rowcount == 0:
        db.execute("INSERT INTO sqlite_sequence(name, seq) VALUES ('record', ?)", (seq,))
