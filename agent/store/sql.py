"""Small SQL helpers shared by the buffer and its room keeper; each runs on the caller's connection and lock."""

from __future__ import annotations

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


def rollback(db: sqlite3.Connection) -> None:
    try:
        db.execute("ROLLBACK")
    except sqlite3.Error:
        pass
