"""The MQTT publisher (Contract 2): buffer rows out, PUBACKs back into the buffer as "sent".

It runs paho's network loop on its own thread instead of loop_start(): PUBACK callbacks then run
on the same thread that records mid -> seqs, so an acknowledgement can never race ahead of the
bookkeeping (limits.md §3), and reconnects get the jittered backoff paho lacks.

Live data goes first: rows that entered the buffer after the connection came up are published
as soon as they appear, while the backlog drains oldest-first in the room left in the in-flight
window, marked `"replay": true`.
"""

from __future__ import annotations

import json
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from agent import __version__
from agent.buffer import KIND_DATA, Buffer, Row
from agent.config import SiteConfig
from agent.logutil import RateLimitedLog

log = logging.getLogger(__name__)

RECONNECT_BASE_S = 0.5
RECONNECT_CAP_S = 30.0
MAX_PAYLOAD_BYTES = 256 * 1024
CommandHandler = Callable[[str, bytes], tuple[str, dict[str, Any]] | None]


@dataclass
class PublishStats:
    messages: int = 0
    acked_messages: int = 0
    acked_rows: int = 0
    connects: int = 0
    last_ack: float = field(default_factory=time.monotonic)


class Topics:
    def __init__(self, prefix: str, site: str) -> None:
        self.base = f"{prefix}/{site}"

    def status(self) -> str:
        return f"{self.base}/status"

    def meta(self, device: str) -> str:
        return f"{self.base}/meta/{device}"

    def data(self, device: str) -> str:
        return f"{self.base}/data/{device}"

    def events(self, device: str) -> str:
        return f"{self.base}/events/{device}"

    def health(self) -> str:
        return f"{self.base}/health"

    def cmd(self) -> str:
        return f"{self.base}/cmd/+"

    def reply(self, name: str) -> str:
        return f"{self.base}/reply/{name}"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


