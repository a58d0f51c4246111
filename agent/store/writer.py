"""The buffer's single writer: readings and events from the link workers, committed in batches.

Polling never waits on the disk: workers hand records to a queue and go on. This thread commits
what has arrived once per poll cycle: the first record of a cycle opens a batch, and the batch is
committed `commit_interval` later (default 1 s) with everything that arrived meanwhile — the
devices of one aligned cycle finish within that window, so a cycle costs one fsync, not one per
reading (limits.md §2: SD-card wear).

If the buffer cannot take a batch even after making room (a disk so full that SQLite cannot
grow its WAL), the records wait here in memory, bounded, and are retried every second:
polling goes on and the agent recovers by itself when space returns. Records pushed out of
memory never received a seq, so they leave no gap; they are announced as a
`dropped_unbuffered` event on `_site` once writing works again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque

from agent.logutil import RateLimitedLog
from agent.store.buffer import Buffer, PartialWrite
from drivers.errors import StorageError
from drivers.model import Event, Reading

log = logging.getLogger(__name__)
MEMORY_LIMIT = 20_000  # records held while the disk is full (~30 min of a 100-inverter site)
IDLE_WAKE_S = 1.0  # the thread wakes at least this often, so the watchdog sees it alive
RETRY_S = 1.0  # a batch that could not be written is retried this often

Record = Reading | Event


class BufferWriter:
    def __init__(self, buffer: Buffer, commit_interval_s: float = 1.0) -> None:
        self.buffer = buffer
        self.commit_interval_s = commit_interval_s
        self._queue: queue.SimpleQueue[Record | None] = queue.SimpleQueue()
        self._pending: deque[Record] = deque()
        self._thread: threading.Thread | None = None
        self._rl = RateLimitedLog(log, window_s=60.0)
        self.committed = 0
        self.commits = 0
        self.memory_dropped = 0
        self._unannounced = 0
        self._dropped_ts: tuple[int, int] | None = None
        self.last_commit_ok = True
        self.last_progress = time.monotonic()
        self._flushed = threading.Condition()
        self._generation = 0

    @property
    def held_in_memory(self) -> int:
        return len(self._pending)

    def put(self, record: Record) -> None:
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
            stopping = self._gather()
            self._commit()
            self.last_progress = time.monotonic()
            with self._flushed:
                self._generation += 1
                self._flushed.notify_all()

    def _gather(self) -> bool:
        """Wait for the first record of a batch, then collect for commit_interval; True on stop."""
        if not self._pending:
            wait = IDLE_WAKE_S
        elif self.last_commit_ok:
            wait = self.commit_interval_s
        else:  # the disk is full: retry, but not in a tight loop
            wait = max(self.commit_interval_s, RETRY_S)
        deadline = time.monotonic() + wait
        while True:
            timeout = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                return False
            if item is None:
                self._drain_queue()
                return True
            if not self._pending:  # a batch opens: commit it one interval from now
                deadline = time.monotonic() + self.commit_interval_s
            self._pending.append(item)

    def _drain_queue(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                self._pending.append(item)

    def _commit(self) -> None:
        if not self._pending:
            return
        batch = list(self._pending)
        announce = self._announcement()
        try:
            self.buffer.append(([announce] if announce else []) + batch)
        except PartialWrite as err:
            done = len(err.seqs) - (1 if announce else 0)
            self._held(max(0, done), err, announced=announce is not None and len(err.seqs) > 0)
            return
        except StorageError as err:  # defensive: append raises PartialWrite
            self._held(0, err, announced=False)
            return
        if announce is not None:
            self._unannounced, self._dropped_ts = 0, None
        if not self.last_commit_ok:
            log.info("device=_site buffer writes succeed again")
            self._rl.reset("commit")
        self.last_commit_ok = True
        self.committed += len(batch)
        self.commits += 1
        self._pending.clear()

    def _held(self, done: int, err: StorageError, announced: bool) -> None:
        """Part of a batch was not stored: keep the rest in memory, bounded, oldest out first."""
        for _ in range(done):
            self._pending.popleft()
        self.committed += done
        if announced:
            self._unannounced, self._dropped_ts = 0, None
        self.last_commit_ok = False
        self._rl.warning("commit", "device=_site buffer write failed, %d records held in memory: %s",
                         len(self._pending), err)
        while len(self._pending) > MEMORY_LIMIT:
            lost = self._pending.popleft()
            self.memory_dropped += 1
            self._unannounced += 1
            first = self._dropped_ts[0] if self._dropped_ts else lost.ts_ms
            self._dropped_ts = (first, lost.ts_ms)
        if self._unannounced:
            self._rl.warning("memory", "device=_site disk full for long: %d records discarded from memory so far",
                             self.memory_dropped)

    def _announcement(self) -> Event | None:
        if not self._unannounced or self._dropped_ts is None:
            return None
        return Event("_site", int(time.time() * 1000), "dropped_unbuffered", {
            "count": self._unannounced, "first_ts": self._dropped_ts[0], "last_ts": self._dropped_ts[1],
            "reason": f"buffer not writable (disk full); more than {MEMORY_LIMIT} records waited in memory"})
