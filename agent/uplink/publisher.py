"""The MQTT publisher (Contract 2): buffer rows out, PUBACKs back into the buffer as "sent".

It runs paho's network loop on its own thread instead of loop_start(): PUBACK callbacks then run
on the same thread that records mid -> seqs, so an acknowledgement can never race ahead of the
bookkeeping (limits.md §3), and reconnects get the jittered backoff paho lacks. Every connection
uses a fresh paho client: paho's in-memory session dies with the connection instead of being
re-sent behind our back — the buffer is the only queue.

Which rows go out next, and their acknowledgement, is the send window's job
(agent/uplink/window.py); this module owns the MQTT session: connect and back off, status and
will, meta, health, commands, and a clean goodbye.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from agent import __version__
from agent.logutil import RateLimitedLog
from agent.store.buffer import Buffer
from agent.uplink.messages import Message, MessageBuilder, Topics, dumps, meta_payload
from agent.uplink.settings import UplinkConfig
from agent.uplink.tls import TlsSetupError, tls_context
from agent.uplink.window import PublishStats, SendWindow
from drivers.errors import ConfigError, Problem

log = logging.getLogger(__name__)

RECONNECT_BASE_S = 0.5
RECONNECT_CAP_S = 30.0
LOOP_TIMEOUT_S = 0.02
CommandHandler = Callable[[str, bytes], tuple[str, dict[str, Any]] | None]



class Publisher:
    """Owns the paho client and a thread; the buffer is its only source of data."""

    def __init__(self, cfg: UplinkConfig, buffer: Buffer,
                 health: Callable[[], dict[str, Any]] | None = None,
                 commands: CommandHandler | None = None) -> None:
        self.cfg = cfg
        self.buffer = buffer
        self.site = cfg.site_id
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
        self.window = SendWindow(buffer, self._builder, cfg.mqtt.inflight,
                                 cfg.mqtt.batch_max * len(cfg.devices), self.stats)
        self._meta_sent: dict[str, str] = {}
        self._next_health = 0.0
        self._next_meta = 0.0
        self._rl = RateLimitedLog(log)
        try:
            self._tls = tls_context(cfg.mqtt.tls) if cfg.mqtt.tls is not None else None
        except TlsSetupError as err:
            raise ConfigError([Problem(cfg.source, 0, f"mqtt.tls.{err.key}", str(err))]) from err
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

    def _status_payload(self, state: str) -> bytes:
        return dumps({"state": state, "ts": int(time.time() * 1000), "version": __version__})

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self._thread.start()

    def stop(self, grace_s: float = 5.0) -> None:
        """Publish what can be published within grace_s, leave status offline, disconnect."""
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and self._thread is not None and self._thread.is_alive():
            if self._connected and self.window.idle:
                break
            time.sleep(0.05)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, deadline - time.monotonic() + 3.0))

    def retarget(self, cfg: UplinkConfig, health_changed: bool) -> None:
        """A reload with the same broker: new devices (meta goes out again), maybe a new health interval."""
        self.cfg = cfg
        self._meta_sent.clear()
        self._next_meta = 0.0
        if health_changed:
            self._next_health = 0.0

    @property
    def connected(self) -> bool:
        return self._connected

    # -- resend (the center asks for a seq range again) --------------------------------------

    def request_resend(self, first: int, last: int) -> tuple[bool, dict[str, Any]]:
        """Queue seq first..last for publishing again (see SendWindow.request_resend); thread-safe."""
        return self.window.request_resend(first, last)

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
        """A new connection: the window starts over, and meta goes out again."""
        self.window.new_session()
        self._meta_sent.clear()
        self._next_meta = 0.0

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if self._connected:
            log.warning("device=_site disconnected from broker: %s", reason)
        self._connected = False

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        self.window.acked(mid)

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
        self.window.settle()

    def _fill_window(self) -> None:
        self.window.fill(self._send, lambda: self._connected)

    def _builder(self) -> MessageBuilder:
        return MessageBuilder(self.topics, self.site, self.cfg.mqtt.batch_max)

    def _send(self, msg: Message) -> int | None:
        info = self.client.publish(msg.topic, msg.payload, qos=1)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._rl.warning("publish", "device=_site publish failed (rc=%s); will retry after reconnect", info.rc)
            return None
        return info.mid

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
        self._next_health = now + self.cfg.health_interval_s
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
