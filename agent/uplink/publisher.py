"""The MQTT publisher (Contract 2): buffer rows out, PUBACKs back into the buffer as "sent".

It runs paho's network loop on its own thread instead of loop_start(): PUBACK callbacks then run
on the same thread that records mid -> seqs, so an acknowledgement can never race ahead of the
bookkeeping (limits.md §3), and reconnects get the jittered backoff paho lacks. Every connection
uses a fresh paho client: paho's in-memory session dies with the connection instead of being
re-sent behind our back — the buffer is the only queue.

Which rows go out next, and their acknowledgement, is the send window's job
(agent/uplink/window.py); this module owns the MQTT session: connect and back off, status and
will, meta, health, commands, and a clean goodbye. MQTT 5 by default: the CONNACK's Maximum
Packet Size and Receive Maximum bound what is sent (limits.py), PUBACK reason codes decide what
is sent. Commands run on their own worker (cmdrunner.py), so PUBACKs never wait for them.
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
from agent.uplink.cmdrunner import CommandRunner
from agent.uplink.limits import Sent, SizeGuard, packet_size
from agent.uplink.messages import Message, MessageBuilder, Topics, dumps, meta_payload
from agent.uplink.settings import UplinkConfig
from agent.uplink.tls import TlsSetupError, tls_context
from agent.uplink.window import SIZE_CODES, PublishStats, SendWindow
from drivers.errors import ConfigError, Problem

log = logging.getLogger(__name__)

RECONNECT_BASE_S = 0.5
RECONNECT_CAP_S = 30.0
LOOP_TIMEOUT_S = 0.02
STABLE_S = 30.0  # a connection that lasted this long resets the reconnect backoff
OTHER_SLOTS = 4  # of the broker's Receive Maximum, left to status, meta, health and replies
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
        self._connected_at = 0.0
        self._short_drops = 0
        self.guard = SizeGuard(cfg.mqtt.max_message_kb)
        self.window = SendWindow(buffer, self._builder, cfg.mqtt.inflight, cfg.mqtt.batch_max * len(cfg.devices),
                                 self.stats, self.guard, cfg.mqtt.resend_kb_per_min)
        self.runner = CommandRunner(commands) if commands is not None else None
        self.receive_maximum: int | None = None
        self._lost: int | None = None  # the reason code of a connection that just dropped
        self._suspect: Sent | None = None
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
        if m.protocol == "5":  # clean start is given at connect; session expiry defaults to 0
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=m.client_id, protocol=mqtt.MQTTv5)
        else:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=m.client_id,
                                 protocol=mqtt.MQTTv311, clean_session=True)
        client.will_set(self.topics.status(), self._status_payload("offline"), qos=1, retain=True)
        if m.username:
            client.username_pw_set(m.username, m.password)
        if self._tls is not None:
            client.tls_set_context(self._tls)
        # Our window is m.inflight data messages; status, meta, health and replies get a few more.
        client.max_inflight_messages_set(self.receive_maximum or m.inflight + 10)
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

    def request_resend(self, first: int, last: int, req_id: str | int | None = None) -> tuple[bool, dict[str, Any]]:
        """Queue seq first..last for publishing again (see agent/uplink/resend.py); thread-safe.
        With req_id, a second reply on reply/resend says when it is done or abandoned."""
        return self.window.request_resend(first, last, req_id)

    # -- paho callbacks (run on our own thread, inside client.loop()) ------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._rl.warning("connect", "device=_site broker refused the connection: %s", reason)
            return
        self._connected = True
        self._attempts = 0
        self._connected_at = time.monotonic()
        self.stats.connects += 1
        self._honour_connack(client, props)
        log.info("device=_site connected to %s:%d (MQTT %s%s)", self.cfg.mqtt.host, self.cfg.mqtt.port,
                 self.cfg.mqtt.protocol, f", maximum packet {self.guard.broker_max} B" if self.guard.broker_max else "")
        self._rl.reset("connect")
        self._new_session()
        client.publish(self.topics.status(), self._status_payload("online"), qos=1, retain=True)
        if self.commands is not None:
            client.subscribe(self.topics.cmd(), qos=1)

    def _honour_connack(self, client: mqtt.Client, props: Any) -> None:
        """MQTT 5: the broker's Maximum Packet Size bounds every message; its Receive Maximum
        bounds QoS 1 messages in flight, the window taking all but a few. paho's own in-flight
        limit can only be set before connecting: the next client gets it (_make_client)."""
        max_packet = getattr(props, "MaximumPacketSize", None)
        receive = getattr(props, "ReceiveMaximum", None)
        self.guard.new_connection(max_packet if isinstance(max_packet, int) else None)
        self.receive_maximum = receive if isinstance(receive, int) and receive > 0 else None
        inflight = self.cfg.mqtt.inflight
        if self.receive_maximum is not None:
            inflight = max(1, min(inflight, self.receive_maximum - OTHER_SLOTS))
        self.window.inflight_max = inflight

    def _new_session(self) -> None:
        """A new connection: the window starts over, and meta goes out again."""
        self.window.new_session(self._suspect)
        self._suspect = None
        self._meta_sent.clear()
        self._next_meta = 0.0

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if self._connected:
            log.warning("device=_site disconnected from broker: %s", reason)
            self._lost = int(getattr(reason, "value", 0x80))
        self._connected = False

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        code = int(getattr(reason, "value", 0))
        sent = self.guard.acked(mid, code)
        self.window.acked(mid, code)
        if code >= 0x80 and sent is not None and sent.records == 0:  # status, meta, health, a reply
            if code in SIZE_CODES:
                self.guard.refused_as_too_large(sent.size)
            self.window.announcer.refusal(Message(sent.topic, b"", [], ""), code)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if self.runner is not None:
            self.runner.submit(msg.topic.rsplit("/", 1)[-1], bytes(msg.payload))

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

    # -- the loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self._connected:
                    if self._lost is not None:  # dropped in loop() or in a publish()
                        self._connection_lost()
                    self._try_connect()
                    continue
                self.client.loop(timeout=LOOP_TIMEOUT_S)
                self._quickack()
                self._settle_acks()
                if self._connected:
                    self._replies()
                    self._publish_meta()
                    self._fill_window()
                    self._maybe_health()
                self.last_progress = time.monotonic()
            except Exception:  # keep the only road to the county center open
                log.exception("device=_site publisher loop error")
                time.sleep(0.5)
        self._shutdown()

    def _connection_lost(self) -> None:
        """The oldest message in flight may be what the broker dropped the connection on (limits.py)."""
        code, self._lost = self._lost, None
        # Back off after a dropped connection too: a broker that drops every connection at once
        # must not see a tight reconnect loop. A connection that lasted resets the backoff.
        # Growing every third drop: learning a size limit takes a few quick ones (limits.py).
        self._short_drops = 0 if time.monotonic() - self._connected_at > STABLE_S else self._short_drops + 1
        cap = min(RECONNECT_CAP_S, RECONNECT_BASE_S * 2 ** min(self._short_drops // 3, 10))
        self._next_attempt = time.monotonic() + random.uniform(RECONNECT_BASE_S / 2, cap / 2)
        suspect = self.guard.connection_lost(code)
        if suspect is not None:
            log.warning("device=_site the broker dropped the connection on a %d-byte message again and again: "
                        "messages are built to at most %d bytes from now on", suspect.size, self.guard.packet_limit())
            self._suspect = suspect

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
            if self.cfg.mqtt.protocol == "5":
                self.client.connect(self.cfg.mqtt.host, self.cfg.mqtt.port, self.cfg.mqtt.keepalive, clean_start=True)
            else:
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
        longest = max([len(self.topics.events("_site")), *(len(self.topics.data(d.id)) for d in self.cfg.devices)])
        return MessageBuilder(self.topics, self.site, self.cfg.mqtt.batch_max, self.guard.payload_limit(longest))

    def _send(self, msg: Message) -> int | None:
        info = self.client.publish(msg.topic, msg.payload, qos=1, retain=msg.retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._rl.warning("publish", "device=_site publish failed (rc=%s); will retry after reconnect", info.rc)
            return None
        self.guard.sent(info.mid, Sent(msg.topic, packet_size(msg.topic, len(msg.payload)),
                                       (msg.seqs[0], len(msg.seqs)), len(msg.seqs), msg.lane))
        return info.mid

    # -- meta, health, shutdown --------------------------------------------------------------

    def _publish_meta(self) -> None:
        now = time.monotonic()
        if now < self._next_meta:
            return
        self._next_meta = now + 1.0  # identities arrive after a device's first poll
        identities = self.buffer.identities()
        for device in self.cfg.devices:
            if self.receive_maximum is not None and self.guard.others_in_flight() >= OTHER_SLOTS:
                self._next_meta = now  # the broker's Receive Maximum: the rest on the next turns
                return
            identity = dict(identities.get(device.id, {}))
            signature = f"{device.profile.id}|{json.dumps(identity, sort_keys=True)}"
            if self._meta_sent.get(device.id) == signature:
                continue
            payload = meta_payload(self.site, device, identity)
            if self._publish_other(self.topics.meta(device.id), payload, retain=True):
                self._meta_sent[device.id] = signature

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

    def _shutdown(self) -> None:
        if self.runner is not None:
            self.runner.stop()
        self.window.resend.abandon_all("the agent is stopping")
        if self._connected:
            self._replies()
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
