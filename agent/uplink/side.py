"""Status-side messages of the publisher: meta, health, command replies (one message each).

A mixin of :class:`agent.uplink.publisher.Publisher`, run on its thread only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

from agent.logutil import RateLimitedLog
from agent.store.buffer import Buffer
from agent.uplink.cmdrunner import CommandRunner
from agent.uplink.limits import Sent, SizeGuard, packet_size
from agent.uplink.messages import Topics, dumps, meta_payload
from agent.uplink.settings import UplinkConfig
from agent.uplink.window import SendWindow

OTHER_SLOTS = 4  # of the broker's Receive Maximum, left to status, meta, health and replies


class SideMessages:
    cfg: UplinkConfig
    buffer: Buffer
    site: str
    topics: Topics
    guard: SizeGuard
    client: mqtt.Client
    window: SendWindow
    runner: CommandRunner | None
    health_source: Callable[[], dict[str, Any]] | None
    receive_maximum: int | None
    _rl: RateLimitedLog
    _meta_sent: dict[str, str]
    _meta_dirty: bool
    _next_meta: float
    _next_health: float

    def _publish_other(self, topic: str, payload: bytes, retain: bool = False) -> bool:
        """Status, meta, health, replies: one message each, skipped (logged) if the broker cannot take it."""
        size = packet_size(topic, len(payload))
        if size > self.guard.packet_limit():
            self.guard.too_large += 1
            self._rl.warning(f"skip:{topic}", "device=_site not publishing %s: %d bytes, the limit is %d",
                             topic, size, self.guard.packet_limit())
            return False
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return False
        self.guard.sent(info.mid, Sent(topic, size, (topic,), 0, ""))
        return True

    def _replies(self) -> None:
        answers = self.runner.poll() if self.runner is not None else []
        answers += [("resend", reply) for reply in self.window.resend.take_finished()]
        for name, reply in answers:
            payload = dumps(reply)
            if not self._publish_other(self.topics.reply(name), payload):
                error = {k: reply.get(k) for k in ("v", "id", "command", "ts")}
                error.update(ok=False, error=f"reply too large for the broker ({len(payload)} bytes)")
                self._publish_other(self.topics.reply(name), dumps(error))


    def _publish_meta(self) -> None:
        now = time.monotonic()
        if now < self._next_meta:
            return
        if not self._meta_dirty:
            return  # nothing new: a nameplate stored, a new session or a reload sets it
        self._next_meta = now + 1.0  # identities arrive after a device's first poll
        identities = self.buffer.identities()
        for device in self.cfg.devices:
            if self.receive_maximum is not None and self.guard.others_in_flight() >= OTHER_SLOTS:
                self._next_meta = now + 0.05  # the broker's Receive Maximum: the rest after acks
                return
            identity = dict(identities.get(device.id, {}))
            signature = f"{device.profile.id}|{json.dumps(identity, sort_keys=True)}"
            if self._meta_sent.get(device.id) == signature:
                continue
            payload = meta_payload(self.site, device, identity)
            if self._publish_other(self.topics.meta(device.id), payload, retain=True):
                self._meta_sent[device.id] = signature
        self._meta_dirty = False

    def _maybe_health(self) -> None:
        if self.health_source is None:
            return
        now = time.monotonic()
        if now < self._next_health:
            return
        self._next_health = now + self.cfg.health_interval_s
        message = self.health_source()
        mqtt_part = message.get("mqtt")
        if isinstance(mqtt_part, dict):
            mqtt_part.update(self.counters())
        self._publish_other(self.topics.health(), dumps(message))

    def counters(self) -> dict[str, Any]:
        """Size limits, refusals, drops, commands and resend: for the health message."""
        out: dict[str, Any] = {"protocol": self.cfg.mqtt.protocol, "receive_maximum": self.receive_maximum,
                               "inflight_max": self.window.inflight_max}
        out.update(self.guard.view())
        out.update(self.window.announcer.view())
        out.update(resend_pending=self.window.resend.pending, resend_delayed_s=round(self.window.resend.delayed_s))
        if self.runner is not None:
            out.update(commands_timed_out=self.runner.timed_out, commands_busy=self.runner.busy)
        return out

