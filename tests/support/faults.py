"""Storage faults for the buffer tests: real damage to real files, and (named as such) errors
injected at the SQLite call where the OS cannot produce them on demand (EIO, SQLITE_CORRUPT on a
page the connection already has cached)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any



def page_size(path: Path) -> int:
    """The page size a database file was created with (its header: 2 bytes at offset 16)."""
    with open(path, "rb") as fh:
        fh.seek(16)
        raw = int.from_bytes(fh.read(2), "big")
    return 65536 if raw == 1 else raw


def overwrite_page(path: Path, page: int, fill: bytes = b"\xa5") -> None:
    """Overwrite page `page` (1-based; 1 is the header page) of a database file, on disk."""
    size = page_size(path)
    with open(path, "r+b") as fh:
        fh.seek((page - 1) * size)
        fh.write(fill * size)
        fh.flush()
        os.fsync(fh.fileno())


def sqlite_error(message: str, code: int, kind: type[sqlite3.Error] = sqlite3.OperationalError) -> sqlite3.Error:
    """An exception as SQLite raises it: the message and the result code."""
    err = kind(message)
    err.sqlite_errorcode = code  # type: ignore[attr-defined]
    err.sqlite_errorname = {10: "SQLITE_IOERR", 11: "SQLITE_CORRUPT", 5: "SQLITE_BUSY"}.get(code, "?")  # type: ignore[attr-defined]
    return err


class FaultyConnection:
    """Wraps a sqlite3.Connection; the next `fail` statements that insert into `record` raise
    `error` (injected: the OS cannot produce EIO on demand)."""

    def __init__(self, db: sqlite3.Connection, error: sqlite3.Error, fail: int) -> None:
        self._db = db
        self.error = error
        self.fail = fail
        self.raised = 0

    def _check(self, statement: str) -> None:
        if self.fail > 0 and statement.lstrip().upper().startswith("INSERT INTO RECORD"):
            self.fail -= 1
            self.raised += 1
            raise self.error

    def execute(self, statement: str, *args: Any) -> sqlite3.Cursor:
        self._check(statement)
        return self._db.execute(statement, *args)

    def executemany(self, statement: str, *args: Any) -> sqlite3.Cursor:
        self._check(statement)
        return self._db.executemany(statement, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


def inject(buf: Any, error: sqlite3.Error, fail: int) -> FaultyConnection:
    """Make the buffer's next `fail` inserts raise `error`."""
    faulty = FaultyConnection(buf._db, error, fail)
    buf._db = faulty
    buf.room._db = faulty
    return faulty
