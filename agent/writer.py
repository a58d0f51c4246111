"""The buffer's single writer: readings and events from the link workers, committed in batches.

Polling never waits on the disk: workers hand records to a queue and go on. This thread commits
whatever has arrived once per commit interval (one fsync per poll cycle, not per reading). If
the disk is full even after the buffer made room, records wait in memory (bounded) and are
retried, and the agent recovers by itself when space returns.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque

from agent.buffer import Buffer
from agent.logutil import RateLimitedLog
from drivers.errors import StorageError
from drivers.model import Event, Reading

log = logging.getLogger(__name__)
MEMORY_LIMIT = 50_000


class BufferWriter:
    def __init__(self, buffer: Buffer, commit_interval_s: float = 1.0) -> None:
        self.buffer = buffer
        self.commit_interval_s = commit_interval_s
        self._queue: queue.SimpleQueue[Reading | Event | None] = queue.SimpleQueue()
        self._pending: deque[Reading | Event] = deque()
        self._thread: threading.Thread | None = None
        self._rl = RateLimitedLog(log, window_s=60.0)
        self.committed = 0
        self.memory_dropped = 0
        self.last_commit_ok = True
        self.last_progress = time.monotonic()
        self._flushed = threading.Condition()
        self._generation = 0

    def put(self, record: Reading | Event) -> None:
        """Thread-safe; called from the event loop for every completed poll and event."""
        self._queue.put(record)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="buffer-writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Commit everything queued so far, then end the thread."""
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything put before this call is committed (or cannot be)."""
        with self._flushed:
            target = self._generation + 2
            return self._flushed.wait_for(lambda: self._generation >= target, timeout)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            deadline = time.monotonic() + self.commit_interval_s
            while True:
                timeout = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=max(timeout, 0.001)) if timeout > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                self._pending.append(item)
            self._commit()
            self.last_progress = time.monotonic()
            with self._flushed:
                self._generation += 1
                self._flushed.notify_all()

    def _commit(self) -> None:
        if not self._pending:
            return
        batch = list(self._pending)
        try:
            self.buffer.append(batch)
        except StorageError as err:
            self.last_commit_ok = False
            self._rl.warning("commit", "device=_site buffer write failed, %d records held in memory: %s",
                             len(self._pending), err)
            while len(self._pending) > MEMORY_LIMIT:
                self._pending.popleft()
                self.memory_dropped += 1
            return
        if not self.last_commit_ok:
            log.info("device=_site buffer writes succeed again")
            self._rl.reset("commit")
        self.last_commit_ok = True
        self.committed += len(batch)
        self._pending.clear()