class Publisher:
    """Owns the paho client and a thread; the buffer is its only source of data."""

    def __init__(self, cfg: SiteConfig, buffer: Buffer,
                 health: Callable[[], dict[str, Any]] | None = None,
                 commands: CommandHandler | None = None) -> None:
        self.cfg = cfg
        self.buffer = buffer
        self.site = cfg.site.id
        self.topics = Topics(cfg.mqtt.topic_prefix, self.site)
        self.health_source = health
        self.commands = commands
        self.stats = PublishStats()
        self.last_progress = time.monotonic()
        self._stop = threading.Event()
        self._draining = False
        self._thread: threading.Thread | None = None
        self._connected = False
        self._attempts = 0
        self._next_attempt = 0.0
        self._inflight: dict[int, list[int]] = {}
        self._acked: list[int] = []
        self._live_cursor = 0
        self._backlog_cursor = 0
        self._backlog_mark = 0
        self._meta_sent: dict[str, str] = {}
        self._next_health = 0.0
        self._next_meta = 0.0
        self._rl = RateLimitedLog(log)
        self.client = self._make_client()

    # -- set-up ------------------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        m = self.cfg.mqtt
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=m.client_id,
                             protocol=mqtt.MQTTv311, clean_session=True)
        client.will_set(self.topics.status(), self._status_payload("offline"), qos=1, retain=True)
        if m.username:
            client.username_pw_set(m.username, m.password)
        if m.tls is not None:
            # keyfile_password given explicitly: an encrypted key without it would prompt on a
            # terminal and hang the service (limits.md §3).
            client.tls_set(ca_certs=m.tls.ca_file, certfile=m.tls.cert_file, keyfile=m.tls.key_file,
                           keyfile_password=m.tls.key_password or "", cert_reqs=ssl.CERT_REQUIRED,
                           tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.max_inflight_messages_set(m.inflight)
        client.max_queued_messages_set(0)
        client.connect_timeout = 5.0
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def _status_payload(self, state: str) -> bytes:
        return _dumps({"state": state, "ts": int(time.time() * 1000), "version": __version__})

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self._thread.start()

    def stop(self, grace_s: float = 5.0) -> None:
        """Publish what can be published within grace_s, leave status offline, disconnect."""
        self._draining = True
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and self._thread is not None and self._thread.is_alive():
            if self._connected and not self._inflight and not self.buffer.unsent(0, limit=1):
                break
            time.sleep(0.05)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, deadline - time.monotonic() + 3.0))

    @property
    def connected(self) -> bool:
        return self._connected

    # -- paho callbacks (run on our own thread, inside client.loop()) ------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._rl.warning("connect", "device=_site broker refused the connection: %s", reason)
            return
        self._connected = True
        self._attempts = 0
        self.stats.connects += 1
        log.info("device=_site connected to %s:%d", self.cfg.mqtt.host, self.cfg.mqtt.port)
        self._rl.reset("connect")
        # Anything in flight on the old connection is published again (duplicates carry
        # the same seq, the center dedupes); what is unsent now is the backlog.
        self._inflight.clear()
        self._acked.clear()
        self._backlog_mark = self.buffer.last_seq()
        self._live_cursor = self._backlog_mark
        self._backlog_cursor = 0
        self._meta_sent.clear()
        self._next_meta = 0.0
        client.publish(self.topics.status(), self._status_payload("online"), qos=1, retain=True)
        if self.commands is not None:
            client.subscribe(self.topics.cmd(), qos=1)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if self._connected:
            log.warning("device=_site disconnected from broker: %s", reason)
        self._connected = False
        self._inflight.clear()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        self._acked.append(mid)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if self.commands is None:
            return
        name = msg.topic.rsplit("/", 1)[-1]
        try:
            answer = self.commands(name, msg.payload)
        except Exception:  # a command must never take the publisher down
            log.exception("device=_site command %s failed", name)
            answer = (name, {"ok": False, "error": "internal error"})
        if answer is not None:
            client.publish(self.topics.reply(answer[0]), _dumps(answer[1]), qos=1)

    # -- the loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self._connected:
                    self._try_connect()
                    continue
                self.client.loop(timeout=0.02)
                self._settle_acks()
                if self._connected:
                    self._publish_meta()
                    self._fill_window()
                    self._maybe_health()
                self.last_progress = time.monotonic()
            except Exception:  # keep the only road to the county center open
                log.exception("device=_site publisher loop error")
                time.sleep(0.5)
        self._shutdown()

    def _try_connect(self) -> None:
        now = time.monotonic()
        self.last_progress = now  # waiting for the broker is not a wedged loop
        if now < self._next_attempt:
            time.sleep(min(0.1, self._next_attempt - now))
            return
        self._attempts += 1
        try:
            if self._attempts == 1 and self.stats.connects == 0:
                self.client.connect(self.cfg.mqtt.host, self.cfg.mqtt.port, self.cfg.mqtt.keepalive)
            else:
                self.client.reconnect()
            deadline = time.monotonic() + 5.0
            while not self._connected and time.monotonic() < deadline and not self._stop.is_set():
                if self.client.loop(timeout=0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
        except (OSError, ssl.SSLError, ValueError) as err:
            self._rl.warning("connect", "device=_site cannot reach broker %s:%d: %s",
                             self.cfg.mqtt.host, self.cfg.mqtt.port, err)
        if not self._connected:
            # Full jitter, capped: hundreds of stations must not hit a restarted broker at once.
            cap = min(RECONNECT_CAP_S, RECONNECT_BASE_S * 2 ** min(self._attempts, 10))
            self._next_attempt = time.monotonic() + random.uniform(RECONNECT_BASE_S, cap)

    def _settle_acks(self) -> None:
        if not self._acked:
            return
        seqs: list[int] = []
        for mid in self._acked:
            seqs.extend(self._inflight.pop(mid, ()))
        self.stats.acked_messages += len(self._acked)
        self._acked.clear()
        if seqs:
            self.buffer.mark_sent(seqs)
            self.stats.acked_rows += len(seqs)
            self.stats.last_ack = time.monotonic()

    def _room(self) -> int:
        return self.cfg.mqtt.inflight - len(self._inflight)

    def _fill_window(self) -> None:
        limit = self.cfg.mqtt.batch_max * 4
        while self._room() > 0 and self._connected:
            rows = self.buffer.unsent(self._live_cursor, limit=limit)
            if rows:
                sent_to = self._publish_rows(rows, replay=False)
                if not sent_to:
                    return
                self._live_cursor = sent_to
                continue
            if self._backlog_cursor >= self._backlog_mark:
                return
            rows = self.buffer.unsent(self._backlog_cursor, self._backlog_mark, limit=limit)
            if not rows:
                self._backlog_cursor = self._backlog_mark
                return
            sent_to = self._publish_rows(rows, replay=True)
            if not sent_to:
                return
            self._backlog_cursor = sent_to

    def _publish_rows(self, rows: list[Row], replay: bool) -> int:
        """Publish rows as messages while the window has room; returns the last seq handed to paho."""
        last = 0
        i = 0
        while i < len(rows) and self._room() > 0:
            row = rows[i]
            if row.kind == KIND_DATA:
                batch = [row]
                size = 0
                while (i + len(batch) < len(rows) and len(batch) < self.cfg.mqtt.batch_max
                       and rows[i + len(batch)].kind == KIND_DATA and rows[i + len(batch)].device == row.device
                       and size < MAX_PAYLOAD_BYTES // 2):
                    nxt = rows[i + len(batch)]
                    size += 64 + len(nxt.body.get("values", {})) * 24
                    batch.append(nxt)
                topic, payload = self.topics.data(row.device), self._data_payload(batch, replay)
            else:
                batch = [row]
                topic, payload = self.topics.events(row.device), self._event_payload(row, replay)
            if not self._send(topic, payload, [r.seq for r in batch]):
                return last
            last = batch[-1].seq
            i += len(batch)
        return last

    def _send(self, topic: str, payload: bytes, seqs: list[int]) -> bool:
        info = self.client.publish(topic, payload, qos=1)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._rl.warning("publish", "device=_site publish failed (rc=%s); will retry after reconnect", info.rc)
            return False
        self._inflight[info.mid] = seqs
        self.stats.messages += 1
        return True

    def _data_payload(self, rows: list[Row], replay: bool) -> bytes:
        msg: dict[str, Any] = {
            "v": 1, "site": self.site, "device": rows[0].device,
            "readings": [{"seq": r.seq, "ts": r.ts, "values": r.body.get("values", {}), "q": r.body.get("q", [])}
                         for r in rows],
        }
        if replay:
            msg["replay"] = True
        return _dumps(msg)

    def _event_payload(self, row: Row, replay: bool) -> bytes:
        msg: dict[str, Any] = {"v": 1, "site": self.site, "device": row.device, "seq": row.seq, "ts": row.ts}
        msg.update(row.body)
        if replay:
            msg["replay"] = True
        return _dumps(msg)

    def _publish_meta(self) -> None:
        now = time.monotonic()
        if now < self._next_meta:
            return
        self._next_meta = now + 1.0  # identities arrive after a device's first poll
        identities = self.buffer.identities()
        for device in self.cfg.devices:
            identity = identities.get(device.id, {})
            payload = _dumps({
                "v": 1, "site": self.site, "device": device.id, "profile": device.profile.id,
                "name": device.profile.name, "unit": device.unit, "link": device.link,
                "interval_s": device.interval_s, "identity": identity,
                "points": [{"key": p.key, "unit": p.unit, "type": p.type.name_,
                            **({"counter": True} if p.counter else {}),
                            **({"enum": {str(k): v for k, v in p.enum}} if p.enum else {}),
                            **({"bits": {str(k): v for k, v in p.bits}} if p.bits else {})}
                           for p in device.profile.points if p.publish],
            })
            key = payload.decode()
            if self._meta_sent.get(device.id) == key:
                continue
            info = self.client.publish(self.topics.meta(device.id), payload, qos=1, retain=True)
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._meta_sent[device.id] = key

    def _maybe_health(self) -> None:
        if self.health_source is None:
            return
        now = time.monotonic()
        if now < self._next_health:
            return
        self._next_health = now + self.cfg.agent.health_interval_s
        self.client.publish(self.topics.health(), _dumps(self.health_source()), qos=1)

    def _shutdown(self) -> None:
        if self._connected:
            info = self.client.publish(self.topics.status(), self._status_payload("offline"), qos=1, retain=True)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and self._connected and not info.is_published():
                self.client.loop(timeout=0.05)
            self._settle_acks()
            self.client.disconnect()
            try:
                self.client.loop(timeout=0.1)
            except Exception:  # the socket may already be gone; nothing left to lose
                pass
        self._connected = False
