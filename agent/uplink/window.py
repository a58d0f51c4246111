"""The send window: which buffered rows go out next, and which are acknowledged.

Three lanes share the in-flight window (mqtt.inflight messages, paho is happiest at 20-100):
- live: rows that entered the buffer after the connection came up, published as they appear
  and always first;
- resend: seq ranges the center asked for (`request_resend`), `"replay": true, "resend": true`;
- backlog: rows that were unsent when the connection came up, oldest first, `"replay": true`.
Resend and backlog rows are read in windows of many rows and batched per device (many readings
per message, at most mqtt.batch_max readings and MAX_PAYLOAD_BYTES). They leave two slots of the
window to the live lane, and their bytes in flight are capped at what the link carried in the
last TARGET_QUEUE_S: on a slow uplink a live reading waits behind at most that much backlog.

A row leaves "unsent" only when the broker acknowledged the message that carried it
(:meth:`SendWindow.settle`). Everything here runs on the publisher's thread, except
:meth:`SendWindow.request_resend`, which only queues a job under a lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.logutil import RateLimitedLog
from agent.store.buffer import Buffer
from agent.uplink.messages import BACKLOG, LIVE, RESEND, Message, MessageBuilder
from drivers.errors import StorageError

log = logging.getLogger(__name__)

FETCH_ROWS_MIN = 500
FETCH_ROWS_MAX = 20_000
LIVE_RESERVE = 2  # window slots the backlog leaves to live data
TARGET_QUEUE_S = 0.5
MIN_BULK_BYTES = 8 * 1024
MAX_BULK_BYTES = 64 * 1024 * 1024
RESEND_MAX_SEQS = 100_000
RESEND_MAX_JOBS = 16

Send = Callable[[Message], int | None]  # publishes a message; its mid, or None when it could not


@dataclass
class PublishStats:
    messages: int = 0
    acked_messages: int = 0
    acked_rows: int = 0
    replayed_rows: int = 0
    resent_rows: int = 0
    connects: int = 0
    last_ack: float = field(default_factory=time.monotonic)


@dataclass
class _ResendJob:
    next_seq: int
    last_seq: int


class SendWindow:
    """The lanes, the messages in flight and their acknowledgements, for one publisher."""

    def __init__(self, buffer: Buffer, builder: Callable[[], MessageBuilder], inflight: int, fetch_rows: int,
                 stats: PublishStats) -> None:
        self.buffer = buffer
        self.builder = builder
        self.inflight_max = inflight
        self.fetch_rows = max(FETCH_ROWS_MIN, min(FETCH_ROWS_MAX, fetch_rows))
        self.stats = stats
        self._inflight: dict[int, Message] = {}
        self._acked: list[int] = []
        self._unmarked: list[int] = []
        self._lanes: dict[str, deque[Message]] = {LIVE: deque(), RESEND: deque(), BACKLOG: deque()}
        self._live_cursor = 0
        self._backlog_cursor = 0
        self._backlog_mark = 0
        self._bulk_bytes = 0
        self._ack_log: deque[tuple[float, int]] = deque()  # (when, bytes) of acks in the last second
        self._acked_bytes = 0
        self._resend_lock = threading.Lock()
        self._resend_jobs: deque[_ResendJob] = deque()
        self._rl = RateLimitedLog(log)

    @property
    def idle(self) -> bool:
        """Nothing in flight and nothing unsent: a clean stop loses nothing."""
        return not self._inflight and not self.buffer.unsent(0, limit=1)

    def new_session(self) -> None:
        """What was in flight on the old connection is published again (duplicates carry the same
        seq; the center dedupes). Whatever is unsent now is the backlog."""
        resend = [m for m in self._inflight.values() if m.lane == RESEND]
        self._lanes[RESEND].extendleft(reversed(sorted(resend, key=lambda m: m.seqs[0])))
        self._inflight.clear()
        self._acked.clear()
        self._bulk_bytes = 0
        self._lanes[LIVE].clear()
        self._lanes[BACKLOG].clear()
        self._backlog_mark = self.buffer.last_seq()
        self._live_cursor = self._backlog_mark
        self._backlog_cursor = 0

    def acked(self, mid: int) -> None:
        """paho's on_publish: the broker acknowledged message `mid`."""
        self._acked.append(mid)

    # -- acknowledgements --------------------------------------------------------------------

    def settle(self) -> None:
        """Mark the rows of acknowledged messages sent (retried later if the buffer refuses)."""
        if not self._acked and not self._unmarked:
            return
        now = time.monotonic()
        seqs, self._unmarked = self._unmarked, []
        for mid in self._acked:
            msg = self._inflight.pop(mid, None)
            if msg is None:  # status, meta, health, replies
                continue
            seqs.extend(msg.seqs)
            self._count_ack(msg, now)
        self._acked.clear()
        self._forget_old_acks(now)
        if not seqs:
            return
        try:
            self.buffer.mark_sent(seqs)
        except StorageError as err:
            self._unmarked = seqs[-1_000_000:]  # retried; if lost, they are sent again (duplicates)
            self._rl.warning("mark", "device=_site cannot mark %d records sent, will retry: %s", len(seqs), err)
            return
        self.stats.last_ack = now

    def _count_ack(self, msg: Message, now: float) -> None:
        self._ack_log.append((now, len(msg.payload)))
        self._acked_bytes += len(msg.payload)
        if msg.lane != LIVE:
            self._bulk_bytes -= len(msg.payload)
        self.stats.acked_messages += 1
        self.stats.acked_rows += len(msg.seqs)
        if msg.lane == BACKLOG:
            self.stats.replayed_rows += len(msg.seqs)
        elif msg.lane == RESEND:
            self.stats.resent_rows += len(msg.seqs)

    def _forget_old_acks(self, now: float) -> None:
        while self._ack_log and self._ack_log[0][0] < now - 1.0:
            self._acked_bytes -= self._ack_log.popleft()[1]

    # -- filling the window ------------------------------------------------------------------

    def fill(self, send: Send, connected: Callable[[], bool]) -> None:
        """Live rows first (looked up once per loop turn), then resend, then backlog."""
        if not self._lanes[LIVE]:
            rows = self.buffer.unsent(self._live_cursor, limit=self.fetch_rows)
            if rows:
                self._live_cursor = rows[-1].seq
                self._lanes[LIVE].extend(self.builder().build(rows, LIVE))
        while connected() and len(self._inflight) < self.inflight_max:
            lane = LIVE if self._lanes[LIVE] else self._bulk_lane()
            if lane is None:
                return
            msg = self._lanes[lane].popleft()
            mid = send(msg)
            if mid is None:
                self._lanes[lane].appendleft(msg)
                return
            self._inflight[mid] = msg
            if msg.lane != LIVE:
                self._bulk_bytes += len(msg.payload)
            self.stats.messages += 1

    def _bulk_lane(self) -> str | None:
        if not self._bulk_room():
            return None
        if not self._lanes[RESEND]:
            self._refill_resend()
        if self._lanes[RESEND]:
            return RESEND
        if not self._lanes[BACKLOG] and self._backlog_cursor < self._backlog_mark:
            rows = self.buffer.unsent(self._backlog_cursor, self._backlog_mark, limit=self.fetch_rows)
            self._backlog_cursor = rows[-1].seq if rows else self._backlog_mark
            self._lanes[BACKLOG].extend(self.builder().build(rows, BACKLOG))
        return BACKLOG if self._lanes[BACKLOG] else None

    def _bulk_room(self) -> bool:
        """Room for backlog/resend: window slots beyond the live reserve, and bytes in flight
        below what the link carried in the last TARGET_QUEUE_S (at least one message)."""
        inflight = self.inflight_max
        if len(self._inflight) >= inflight - min(LIVE_RESERVE, inflight // 10):
            return False
        if self._bulk_bytes <= 0:
            return True
        self._forget_old_acks(time.monotonic())
        carried = self._acked_bytes * TARGET_QUEUE_S  # acked in the last second, times the target
        return self._bulk_bytes < max(MIN_BULK_BYTES, min(MAX_BULK_BYTES, carried))

    # -- resend (the center asks for a seq range again) --------------------------------------

    def request_resend(self, first: int, last: int) -> tuple[bool, dict[str, Any]]:
        """Queue the rows still kept in first..last (sent or not) for publishing again, marked
        "replay" and "resend". At most RESEND_MAX_SEQS seqs per request; thread-safe, returns
        at once. (False, {"error": …}) for an invalid range or one with nothing kept."""
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (first, last)):
            return False, {"error": "first_seq and last_seq must be integers"}
        if first < 1 or last < first:
            return False, {"error": f"invalid seq range {first}..{last}: expected 1 <= first_seq <= last_seq"}
        try:
            whole = self.buffer.kept_bounds(first, last)
            if whole is None:
                kept = self.buffer.kept_bounds(1, 2**62)
                where = f"; kept now: seq {kept[0]}..{kept[1]}" if kept else "; the buffer is empty"
                return False, {"error": f"no records kept in seq {first}..{last}{where}"}
            top = min(last, whole[0] + RESEND_MAX_SEQS - 1)
            bounds = whole if top >= whole[1] else self.buffer.kept_bounds(whole[0], top)
        except StorageError as err:
            return False, {"error": f"buffer not readable: {err}"}
        assert bounds is not None  # whole[0] itself is kept
        with self._resend_lock:
            if len(self._resend_jobs) >= RESEND_MAX_JOBS:
                return False, {"error": f"busy: {len(self._resend_jobs)} resend requests are still queued"}
            self._resend_jobs.append(_ResendJob(bounds[0], bounds[1]))
        log.info("device=_site resend of seq %d..%d queued (kept: %d..%d)", first, last, *bounds)
        reply: dict[str, Any] = {"queued_first_seq": bounds[0], "queued_last_seq": bounds[1]}
        if top < whole[1]:
            reply.update(truncated=True, next_first_seq=top + 1, max_seqs=RESEND_MAX_SEQS)
        return True, reply

    def _refill_resend(self) -> None:
        while not self._lanes[RESEND]:
            with self._resend_lock:
                job = self._resend_jobs[0] if self._resend_jobs else None
            if job is None:
                return
            rows = self.buffer.range(job.next_seq, job.last_seq, limit=self.fetch_rows)
            if not rows:
                with self._resend_lock:
                    self._resend_jobs.popleft()
                log.info("device=_site resend up to seq %d handed to the broker", job.last_seq)
                continue
            job.next_seq = rows[-1].seq + 1
            self._lanes[RESEND].extend(self.builder().build(rows, RESEND))
