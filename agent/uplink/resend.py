"""Resend requests from the center (``cmd/resend``): queued jobs, their byte budget, their end.

A job is a seq range still kept in the buffer; its rows are read a window at a time while they
are published (agent/uplink/window.py, resend lane). Resend spends at most
``mqtt.resend_kb_per_min`` (a token bucket: that rate on average, bursts of 10 s worth): a
center that asks for a day of data again must not eat a metered 4G plan, and live data and the
backlog go first anyway. Over budget, resend waits; nothing is dropped.

When every message of a job is acknowledged, or the job is abandoned (the broker refused a
message, the agent stops, or it ran for RESEND_MAX_S), a second reply goes to
``P/S/reply/resend`` with the request's id and ``"done": true`` or ``"abandoned": reason``.
:meth:`ResendQueue.request` is thread-safe; everything else runs on the publisher's thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from agent.store.buffer import Buffer
from agent.store.rows import Row
from drivers.errors import StorageError

log = logging.getLogger(__name__)

RESEND_MAX_SEQS = 100_000
RESEND_MAX_JOBS = 16
RESEND_MAX_S = 6 * 3600.0
BURST_S = 10.0
MAX_SEQ = 2**63 - 1  # SQLite's INTEGER; a larger number is a mistake, not a seq


@dataclass
class ResendJob:
    id: int
    req_id: str | int | None
    first_seq: int
    last_seq: int
    next_seq: int
    started: float = field(default_factory=time.monotonic)
    read_all: bool = False
    outstanding: int = 0  # messages built and not yet acknowledged
    records: int = 0  # records acknowledged
    abandoned: str | None = None


class ResendQueue:
    def __init__(self, buffer: Buffer, kb_per_min: float) -> None:
        self.buffer = buffer
        self.rate = kb_per_min * 1024 / 60.0  # bytes per second
        self.capacity = self.rate * BURST_S
        self._tokens = self.capacity
        self._refilled = time.monotonic()
        self._lock = threading.Lock()
        self._jobs: deque[ResendJob] = deque()  # waiting to be read
        self._active: dict[int, ResendJob] = {}  # read (partly or wholly), not finished
        self._finished: list[ResendJob] = []
        self._ids = 0
        self.delayed_s = 0.0  # time resend waited for its budget (health)

    # -- the request (command worker thread) ------------------------------------------------

    def request(self, first: Any, last: Any, req_id: str | int | None = None) -> tuple[bool, dict[str, Any]]:
        """Queue the rows still kept in first..last (sent or not); returns at once. At most
        RESEND_MAX_SEQS seqs, counted from the first kept. (False, {"error": …}) when refused."""
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (first, last)):
            return False, {"error": "first_seq and last_seq must be integers"}
        if max(first, last) > MAX_SEQ:
            return False, {"error": f"seq {_short(max(first, last))} is too large: seqs are at most {MAX_SEQ}"}
        if first < 1 or last < first:
            return False, {"error": f"invalid seq range {_short(first)}..{_short(last)}: "
                                    "expected 1 <= first_seq <= last_seq"}
        try:
            whole = self.buffer.kept_bounds(first, last)
            if whole is None:
                kept = self.buffer.kept_bounds(1, MAX_SEQ)
                where = f"; kept now: seq {kept[0]}..{kept[1]}" if kept else "; the buffer is empty"
                return False, {"error": f"no records kept in seq {first}..{last}{where}"}
            top = min(last, whole[0] + RESEND_MAX_SEQS - 1)
            bounds = whole if top >= whole[1] else self.buffer.kept_bounds(whole[0], top)
        except StorageError as err:
            return False, {"error": f"buffer not readable: {err}"}
        assert bounds is not None  # whole[0] itself is kept
        with self._lock:
            if len(self._jobs) >= RESEND_MAX_JOBS:
                return False, {"error": f"busy: {len(self._jobs)} resend requests are still queued"}
            self._ids += 1
            self._jobs.append(ResendJob(self._ids, req_id, bounds[0], bounds[1], bounds[0]))
        log.info("device=_site resend of seq %d..%d queued (kept: %d..%d)", first, last, *bounds)
        reply: dict[str, Any] = {"queued_first_seq": bounds[0], "queued_last_seq": bounds[1]}
        if top < whole[1]:
            reply.update(truncated=True, next_first_seq=top + 1, max_seqs=RESEND_MAX_SEQS)
        return True, reply

    # -- reading and budget (publisher thread) ----------------------------------------------

    def next_rows(self, limit: int) -> tuple[ResendJob, list[Row]] | None:
        """The next rows of the oldest job, or None when no job has rows left."""
        while True:
            with self._lock:
                job = self._jobs[0] if self._jobs else None
            if job is None:
                return None
            self._active[job.id] = job
            rows = self.buffer.range(job.next_seq, job.last_seq, limit=limit) if job.abandoned is None else []
            if rows:
                job.next_seq = rows[-1].seq + 1
                return job, rows
            with self._lock:
                self._jobs.popleft()
            job.read_all = True
            self._check(job)

    def allow(self) -> bool:
        """Whether resend may publish now (bytes spent so far are within the budget)."""
        now = time.monotonic()
        elapsed, self._refilled = now - self._refilled, now
        if self._tokens <= 0:
            self.delayed_s += elapsed
        self._tokens = min(self.capacity, self._tokens + elapsed * self.rate)
        return self._tokens > 0

    def spend(self, size: int) -> None:
        self._tokens -= size

    # -- the end of a job -------------------------------------------------------------------

    def built(self, job_id: int, messages: int) -> None:
        self._active[job_id].outstanding += messages

    def settled(self, job_id: int, records: int, refused: str | None = None) -> None:
        """One message of the job acknowledged (records > 0), skipped, or refused by the broker."""
        job = self._active.get(job_id)
        if job is None:
            return
        job.outstanding -= 1
        job.records += records
        if refused is not None and job.abandoned is None:
            job.abandoned = refused
        self._check(job)

    def _check(self, job: ResendJob) -> None:
        if job.abandoned is None and time.monotonic() - job.started > RESEND_MAX_S:
            job.abandoned = f"not finished within {RESEND_MAX_S / 3600:g} h"
        if job.outstanding <= 0 and (job.read_all or job.abandoned is not None):
            self._active.pop(job.id, None)
            with self._lock:
                if job in self._jobs:
                    self._jobs.remove(job)
            self._finished.append(job)
            log.info("device=_site resend of seq %d..%d %s: %d records acknowledged", job.first_seq, job.last_seq,
                     "done" if job.abandoned is None else f"abandoned ({job.abandoned})", job.records)

    def abandon_all(self, reason: str) -> None:
        with self._lock:
            jobs = list(self._jobs) + [j for j in self._active.values() if j not in self._jobs]
            self._jobs.clear()
        for job in jobs:
            job.abandoned = job.abandoned or reason
            job.outstanding = 0
            self._check(job)

    def is_abandoned(self, job_id: int) -> bool:
        job = self._active.get(job_id)
        return job is None or job.abandoned is not None

    def take_finished(self) -> list[dict[str, Any]]:
        """The second replies of finished jobs (those with a request id)."""
        done, self._finished = self._finished, []
        out = []
        for job in done:
            if job.req_id is None:
                continue
            reply: dict[str, Any] = {"v": 1, "id": job.req_id, "command": "resend",
                                     "ok": job.abandoned is None, "ts": int(time.time() * 1000)}
            if job.abandoned is None:
                reply["done"] = True
            else:
                reply.update(abandoned=job.abandoned, error=f"resend abandoned: {job.abandoned}")
            reply["result"] = {"queued_first_seq": job.first_seq, "queued_last_seq": job.last_seq,
                               "records": job.records, "seconds": round(time.monotonic() - job.started, 1)}
            out.append(reply)
        return out

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._jobs) + len([j for j in self._active.values() if j not in self._jobs])


def _short(value: int) -> str:
    """A number for an error message; str() of a huge one is slow, or refused past 4300 digits."""
    return str(value) if abs(value).bit_length() <= 64 else f"(a {abs(value).bit_length()}-bit number)"
