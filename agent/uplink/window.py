"""The send window: which buffered rows go out next, and which are acknowledged.

Three lanes share the in-flight window (mqtt.inflight messages, paho is happiest at 20-100):
- live: rows that entered the buffer after the connection came up, published as they appear
  and always first;
- resend: seq ranges the center asked for (`request_resend`), `"replay": true, "resend": true`;
- backlog: rows that were unsent when the connection came up, oldest first, `"replay": true`.
Resend and backlog rows are read in windows of many rows and batched per device (many readings
per message, at most mqtt.batch_max readings and the size the broker takes, limits.py). They
leave two slots of the window to the live lane, and their bytes in flight are capped at what the
link carried in the last TARGET_QUEUE_S: on a slow uplink a live reading waits behind at most
that much backlog. Resend also keeps to its byte budget (resend.py); over it, backlog goes on.

A row leaves "unsent" only when the broker acknowledged the message that carried it with a
success code (:meth:`SendWindow.settle`). A message refused as too large is split and sent
again; a single record that can never pass is dropped, announced (refusals.py). Other refusals
leave the rows unsent: the unsent rows are read again after REFUSED_RETRY_S (doubling). Everything
here runs on the publisher's thread, except :meth:`SendWindow.request_resend`.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from agent.logutil import RateLimitedLog
from agent.store.buffer import Buffer
from agent.store.rows import Row
from agent.uplink.limits import STRIKES, Sent, SizeGuard, packet_size
from agent.uplink.messages import BACKLOG, LIVE, RESEND, Message, MessageBuilder
from agent.uplink.refusals import Announcer, reason_text
from agent.uplink.resend import RESEND_MAX_JOBS, RESEND_MAX_SEQS, ResendQueue
from drivers.errors import StorageError

log = logging.getLogger(__name__)

FETCH_ROWS_MIN = 500
FETCH_ROWS_MAX = 20_000
LIVE_RESERVE = 2  # window slots the backlog leaves to live data
TARGET_QUEUE_S = 0.5
MIN_BULK_BYTES = 8 * 1024
MAX_BULK_BYTES = 64 * 1024 * 1024
REFUSED_RETRY_S = 60.0
REFUSED_RETRY_MAX_S = 1800.0
BUSY_S = 0.05  # while rows wait for room (bytes in flight, the resend budget), looked at this often
MARK_RETRY_S = 1.0
SIZE_CODES = (0x95, 0x83)  # packet too large; implementation specific (mosquitto 1.6: payload too big)
__all__ = ["RESEND_MAX_JOBS", "RESEND_MAX_SEQS", "PublishStats", "SendWindow"]

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


class SendWindow:
    """The lanes, the messages in flight and their acknowledgements, for one publisher."""

    def __init__(self, buffer: Buffer, builder: Callable[[], MessageBuilder], inflight: int, fetch_rows: int,
                 stats: PublishStats, guard: SizeGuard | None = None, resend_kb_per_min: float = 256.0) -> None:
        self.buffer = buffer
        self.builder = builder
        self.inflight_max = inflight
        self.fetch_rows = max(FETCH_ROWS_MIN, min(FETCH_ROWS_MAX, fetch_rows))
        self.stats = stats
        self.guard = guard if guard is not None else SizeGuard(64.0)
        self.resend = ResendQueue(buffer, resend_kb_per_min)
        self.announcer = Announcer(buffer)
        self._inflight: dict[int, Message] = {}
        self._acked: list[tuple[int, int]] = []  # (mid, reason code)
        self._unmarked: list[int] = []
        self._lanes: dict[str, deque[Message]] = {LIVE: deque(), RESEND: deque(), BACKLOG: deque()}
        self._live_cursor = 0
        self._backlog_cursor = 0
        self._backlog_mark = 0
        self._bulk_bytes = 0
        self._ack_log: deque[tuple[float, int]] = deque()  # (when, bytes) of acks in the last second
        self._acked_bytes = 0
        self._rescan_at: float | None = None
        self._rescan_delay = REFUSED_RETRY_S
        self._rescanning = False
        self._rl = RateLimitedLog(log)

    @property
    def idle(self) -> bool:
        """Nothing in flight and nothing unsent: a clean stop loses nothing."""
        return not self._inflight and not self.buffer.unsent(0, limit=1)

    def new_session(self, suspect: Sent | None = None) -> None:
        """What was in flight on the old connection is published again (duplicates carry the same
        seq; the center dedupes). Whatever is unsent now is the backlog. `suspect`: a single
        record the broker dropped the connection on again and again (limits.py): given up."""
        resend = [m for m in self._inflight.values() if m.lane == RESEND]
        self._lanes[RESEND].extendleft(reversed(sorted(resend, key=lambda m: m.seqs[0])))
        self._inflight.clear()
        self._acked.clear()
        self._bulk_bytes = 0
        self._lanes[LIVE].clear()
        self._lanes[BACKLOG].clear()
        if suspect is not None and suspect.records == 1:
            self._give_up_suspect(suspect)
        self._backlog_mark = self.buffer.last_seq()
        self._live_cursor = self._backlog_mark
        self._backlog_cursor = 0
        self._rescan_at, self._rescan_delay, self._rescanning = None, REFUSED_RETRY_S, False

    def _give_up_suspect(self, suspect: Sent) -> None:
        seq = suspect.key[0]
        assert isinstance(seq, int)
        msg = next((m for m in self._lanes[RESEND] if m.seqs == [seq]), None)
        if msg is not None:
            self._lanes[RESEND].remove(msg)
            self.resend.settled(msg.job, 0)
        elif self.buffer.unsent(seq - 1, seq, limit=1):
            self.announcer.drop(Message(suspect.topic, b"", [seq], suspect.lane),
                                f"too large for the broker: the connection dropped {STRIKES} times on its "
                                f"{suspect.size}-byte message; the broker took at most {self.guard.largest_acked} bytes")

    def next_due(self, now: float) -> float | None:
        """When the publisher must look again without being woken (acks and new rows wake it):
        rows that wait for room, a failed mark, a rescan of refused rows; None when idle."""
        due: list[float] = []
        if self._unmarked:
            due.append(now + MARK_RETRY_S)
        if (self._lanes[RESEND] or self._lanes[BACKLOG] or self._backlog_cursor < self._backlog_mark
                or self.resend.pending):
            due.append(now + BUSY_S)
        if self._lanes[LIVE] and len(self._inflight) < self.inflight_max:
            due.append(now + BUSY_S)
        if self._rescan_at is not None:
            due.append(self._rescan_at)
        return min(due) if due else None

    def acked(self, mid: int, code: int = 0) -> None:
        """paho's on_publish: the broker answered message `mid` (an MQTT 5 reason code, or 0)."""
        self._acked.append((mid, code))

    # -- acknowledgements --------------------------------------------------------------------

    def settle(self) -> None:
        """Mark the rows of acknowledged messages sent (retried later if the buffer refuses)."""
        if not self._acked and not self._unmarked:
            return
        now = time.monotonic()
        seqs, self._unmarked = self._unmarked, []
        for mid, code in self._acked:
            msg = self._inflight.pop(mid, None)
            if msg is None:  # status, meta, health, replies
                continue
            if msg.lane != LIVE:
                self._bulk_bytes -= len(msg.payload)
            if code >= 0x80:
                self._failed(msg, code)
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
        self.stats.acked_messages += 1
        self.stats.acked_rows += len(msg.seqs)
        if msg.lane == BACKLOG:
            self.stats.replayed_rows += len(msg.seqs)
        elif msg.lane == RESEND:
            self.stats.resent_rows += len(msg.seqs)
            self.resend.settled(msg.job, len(msg.seqs))

    def _forget_old_acks(self, now: float) -> None:
        while self._ack_log and self._ack_log[0][0] < now - 1.0:
            self._acked_bytes -= self._ack_log.popleft()[1]

    def _failed(self, msg: Message, code: int) -> None:
        """A PUBACK with a failure code: the rows stay unsent."""
        size = packet_size(msg.topic, len(msg.payload))
        if code in SIZE_CODES and size > self.guard.largest_acked:
            self.guard.refused_as_too_large(size)
            if len(msg.seqs) > 1:
                self._lanes[msg.lane].extendleft(reversed(self._halves(msg)))
            else:
                self._give_up(msg, f"too large for the broker ({size} bytes, refused with {reason_text(code)})")
            return
        self.announcer.refusal(msg, code)
        if msg.lane == RESEND:
            self.resend.settled(msg.job, 0, refused=f"the broker refused it ({reason_text(code)})")
        elif self._rescan_at is None:
            self._rescan_at = time.monotonic() + self._rescan_delay

    def _give_up(self, msg: Message, reason: str) -> None:
        """A single record that can never pass: dropped, announced (a resent one was sent before)."""
        if msg.lane == RESEND:
            self.resend.settled(msg.job, 0)
            self._rl.warning("resend-too-large", "device=_site resend skips seq %d: %s", msg.seqs[0], reason)
        else:
            self.announcer.drop(msg, reason)

    # -- filling the window ------------------------------------------------------------------

    def fill(self, send: Send, connected: Callable[[], bool]) -> None:
        """Live rows first (looked up once per loop turn), then resend, then backlog."""
        if not self._lanes[LIVE] and self.buffer.newest_seq > self._live_cursor:
            rows = self.buffer.unsent(self._live_cursor, limit=self.fetch_rows)
            if rows:
                self._live_cursor = rows[-1].seq
                self._lanes[LIVE].extend(self.builder().build(rows, LIVE))
        while connected() and len(self._inflight) < self.inflight_max:
            lane = LIVE if self._lanes[LIVE] else self._bulk_lane()
            if lane is None:
                return
            msg = self._lanes[lane].popleft()
            if not self._sendable(msg):
                continue
            mid = send(msg)
            if mid is None:
                self._lanes[lane].appendleft(msg)
                return
            self._inflight[mid] = msg
            if msg.lane != LIVE:
                self._bulk_bytes += len(msg.payload)
            if msg.lane == RESEND:
                self.resend.spend(len(msg.payload))
            self.stats.messages += 1

    def _sendable(self, msg: Message) -> bool:
        """Whether msg may go as it is; if not, it is split (back in its lane) or given up."""
        if msg.lane == RESEND and self.resend.is_abandoned(msg.job):
            self.resend.settled(msg.job, 0)
            return False
        size = packet_size(msg.topic, len(msg.payload))
        if size <= self.guard.packet_limit():
            return True
        if len(msg.seqs) > 1:
            self._lanes[msg.lane].extendleft(reversed(self._halves(msg)))
            return False
        if size <= self.guard.certain_limit():
            return True  # above the learned limit only: a guess, the broker decides (limits.py)
        self.guard.too_large += 1
        self._give_up(msg, f"too large to publish: {size} bytes, the limit is {self.guard.certain_limit()} "
                           "(mqtt.max_message_kb or the broker's Maximum Packet Size)")
        return False

    def _halves(self, msg: Message) -> list[Message]:
        """msg's rows again, in two halves at least (each built to the current size limit)."""
        wanted = set(msg.seqs)
        rows = [r for r in self.buffer.range(msg.seqs[0], msg.seqs[-1], limit=len(msg.seqs) + 1_000)
                if r.seq in wanted]
        half = len(rows) // 2
        out = self._build(rows[:half], msg.lane) + self._build(rows[half:], msg.lane) if rows else []
        if msg.lane == RESEND:
            out = [replace(m, job=msg.job) for m in out]
            self.resend.built(msg.job, len(out))
            self.resend.settled(msg.job, 0)
        return out

    def _build(self, rows: list[Row], lane: str) -> list[Message]:
        return self.builder().build(rows, lane) if rows else []

    def _bulk_lane(self) -> str | None:
        if not self._bulk_room():
            return None
        if not self._lanes[RESEND]:
            self._refill_resend()
        if self._lanes[RESEND] and self.resend.allow():
            return RESEND
        if not self._lanes[BACKLOG]:
            self._refill_backlog()
        return BACKLOG if self._lanes[BACKLOG] else None

    def _refill_backlog(self) -> None:
        if self._backlog_cursor >= self._backlog_mark:
            self._rescanning = False
            if self._rescan_at is None or time.monotonic() < self._rescan_at:
                return
            # Refused rows are still unsent: read everything unsent again, but what is on its way.
            self._rescan_at, self._rescanning = None, True
            self._rescan_delay = min(REFUSED_RETRY_MAX_S, self._rescan_delay * 2)
            self._backlog_cursor, self._backlog_mark = 0, self._live_cursor
        rows = self.buffer.unsent(self._backlog_cursor, self._backlog_mark, limit=self.fetch_rows)
        self._backlog_cursor = rows[-1].seq if rows else self._backlog_mark
        if self._rescanning:
            busy = {s for m in (*self._inflight.values(), *self._lanes[LIVE]) for s in m.seqs}
            rows = [r for r in rows if r.seq not in busy]
        self._lanes[BACKLOG].extend(self._build(rows, BACKLOG))

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

    def request_resend(self, first: int, last: int, req_id: str | int | None = None) -> tuple[bool, dict[str, Any]]:
        """Queue the rows still kept in first..last (see ResendQueue.request); thread-safe."""
        return self.resend.request(first, last, req_id)

    def _refill_resend(self) -> None:
        got = self.resend.next_rows(self.fetch_rows)
        if got is None:
            return
        job, rows = got
        msgs = [replace(m, job=job.id) for m in self._build(rows, RESEND)]
        self.resend.built(job.id, len(msgs))
        self._lanes[RESEND].extend(msgs)
