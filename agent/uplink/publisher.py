"""The MQTT publisher (Contract 2): buffer rows out, PUBACKs back into the buffer as "sent".

It drives paho's socket on its own thread instead of loop_start(): PUBACK callbacks then run
on the same thread that records mid -> seqs, so an acknowledgement can never race ahead of the
bookkeeping (limits.md §3), and reconnects get the jittered backoff paho lacks. The thread
sleeps until the broker's socket is ready, another thread wakes it (the buffer writer's commit,
a command's reply, a resend request) or a deadline comes (pump.py): an idle agent does not poll. Every connection
uses a fresh paho client: paho's in-memory session dies with the connection instead of being
re-sent behind our back — the buffer is the only queue.

Which rows go out next, and their acknowledgement, is the send window's job
(agent/uplink/window.py); this module owns the MQTT session: connect and back off, status and
will, meta, health, commands, and a clean goodbye. MQTT 5 by default: the CONNACK's Maximum
Packet Size and Receive Maximum bound what is sent (limits.py), PUBACK reason codes decide what
is sent. Commands run on their own worker (cmdrunner.py), so PUBACKs never wait for them.
"""

from __future__ import annotations

import logging
import random
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
from agent.uplink.messages import Message, MessageBuilder, Topics, dumps
from agent.uplink.pump import Pump, keepalive_due
from agent.uplink.settings import UplinkConfig
from agent.uplink.side import OTHER_SLOTS, SideMessages
from agent.uplink.tls import TlsSetupError, tls_context
from agent.uplink.window import SIZE_CODES, PublishStats, SendWindow
from drivers.errors import ConfigError, Problem

log = logging.getLogger(__name__)

RECONNECT_BASE_S = 0.5
RECONNECT_CAP_S = 30.0
RUNNER_CHECK_S = 1.0  # while a command runs, its time limit is checked this often
STABLE_S = 30.0  # a connection that lasted this long resets the reconnect backoff
CommandHandler = Callable[[str, bytes], tuple[str, dict[str, Any]] | None]


class Publisher(SideMessages):
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
        self.pump = Pump()
        self._progress = time.monotonic()
        self._meta_dirty = True
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
        if self.runner is not None:
            self.runner.notify = self.pump.wake
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
        self.buffer.add_listener(self._buffer_changed)
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Thread-safe: something for the publisher thread to do now."""
        self.pump.wake()

    def _buffer_changed(self, what: str) -> None:
        """The buffer writer's commit (or a nameplate stored): live rows, maybe new meta."""
        if what == "identity":
            self._meta_dirty = True
        self.pump.wake()

    @property
    def last_progress(self) -> float:
        """For the watchdog: a thread asleep in select() is waiting for work, not wedged."""
        return time.monotonic() if self.pump.waiting else self._progress

    def stop(self, grace_s: float = 5.0) -> None:
        """Publish what can be published within grace_s, leave status offline, disconnect."""
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and self._thread is not None and self._thread.is_alive():
            if self._connected and self.window.idle:
                break
            time.sleep(0.05)
        self._stop.set()
        self.pump.wake()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, deadline - time.monotonic() + 3.0))
        self.buffer.remove_listener(self._buffer_changed)

    def retarget(self, cfg: UplinkConfig, health_changed: bool) -> None:
        """A reload with the same broker: new devices (meta goes out again), maybe a new health interval."""
        self.cfg = cfg
        self._meta_sent.clear()
        self._next_meta = 0.0
        self._meta_dirty = True
        if health_changed:
            self._next_health = 0.0
        self.pump.wake()

    @property
    def connected(self) -> bool:
        return self._connected

    # -- resend (the center asks for a seq range again) --------------------------------------

    def request_resend(self, first: int, last: int, req_id: str | int | None = None) -> tuple[bool, dict[str, Any]]:
        """Queue seq first..last for publishing again (see agent/uplink/resend.py); thread-safe.
        With req_id, a second reply on reply/resend says when it is done or abandoned."""
        answer = self.window.request_resend(first, last, req_id)
        self.pump.wake()
        return answer

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
        self._meta_dirty = True

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

    # -- the loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self._connected:
                    if self._lost is not None:  # dropped in loop() or in a publish()
                        self._connection_lost()
                    self._try_connect()
                    continue
                self.pump.run(self.client, self._wait_s())
                self._turn()
            except Exception:  # keep the only road to the county center open
                log.exception("device=_site publisher loop error")
                time.sleep(0.5)
        self._shutdown()
        self.pump.close()

    def _turn(self) -> None:
        """Everything that may have become possible: acks settled, replies, meta, data, health."""
        self._settle_acks()
        if self._connected:
            self._replies()
            self._publish_meta()
            self._fill_window()
            self._maybe_health()
        self._progress = time.monotonic()

    def _wait_s(self) -> float:
        """How long the thread may sleep if nothing wakes it: until the earliest deadline."""
        now = time.monotonic()
        due = [keepalive_due(self.client, self.cfg.mqtt.keepalive, now)]
        if self.health_source is not None:
            due.append(self._next_health)
        if self._meta_dirty:
            due.append(self._next_meta)
        window = self.window.next_due(now)
        if window is not None:
            due.append(window)
        if self.runner is not None and self.runner.working:
            due.append(now + RUNNER_CHECK_S)
        return max(0.0, min(due) - now)

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
        self._progress = now  # waiting for the broker is not a wedged loop
        if now < self._next_attempt:
            self.pump.run(None, self._next_attempt - now)  # stop() wakes it
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
                if self.client.socket() is None:
                    break
                self.pump.run(self.client, min(0.25, max(0.0, deadline - time.monotonic())))
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

    def _shutdown(self) -> None:
        if self.runner is not None:
            self.runner.stop()
        self.window.resend.abandon_all("the agent is stopping")
        if self._connected:
            self._replies()
            info = self.client.publish(self.topics.status(), self._status_payload("offline"), qos=1, retain=True)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and self._connected and not info.is_published():
                self.pump.run(self.client, 0.05)
            self._settle_acks()
            self._connected = False  # ours: not worth a warning in on_disconnect
            self.client.disconnect()
            try:
                self.pump.run(self.client, 0.1)
            except Exception:  # the socket may already be gone; nothing left to lose
                pass
        self._connected = False
