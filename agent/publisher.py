"""The MQTT publisher (Contract 2): buffer rows out, PUBACKs back into the buffer as "sent".

It runs paho's network loop on its own thread instead of loop_start(): PUBACK callbacks then run
on the same thread that records mid -> seqs, so an acknowledgement can never race ahead of the
bookkeeping (limits.md §3), and reconnects get the jittered backoff paho lacks. Every connection
uses a fresh paho client: paho's in-memory session dies with the connection instead of being
re-sent behind our back — the buffer is the only queue.

Three lanes share the in-flight window (mqtt.inflight messages, paho is happiest at 20-100):
- live: rows that entered the buffer after the connection came up, published as they appear
  and always first;
- resend: seq ranges the center asked for (`request_resend`), `"replay": true, "resend": true`;
- backlog: rows that were unsent when the connection came up, oldest first, `"replay": true`.
Resend and backlog rows are read in windows of many rows and batched per device (many readings
per message, at most mqtt.batch_max readings and MAX_PAYLOAD_BYTES). They leave two slots of the
window to the live lane, and their bytes in flight are capped at what the link carried in the
last TARGET_QUEUE_S: on a slow uplink a live reading waits behind at most that much backlog.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from agent import __version__
from agent.buffer import Buffer
from agent.config import SiteConfig
from agent.logutil import RateLimitedLog
from agent.messages import (
    BACKLOG,
    LIVE,
    RESEND,
    Message,
    MessageBuilder,
    Topics,
    dumps,
    meta_payload,
)
from agent.tls import TlsSetupError, tls_context
from drivers.errors import ConfigError, Problem, StorageError

log = logging.getLogger(__name__)

RECONNECT_BASE_S = 0.5
RECONNECT_CAP_S = 30.0
LOOP_TIMEOUT_S = 0.02
FETCH_ROWS_MIN = 500
FETCH_ROWS_MAX = 20_000
LIVE_RESERVE = 2  # window slots the backlog leaves to live data
TARGET_QUEUE_S = 0.5
MIN_BULK_BYTES = 8 * 1024
MAX_BULK_BYTES = 64 * 1024 * 1024
RESEND_MAX_SEQS = 100_000
RESEND_MAX_JOBS = 16
CommandHandler = Callable[[str, bytes], tuple[str, dict[str, Any]] | None]



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
        self._thread: threading.Thread | None = None
        self._connected = False
        self._attempts = 0
        self._next_attempt = 0.0
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
        self._meta_sent: dict[str, str] = {}
        self._next_health = 0.0
        self._next_meta = 0.0
        self._rl = RateLimitedLog(log)
        try:
            self._tls = tls_context(cfg.mqtt.tls) if cfg.mqtt.tls is not None else None
        except TlsSetupError as err:
            raise ConfigError([Problem(cfg.file, 0, f"mqtt.tls.{err.key}", str(err))]) from err
        self.client = self._make_client()
        self._client_used = False

    # -- set-up ------------------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        m = self.cfg.mqtt
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=m.client_id,
                             protocol=mqtt.MQTTv311, clean_session=True)
        client.will_set(self.topics.status(), self._status_payload("offline"), qos=1, retain=True)
        if m.username:
            client.username_pw_set(m.username, m.password)
        if self._tls is not None:
            client.tls_set_context(self._tls)
        # Our window is m.inflight data messages; status, meta, health and replies get a few more.
        client.max_inflight_messages_set(m.inflight + 10)
        client.max_queued_messages_set(0)
        client.connect_timeout = 5.0
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    @property
    def fetch_rows(self) -> int:
        return max(FETCH_ROWS_MIN, min(FETCH_ROWS_MAX, self.cfg.mqtt.batch_max * len(self.cfg.devices)))

    def _status_payload(self, state: str) -> bytes:
        return dumps({"state": state, "ts": int(time.time() * 1000), "version": __version__})

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self._thread.start()

    def stop(self, grace_s: float = 5.0) -> None:
        """Publish what can be published within grace_s, leave status offline, disconnect."""
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
        self._new_session()
        client.publish(self.topics.status(), self._status_payload("online"), qos=1, retain=True)
        if self.commands is not None:
            client.subscribe(self.topics.cmd(), qos=1)

    def _new_session(self) -> None:
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
        self._meta_sent.clear()
        self._next_meta = 0.0

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if self._connected:
            log.warning("device=_site disconnected from broker: %s", reason)
        self._connected = False

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        self._acked.append(mid)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if self.commands is None:
            return
        name = msg.topic.rsplit("/", 1)[-1]
        try:
            answer = self.commands(name, bytes(msg.payload))
        except Exception:  # a command must never take the publisher down
            log.exception("device=_site command %s failed", name)
            answer = (name, {"ok": False, "error": "internal error"})
        if answer is not None:
            client.publish(self.topics.reply(answer[0]), dumps(answer[1]), qos=1)

    # -- the loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self._connected:
                    self._try_connect()
                    continue
                self.client.loop(timeout=LOOP_TIMEOUT_S)
                self._quickack()
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
            if self._client_used:
                self.client = self._make_client()  # a fresh session: nothing stale is re-sent
            self._client_used = True
            self.client.connect(self.cfg.mqtt.host, self.cfg.mqtt.port, self.cfg.mqtt.keepalive)
            deadline = time.monotonic() + 5.0
            while not self._connected and time.monotonic() < deadline and not self._stop.is_set():
                if self.client.loop(timeout=0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
        except ssl.SSLError as err:
            self._rl.warning("connect", "device=_site TLS with broker %s:%d failed: %s",
                             self.cfg.mqtt.host, self.cfg.mqtt.port, err)
        except (OSError, ValueError) as err:
            self._rl.warning("connect", "device=_site cannot reach broker %s:%d: %s",
                             self.cfg.mqtt.host, self.cfg.mqtt.port, err)
        self._settle_acks()
        if not self._connected:
            # Full jitter, capped: hundreds of stations must not hit a restarted broker at once.
            cap = min(RECONNECT_CAP_S, RECONNECT_BASE_S * 2 ** min(self._attempts, 10))
            self._next_attempt = time.monotonic() + random.uniform(RECONNECT_BASE_S, cap)

    def _quickack(self) -> None:
        """Acknowledge TCP segments at once. mosquitto leaves Nagle on (set_tcp_nodelay false),
        so its second PUBACK in a row waits for our TCP ACK, which Linux delays by up to 40 ms:
        every PUBACK that waits is a duplicate if the agent dies meanwhile."""
        sock = self.client.socket()
        if isinstance(sock, socket.socket) and hasattr(socket, "TCP_QUICKACK"):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            except OSError:
                pass

    def _settle_acks(self) -> None:
        if not self._acked and not self._unmarked:
            return
        now = time.monotonic()
        seqs, self._unmarked = self._unmarked, []
        for mid in self._acked:
            msg = self._inflight.pop(mid, None)
            if msg is None:  # status, meta, health, replies
                continue
            seqs.extend(msg.seqs)
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

    def _forget_old_acks(self, now: float) -> None:
        while self._ack_log and self._ack_log[0][0] < now - 1.0:
            self._acked_bytes -= self._ack_log.popleft()[1]

    # -- filling the window ------------------------------------------------------------------

    def _fill_window(self) -> None:
        """Live rows first (looked up once per loop turn), then resend, then backlog."""
        if not self._lanes[LIVE]:
            rows = self.buffer.unsent(self._live_cursor, limit=self.fetch_rows)
            if rows:
                self._live_cursor = rows[-1].seq
                self._lanes[LIVE].extend(self._builder().build(rows, LIVE))
        while self._connected and len(self._inflight) < self.cfg.mqtt.inflight:
            lane = LIVE if self._lanes[LIVE] else self._bulk_lane()
            if lane is None or not self._send(self._lanes[lane].popleft()):
                return

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
            self._lanes[BACKLOG].extend(self._builder().build(rows, BACKLOG))
        return BACKLOG if self._lanes[BACKLOG] else None

    def _builder(self) -> MessageBuilder:
        return MessageBuilder(self.topics, self.site, self.cfg.mqtt.batch_max)

    def _bulk_room(self) -> bool:
        """Room for backlog/resend: window slots beyond the live reserve, and bytes in flight
        below what the link carried in the last TARGET_QUEUE_S (at least one message)."""
        inflight = self.cfg.mqtt.inflight
        if len(self._inflight) >= inflight - min(LIVE_RESERVE, inflight // 10):
            return False
        if self._bulk_bytes <= 0:
            return True
        self._forget_old_acks(time.monotonic())
        carried = self._acked_bytes * TARGET_QUEUE_S  # acked in the last second, times the target
        return self._bulk_bytes < max(MIN_BULK_BYTES, min(MAX_BULK_BYTES, carried))

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
            self._lanes[RESEND].extend(self._builder().build(rows, RESEND))

    def _send(self, msg: Message) -> bool:
        info = self.client.publish(msg.topic, msg.payload, qos=1)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._lanes[msg.lane].appendleft(msg)
            self._rl.warning("publish", "device=_site publish failed (rc=%s); will retry after reconnect", info.rc)
            return False
        self._inflight[info.mid] = msg
        if msg.lane != LIVE:
            self._bulk_bytes += len(msg.payload)
        self.stats.messages += 1
        return True

    # -- meta, health, shutdown --------------------------------------------------------------

    def _publish_meta(self) -> None:
        now = time.monotonic()
        if now < self._next_meta:
            return
        self._next_meta = now + 1.0  # identities arrive after a device's first poll
        identities = self.buffer.identities()
        for device in self.cfg.devices:
            identity = dict(identities.get(device.id, {}))
            signature = f"{device.profile.id}|{json.dumps(identity, sort_keys=True)}"
            if self._meta_sent.get(device.id) == signature:
                continue
            payload = meta_payload(self.site, device, identity)
            info = self.client.publish(self.topics.meta(device.id), payload, qos=1, retain=True)
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._meta_sent[device.id] = signature

    def _maybe_health(self) -> None:
        if self.health_source is None:
            return
        now = time.monotonic()
        if now < self._next_health:
            return
        self._next_health = now + self.cfg.agent.health_interval_s
        self.client.publish(self.topics.health(), dumps(self.health_source()), qos=1)

    def _shutdown(self) -> None:
        if self._connected:
            info = self.client.publish(self.topics.status(), self._status_payload("offline"), qos=1, retain=True)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and self._connected and not info.is_published():
                self.client.loop(timeout=0.05)
            self._settle_acks()
            self._connected = False  # ours: not worth a warning in on_disconnect
            self.client.disconnect()
            try:
                self.client.loop(timeout=0.1)
            except Exception:  # the socket may already be gone; nothing left to lose
                pass
        self._connected = False
