"""Re-stamping: readings taken on an untrusted clock get their time right once a step brings trust.

Only unsent data rows that carry the untrusted flag move; the flag becomes the corrected one in
the same transaction, so a row is never moved twice. Runs under the buffer's lock.
"""

from __future__ import annotations

import sqlite3

from agent.store import sql
from agent.store.rows import KIND_DATA
from drivers.errors import StorageError


def restamp(db: sqlite3.Connection, first: int, last: int, delta_ms: int, flag: str, new_flag: str) -> int:
    """Move the unsent readings with first <= seq <= last that carry `flag` by delta_ms and flag
    them `new_flag` instead. Returns how many moved."""
    if last < first:
        return 0
    old, new = f'"{flag}"', f'"{new_flag}"'  # flags are JSON strings inside the body's "q" array
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
