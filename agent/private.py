"""Files only the service user may read: the buffer (every reading, the site's topics) and state.

The unit's UMask=0027 would leave them group-readable; these helpers make them 0600 whatever the
umask, and tighten files left by an older version.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO

MODE = 0o600
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


def prepare_database(path: Path) -> None:
    """The parent directory, and the database file created (or tightened) as 0600 before SQLite
    opens it: SQLite gives its -wal and -shm files the mode of the database file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, MODE)
    try:
        os.fchmod(fd, MODE)
    finally:
        os.close(fd)
    for suffix in SQLITE_SIDE_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(f"{path}{suffix}", MODE)


def open_text(path: Path) -> IO[str]:
    """Open path for writing text (truncated), created 0600 and tightened if it existed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, MODE)
    try:
        os.fchmod(fd, MODE)
        return os.fdopen(fd, "w", encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise
