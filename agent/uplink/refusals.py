"""What the publisher itself must tell the center: records dropped as too large for the broker,
and messages the broker refused (MQTT 5 PUBACK reason codes).

Both go through the buffer, like the writer's records, so they get a seq and reach the center
in order: the buffer is the only queue. A drop is announced durably (``Buffer.append`` commits
with synchronous=FULL) *before* its rows are marked sent, so there is never a silent gap.
A refusal is not a loss: the rows stay unsent and are offered again later (window.py). A
``publish_refused`` event on ``_site`` (at most one per topic per REFUSED_EVENT_S) tells the
center that a topic is being refused, typically an ACL that misses it.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

from agent.logutil import RateLimitedLog
from agent.store.buffer import Buffer
from agent.uplink.messages import Message
from drivers.errors import StorageError
from drivers.model import Event

log = logging.getLogger(__name__)

REFUSED_EVENT_S = 3600.0
NOT_AUTHORIZED = 0x87

REASONS = {0x80: "unspecified error", 0x83: "implementation specific error", 0x87: "not authorized",
           0x90: "topic name invalid", 0x91: "packet identifier in use", 0x95: "packet too large",
           0x97: "quota exceeded", 0x99: "payload format invalid"}


def reason_text(code: int) -> str:
    return f"0x{code:02X} {REASONS.get(code, 'refused')}"


class Announcer:
    def __init__(self, buffer: Buffer) -> None:
        self.buffer = buffer
        self.refused: Counter[int] = Counter()  # PUBACK failure code -> messages
        self.dropped_records = 0
        self._last_event: dict[str, float] = {}
        self._rl = RateLimitedLog(log, window_s=60.0)

    def drop(self, message: Message, reason: str) -> bool:
        """Give up a record that can never pass: announce it, then mark it sent."""
        seqs = message.seqs
        event = Event("_site", int(time.time() * 1000), "dropped",
                      {"first_seq": min(seqs), "last_seq": max(seqs), "count": len(seqs), "reason": reason})
        try:
            self.buffer.append([event])
            self.buffer.mark_sent(seqs)
        except StorageError as err:
            self._rl.warning("drop", "device=_site cannot announce dropping seq %d..%d, kept unsent: %s",
                             min(seqs), max(seqs), err)
            return False
        self.dropped_records += len(seqs)
        log.error("device=_site dropped seq %d..%d (%s): %s", min(seqs), max(seqs), message.topic, reason)
        return True

    def refusal(self, message: Message, code: int) -> None:
        """The broker answered a PUBACK with a failure code: count, log, maybe announce."""
        self.refused[code] += 1
        seqs = message.seqs
        where = f"seq {min(seqs)}..{max(seqs)}" if seqs else "no records"
        self._rl.warning(f"refused:{code}", "device=_site broker refused a message on %s (%s, %s); "
                         "its records stay unsent and are offered again later", message.topic, reason_text(code), where)
        if code != NOT_AUTHORIZED or not seqs:
            return
        now = time.monotonic()
        if now - self._last_event.get(message.topic, -REFUSED_EVENT_S) < REFUSED_EVENT_S:
            return
        self._last_event[message.topic] = now
        event = Event("_site", int(time.time() * 1000), "publish_refused",
                      {"topic": message.topic, "reason_code": code, "reason": reason_text(code),
                       "first_seq": min(seqs), "last_seq": max(seqs)})
        try:
            self.buffer.append([event])
        except StorageError as err:
            self._rl.warning("refused-event", "device=_site cannot store a publish_refused event: %s", err)

    def view(self) -> dict[str, object]:
        return {"refused": {f"0x{c:02X}": n for c, n in sorted(self.refused.items())},
                "dropped_too_large": self.dropped_records}
