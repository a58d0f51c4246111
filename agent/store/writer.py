"""The buffer's single writer: readings and events from the link workers, committed in batches.

Polling never waits on the disk: workers hand records to a queue and go on. This thread commits
what has arrived once per poll cycle (group commit): the link workers say when every link has
finished its polls (`cycle_done`), and the batch is committed then, so live data reaches the
broker right after the cycle, not an interval later. Bounded both ways by `commit_interval`
(default 1 s): never more than one commit (one fsync) per interval, and no batch waits longer
than the interval after its first record, whatever the links say. A cycle costs one fsync, not
one per reading (limits.md §2: SD-card wear). `flush()` commits at once.

A failed commit is handled by what it means (agent/store/sql.py `classify`):

- full (max_mb, SQLITE_FULL, ENOSPC, the free-space floor): the buffer has already made room as
  far as it may; what still does not fit waits here and is retried every RETRY_S;
- corrupt (SQLITE_CORRUPT / NOTADB): the file is set aside and a fresh one opened (a new epoch,
  announced), and the records waiting here are written there at once;
- transient (EIO, SQLITE_IOERR, BUSY, a read-only file system, ...): nothing is deleted; the
  records wait here and are retried with backoff up to RETRY_MAX_S.

Waiting records are bounded (MEMORY_LIMIT, oldest out first). Records pushed out of memory never
received a seq, so they leave no gap; they are announced as `dropped_unbuffered` on `_site` once
writing works again. Records still held when the agent stops (or while it cannot write for
long) are summed up in the buffer's side file and announced at the next start. `last_progress`
advances only while commits succeed (or nothing waits): a writer that cannot store anything
stops the systemd watchdog's pings.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

from agent.logutil import RateLimitedLog
from agent.store import sql
from agent.store.buffer import Buffer, PartialWrite
from drivers.errors import StorageError
from drivers.model import Event, Reading

log = logging.getLogger(__name__)
MEMORY_LIMIT = 20_000  # records held while the disk is full (~30 min of a 100-inverter site)
RETRY_S = 1.0  # a batch that could not be written for lack of room is retried this often
RETRY_MAX_S = 30.0  # transient errors: retried with backoff, doubling up to this
NOTE_S = 10.0  # while failing, the side file's summary of what is held is refreshed this often
MAX_DEVICES_NOTED = 100

Record = Reading | Event


class _Flush:
    """A flush() request in the queue: commit now, then set `done`."""

    def __init__(self) -> None:
        self.done = threading.Event()


class _Cycle:
    """Every link finished its polls: the batch may go now."""


_CYCLE = _Cycle()


class BufferWriter:
    def __init__(self, buffer: Buffer, commit_interval_s: float = 1.0) -> None:
        self.buffer = buffer
        self.commit_interval_s = commit_interval_s
        # Records and markers in arrival order. A record wakes the thread only when no batch is
        # open (`_open`): the thread knows when an open batch is due, and a wake-up per reading
        # was a fifth of the agent's CPU.
        self._inbox: deque[Record | _Flush | _Cycle | None] = deque()
        self._signal = threading.Event()
        self._open = False
        self._pending: deque[Record] = deque()
        self._thread: threading.Thread | None = None
        self._rl = RateLimitedLog(log, window_s=60.0)
        self.committed = 0
        self.commits = 0
        self.memory_dropped = 0
        self._unannounced = 0
        self._dropped_ts: tuple[int, int] | None = None
        self.last_commit_ok = True
        self._progress = time.monotonic()
        self._idle = False  # blocked on an empty queue with nothing held: waiting, not wedged
        self._opened = 0.0  # when the batch's first record arrived
        self._cycle = False  # the links finished a cycle since the batch opened
        self._cycle_at = 0.0  # when the latest cycle of the batch ended
        self._last_commit = 0.0  # when the last commit was tried (its fsync)
        self._paced_from = 0.0  # the spacing of commits counts from here (see _due)
        self._flushes: list[_Flush] = []
        # health: what went wrong and how often (agent/service/health.py reads these)
        self.failed_commits = 0
        self.errors: dict[str, int] = {sql.FULL: 0, sql.CORRUPT: 0, sql.TRANSIENT: 0}
        self.last_error: str | None = None
        self.retry_s = 0.0
        self._needs_recovery: str | None = None
        self._noted_at: float | None = None

    @property
    def held_in_memory(self) -> int:
        """Records that could not be written and wait in memory for a retry; 0 while writes
        succeed (the batch waiting for its group commit is `batch_waiting`)."""
        return 0 if self.last_commit_ok else len(self._pending) + len(self._inbox)

    @property
    def batch_waiting(self) -> int:
        """Records of the current batch, waiting for the end of the poll cycle (not a problem)."""
        return len(self._pending) + len(self._inbox) if self.last_commit_ok else 0

    @property
    def last_progress(self) -> float:
        """For the watchdog: commits succeed, or nothing waits (an idle writer is not wedged)."""
        return time.monotonic() if self._idle else self._progress

    @property
    def buffer_resets(self) -> int:
        return self.buffer.resets

    def put(self, record: Record) -> None:
        """Thread-safe; called from the event loop for every completed poll and event."""
        self._inbox.append(record)
        if not self._open:
            self._signal.set()

    def _tell(self, marker: _Flush | _Cycle | None) -> None:
        self._inbox.append(marker)
        self._signal.set()

    def cycle_done(self) -> None:
        """Thread-safe: every link finished the polls it had; what they produced may be committed."""
        self._tell(_CYCLE)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="buffer-writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Commit everything queued so far, then end the thread; what cannot be written is
        recorded in the side file, to be announced at the next start."""
        self._tell(None)
        if self._thread is not None:
            self._thread.join(timeout=30)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything put before this call is committed (or cannot be)."""
        request = _Flush()
        self._tell(request)
        return request.done.wait(timeout)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            stopping = self._gather()
            try:
                self._commit()
            except Exception as err:  # the thread must never die: hold, and retry later
                log.exception("device=_site buffer writer: unexpected error")
                self._failed(0, StorageError(str(err)), sql.TRANSIENT, announced=False)
            if self.last_commit_ok or not self._pending:
                self._progress = time.monotonic()
            for request in self._flushes:
                request.done.set()
            self._flushes.clear()
        if self._pending or self._unannounced:
            self._note_held("the agent stopped while the buffer was not writable")

    def _gather(self) -> bool:
        """Collect records until the batch is due (see _due); True on stop."""
        while True:
            self._signal.clear()
            self._open = False  # from here on a record wakes the thread: none is missed below
            got = self._take()
            if got is not None:
                return got == "stop"
            self._open = bool(self._pending)
            due = self._due()
            if due is not None and due <= time.monotonic():
                return False
            self._idle = due is None
            try:
                self._signal.wait(None if due is None else due - time.monotonic())
            finally:
                self._idle = False

    def _take(self) -> str | None:
        """Move everything that arrived into the batch; "stop" or "flush" when asked."""
        got: str | None = None
        while True:
            try:
                item = self._inbox.popleft()
            except IndexError:
                return got
            if item is None:
                got = "stop"
            elif isinstance(item, _Flush):
                self._flushes.append(item)
                got = got or "flush"
            elif isinstance(item, _Cycle):
                self._cycle, self._cycle_at = True, time.monotonic()
            else:
                if not self._pending:
                    self._opened, self._cycle = time.monotonic(), False
                self._pending.append(item)

    def _due(self) -> float | None:
        """When the batch is committed: at the end of the cycle, but not sooner than one
        interval after the last commit; at the latest one interval after its first record.
        Failing: retried, not in a tight loop. None: nothing to commit."""
        if not self._pending:
            return None
        if not self.last_commit_ok:
            return self._last_commit + max(self.commit_interval_s, self.retry_s)
        latest = self._opened + self.commit_interval_s
        if self._cycle:
            # One interval counted from the end of the cycle the last commit carried, not from
            # the commit itself: counted from the commit, a commit that was once late (the first
            # poll at start is off the tick grid) kept every later one late by the same phase,
            # and live data waited almost an interval. Never two commits within half an interval.
            soonest = max(self._paced_from + self.commit_interval_s,
                          self._last_commit + self.commit_interval_s / 2)
            return min(latest, max(soonest, self._opened))
        return latest

    def _commit(self) -> None:
        cycle, self._cycle = self._cycle, False
        if not self._pending:
            return
        self._last_commit = time.monotonic()
        self._paced_from = self._cycle_at if cycle else self._last_commit
        for _ in range(2):  # a damaged file: once more, into the fresh file
            if self._needs_recovery is not None and not self._recover(self._needs_recovery):
                return
            batch = list(self._pending)
            announce = self._announcement()
            try:
                self.buffer.append(([announce] if announce else []) + batch)
            except PartialWrite as err:
                done = len(err.seqs) - (1 if announce else 0)
                self._failed(max(0, done), err, err.kind, announced=announce is not None and len(err.seqs) > 0)
                if err.kind != sql.CORRUPT:
                    return
                self._needs_recovery = str(err)
                continue
            self._succeeded(len(batch), announce is not None)
            return

    def _recover(self, problem: str) -> bool:
        try:
            self.buffer.recover(problem)
        except StorageError as err:
            self._rl.warning("recover", "device=_site cannot replace the damaged buffer: %s", err)
            return False
        self._needs_recovery = None
        return True

    def _succeeded(self, n: int, announced: bool) -> None:
        if announced:
            self._unannounced, self._dropped_ts = 0, None
        if not self.last_commit_ok:
            log.info("device=_site buffer writes succeed again")
            self._rl.reset("commit")
        if self._noted_at is not None:
            self.buffer.note_unbuffered(None)  # what was held is written now
            self._noted_at = None
        self.last_commit_ok = True
        self.retry_s = 0.0
        self.committed += n
        self.commits += 1
        self._pending.clear()

    def _failed(self, done: int, err: StorageError, kind: str, announced: bool) -> None:
        """Part of a batch was not stored: keep the rest in memory, bounded, oldest out first."""
        for _ in range(min(done, len(self._pending))):
            self._pending.popleft()
        self.committed += done
        if announced:
            self._unannounced, self._dropped_ts = 0, None
        self.last_commit_ok = False
        self.failed_commits += 1
        self.errors[kind] = self.errors.get(kind, 0) + 1
        self.last_error = f"{kind}: {err}"
        self.retry_s = RETRY_S if kind != sql.TRANSIENT else min(RETRY_MAX_S, max(RETRY_S, self.retry_s * 2))
        self._rl.warning("commit", "device=_site buffer write failed (%s), %d records held in memory: %s",
                         kind, len(self._pending), err)
        while len(self._pending) > MEMORY_LIMIT:
            lost = self._pending.popleft()
            self.memory_dropped += 1
            self._unannounced += 1
            first = self._dropped_ts[0] if self._dropped_ts else lost.ts_ms
            self._dropped_ts = (first, lost.ts_ms)
        if self._unannounced:
            self._rl.warning("memory", "device=_site buffer not writable for long: %d records discarded from "
                             "memory so far", self.memory_dropped)
        if self._noted_at is None or time.monotonic() - self._noted_at >= NOTE_S:
            self._note_held(f"buffer not writable ({kind}) when the agent last ran")

    def _note_held(self, reason: str) -> None:
        """Sum up what is held (and what was discarded unannounced) in the side file."""
        held = list(self._pending)
        count = len(held) + self._unannounced
        if not count:
            return
        stamps = [r.ts_ms for r in held] + (list(self._dropped_ts) if self._dropped_ts else [])
        devices = sorted({r.device for r in held})
        summary: dict[str, Any] = {"count": count, "first_ts": min(stamps), "last_ts": max(stamps),
                                   "devices": devices[:MAX_DEVICES_NOTED], "reason": reason}
        if self.buffer.note_unbuffered(summary):
            self._noted_at = time.monotonic()

    def _announcement(self) -> Event | None:
        if not self._unannounced or self._dropped_ts is None:
            return None
        return Event("_site", int(time.time() * 1000), "dropped_unbuffered", {
            "count": self._unannounced, "first_ts": self._dropped_ts[0], "last_ts": self._dropped_ts[1],
            "reason": f"buffer not writable; more than {MEMORY_LIMIT} records waited in memory"})
