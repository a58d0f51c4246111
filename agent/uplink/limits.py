"""What the broker takes: the size of a message, declared or learned.

Three limits bound every PUBLISH packet (payload, topic and header together):

- ``mqtt.max_message_kb`` from the site file, under MQTT 5 and 3.1.1 alike;
- the Maximum Packet Size the broker declares in CONNACK (MQTT 5 only);
- a learned limit. A broker may refuse a message as too large (PUBACK 0x95), or close the
  connection on it: mosquitto's ``max_packet_size`` does so under 3.1.1, and its
  ``message_size_limit`` answers MQTT 5 with a PUBACK code that paho cannot parse, so paho drops
  the connection as a protocol error. The oldest unacknowledged message of a connection that
  dropped is then the suspect; a suspect larger than anything the broker ever acknowledged,
  again and again (STRIKES times, once for an explicit 0x95/protocol error), halves the limit.

The first two are certain: a single record above them can never pass. The learned one is a
guess, so a single record above it is tried again and dropped only after STRIKES failures.
Everything here runs on the publisher's thread.
"""

from __future__ import annotations

from dataclasses import dataclass

# Fixed header (<= 5), topic length (2), packet id (2), property length (<= 4), and a margin for
# MQTT 5 properties we never send: what a packet adds to its topic and payload.
PACKET_OVERHEAD = 24
STRIKES = 3
EXPLICIT_CODES = (0x82, 0x95)  # DISCONNECT: protocol error (an unparsable 0x95 PUBACK), packet too large
MIN_LEARNED = 1024  # below this not even one reading fits: the cause is not the size
MAX_SUSPECTS = 1000

Key = tuple[object, ...]


@dataclass(frozen=True)
class Sent:
    """A message on the wire awaiting its PUBACK."""

    topic: str
    size: int  # the whole packet
    key: Key  # what identifies the same content when it is built again
    records: int  # seqs it carries (0: status, meta, health, a reply)
    lane: str


def packet_size(topic: str, payload_len: int) -> int:
    return payload_len + len(topic.encode()) + PACKET_OVERHEAD


class SizeGuard:
    def __init__(self, max_message_kb: float) -> None:
        self.configured = int(max_message_kb * 1024)
        self.broker_max: int | None = None
        self.learned: int | None = None
        self.largest_acked = 0
        self.too_large = 0  # messages found too large (split, dropped or skipped)
        self._sent: dict[int, Sent] = {}  # mid -> message, in the order sent
        self._strikes: dict[Key, int] = {}

    def certain_limit(self) -> int:
        """The packet size a message can never pass above."""
        return min(self.configured, self.broker_max or self.configured)

    def packet_limit(self) -> int:
        """The packet size messages are built to."""
        return min(self.certain_limit(), self.learned or self.configured)

    def payload_limit(self, topic_len: int) -> int:
        return max(256, self.packet_limit() - PACKET_OVERHEAD - topic_len)

    def new_connection(self, broker_max: int | None) -> None:
        self.broker_max = broker_max if broker_max and broker_max > 0 else None
        self._sent.clear()

    def sent(self, mid: int, message: Sent) -> None:
        self._sent[mid] = message

    def others_in_flight(self) -> int:
        """Status, meta, health and replies awaiting their PUBACK."""
        return sum(1 for m in self._sent.values() if m.records == 0)

    def acked(self, mid: int, code: int) -> Sent | None:
        """A PUBACK; a success tells how large a message the broker takes."""
        message = self._sent.pop(mid, None)
        if message is not None and code < 0x80:
            self.largest_acked = max(self.largest_acked, message.size)
            self._strikes.pop(message.key, None)
        return message

    def refused_as_too_large(self, size: int) -> None:
        """The broker said so (PUBACK 0x95): build smaller from now on."""
        self.too_large += 1
        if size > self.largest_acked:
            limit = max(self.largest_acked, size // 2, MIN_LEARNED)
            self.learned = min(self.learned or limit, limit)

    def connection_lost(self, code: int | None) -> Sent | None:
        """The connection dropped. Returns the suspect when it has now failed often enough to be
        split (several records) or dropped (one record), after lowering the learned limit."""
        # The largest message in flight: the broker may close before it flushes the PUBACKs of
        # the smaller ones sent before it, so the oldest unacknowledged one is not always it.
        suspect = max(self._sent.values(), key=lambda m: m.size, default=None)
        self._sent.clear()
        if suspect is None or suspect.size <= self.largest_acked or suspect.size <= MIN_LEARNED:
            return None  # the broker took as much before: a network cut, not the size
        if len(self._strikes) > MAX_SUSPECTS:
            self._strikes.clear()
        strikes = self._strikes[suspect.key] = self._strikes.get(suspect.key, 0) + 1
        explicit = code in EXPLICIT_CODES
        if strikes < (1 if explicit and suspect.records != 1 else STRIKES):
            return None
        del self._strikes[suspect.key]
        self.refused_as_too_large(suspect.size)
        return suspect

    def view(self) -> dict[str, int | None]:
        """For the health message."""
        return {"max_message_bytes": self.packet_limit(), "broker_max_packet": self.broker_max,
                "learned_max_packet": self.learned, "too_large": self.too_large}
