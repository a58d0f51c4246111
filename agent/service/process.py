"""The agent's own footprint: resident memory, open descriptors, threads and asyncio tasks.

Shown under ``process`` in `pvgate status --json`, so that a leak shows on a gateway before it
becomes an outage, and read by the soak benchmark (bench/soak.py). RSS, descriptors and threads
can also be read from outside through /proc/<pid> (the ``pid`` argument); the asyncio task
count only from inside, on the agent's event loop, since ``asyncio.all_tasks`` is not
thread-safe.
"""

from __future__ import annotations

import asyncio
import os
import resource
import sys
import threading
from typing import Any

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _proc(pid: int | None, what: str) -> str:
    return f"/proc/{'self' if pid is None else pid}/{what}"


def rss_bytes(pid: int | None = None) -> int | None:
    """Resident set size now. Without /proc (not Linux) only our own peak RSS is known, which
    cannot shrink, so it is an upper bound of the current value."""
    try:
        with open(_proc(pid, "statm"), encoding="ascii") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        if pid is not None:
            return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes on macOS, KiB on Linux


def open_fds(pid: int | None = None) -> int | None:
    """Open file descriptors (sockets, the buffer and its WAL, pipes, log files)."""
    try:
        names = os.listdir(_proc(pid, "fd"))
    except OSError:
        return None
    # Listing our own /proc/self/fd holds one descriptor open for the listing itself.
    return len(names) - (1 if pid is None else 0)


def os_threads(pid: int | None = None) -> int | None:
    """OS threads, including those Python does not know of (e.g. started by a C library)."""
    try:
        return len(os.listdir(_proc(pid, "task")))
    except OSError:
        return None if pid is not None else threading.active_count()


def asyncio_tasks(loop: asyncio.AbstractEventLoop) -> int:
    """Tasks not yet done on loop. Call it on the loop's own thread."""
    return len(asyncio.all_tasks(loop))


def snapshot(loop: asyncio.AbstractEventLoop | None = None) -> dict[str, Any]:
    """The ``process`` object of `pvgate status`. On the event loop's thread; without a loop
    (another thread) ``tasks`` is null."""
    if loop is None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
    return {"rss_bytes": rss_bytes(), "fds": open_fds(), "threads": os_threads(),
            "py_threads": threading.active_count(),
            "tasks": asyncio_tasks(loop) if loop is not None else None}


__all__ = ["asyncio_tasks", "open_fds", "os_threads", "rss_bytes", "snapshot"]
