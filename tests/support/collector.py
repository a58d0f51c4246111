"""Independent MQTT observers for tests: ``Collector`` (a paho-mqtt 2.x
subscriber recording every message, reconnecting on its own across broker
restarts), ``MosquittoSub`` (the real ``mosquitto_sub`` CLI, a client that is
not ours) and ``publish`` (one-shot paho publish)."""

from __future__ import annotations

import json
import math
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.client import topic_matches_sub
from paho.mqtt.enums import CallbackAPIVersion

from .procs import require_tool

MOSQUITTO_SUB_FALLBACKS = ("/usr/bin/mosquitto_sub", "/usr/local/bin/mosquitto_sub")


@dataclass(frozen=True)
class Msg:
    """One received message; ``t`` is time.monotonic() at receipt."""

    topic: str
    payload: bytes
    retain: bool
    qos: int
    t: float

    def json(self) -> Any:
        """Payload decoded as JSON."""
        return json.loads(self.payload)

    def text(self) -> str:
        """Payload decoded as UTF-8 (invalid bytes replaced)."""
        return self.payload.decode("utf-8", "replace")


class Collector:
    """Subscribes to ``topics`` at QoS 1 and records every message, thread-safely.

    Reconnects by itself (reconnect_delay 0.1..1 s) and resubscribes in
    on_connect, so it survives ``Broker.restart()``. ``suback_count`` counts
    successful (re)subscriptions; use ``wait_subscribed(n)`` after a restart.
    """

    def __init__(self, host: str, port: int, topics: Sequence[str] = ("#",), *,
                 client_id: str | None = None, qos: int = 1, keepalive: int = 10) -> None:
        if isinstance(topics, str):
            topics = [topics]
        self.host = host
        self.port = port
        self.topics: list[str] = list(topics)
        self.qos = qos
        self.keepalive = keepalive
        self.client_id = client_id or f"test-collector-{uuid.uuid4().hex[:8]}"
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._msgs: list[Msg] = []
        self._pending_mid: int | None = None
        self._connected = False
        self.connect_count = 0
        self.disconnect_count = 0
        self.suback_count = 0
        self.last_error: str | None = None
        self._started = False
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                  clean_session=True)
        self.client.reconnect_delay_set(min_delay=0.1, max_delay=1)  # type: ignore[arg-type]
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def __repr__(self) -> str:
        return (f"<Collector {self.client_id} {self.host}:{self.port} topics={self.topics} "
                f"connected={self.connected} msgs={len(self)}>")

    def __len__(self) -> int:
        with self._lock:
            return len(self._msgs)

    def __enter__(self) -> Collector:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- paho callbacks (network thread)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                    properties: Any) -> None:
        if reason_code.is_failure:
            with self._cond:
                self.last_error = f"CONNACK {reason_code}"
            return
        _, mid = client.subscribe([(t, self.qos) for t in self.topics])
        with self._cond:
            self._connected = True
            self.connect_count += 1
            self._pending_mid = mid
            self._cond.notify_all()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any) -> None:
        with self._cond:
            self._connected = False
            self.disconnect_count += 1
            self._cond.notify_all()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any,
                      properties: Any) -> None:
        with self._cond:
            if mid != self._pending_mid:
                return
            failed = [rc for rc in reason_codes if rc.is_failure]
            if failed:
                self.last_error = f"SUBACK refused: {failed} for {self.topics}"
            else:
                self.suback_count += 1
            self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        msg = Msg(topic=message.topic, payload=bytes(message.payload), retain=bool(message.retain),
                  qos=int(message.qos), t=time.monotonic())
        with self._cond:
            self._msgs.append(msg)
            self._cond.notify_all()

    # ---------------------------------------------------------------- lifecycle

    @property
    def connected(self) -> bool:
        """True while the MQTT session is up."""
        with self._lock:
            return self._connected

    def start(self, timeout: float = 10.0) -> Collector:
        """Connect (retrying until the broker is up) and wait for the first SUBACK."""
        if not self._started:
            self.client.connect_async(self.host, self.port, keepalive=self.keepalive)
            self.client.loop_start()
            self._started = True
        self.wait_subscribed(1, timeout)
        return self

    def wait_subscribed(self, count: int = 1, timeout: float = 10.0) -> None:
        """Wait until ``suback_count >= count`` (e.g. count=2 after one broker restart)."""
        with self._cond:
            ok = self._cond.wait_for(lambda: self.suback_count >= count, timeout)
            if not ok:
                raise AssertionError(
                    f"{self.client_id}: {self.suback_count} SUBACKs after {timeout}s, wanted {count} "
                    f"(connected={self._connected}, connects={self.connect_count}, "
                    f"last_error={self.last_error}) on {self.host}:{self.port}")

    def stop(self) -> None:
        """Disconnect and stop the network thread. Safe if the broker is already gone."""
        if not self._started:
            return
        self._started = False
        try:
            self.client.disconnect()
        except Exception:  # noqa: BLE001 - broker may be down; we only want the thread gone
            pass
        self.client.loop_stop()

    # ---------------------------------------------------------------- messages

    def messages(self, topic_filter: str | None = None) -> list[Msg]:
        """Snapshot of received messages, optionally filtered by an MQTT filter (+/# allowed)."""
        with self._lock:
            msgs = list(self._msgs)
        if topic_filter is None:
            return msgs
        return [m for m in msgs if topic_matches_sub(topic_filter, m.topic)]

    def clear(self) -> None:
        """Forget all messages received so far."""
        with self._lock:
            self._msgs.clear()

    def wait_for(self, predicate: Callable[[list[Msg]], bool], timeout: float, poll: float = 0.05, *,
                 topic_filter: str | None = None, desc: str | None = None) -> list[Msg]:
        """Wait until ``predicate(messages(topic_filter))`` is true; return that list.

        On timeout raises AssertionError with counts per topic and the last payloads.
        """
        deadline = time.monotonic() + timeout
        while True:
            msgs = self.messages(topic_filter)
            if predicate(msgs):
                return msgs
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(self.summary(
                    f"wait_for({desc or getattr(predicate, '__name__', 'predicate')}, "
                    f"topic_filter={topic_filter!r}) timed out after {timeout}s"))
            with self._cond:  # wake early on new messages
                self._cond.wait(min(poll, remaining))

    def wait_for_count(self, topic_filter: str, n: int, timeout: float) -> list[Msg]:
        """Wait until at least ``n`` messages matching ``topic_filter`` arrived."""
        return self.wait_for(lambda ms: len(ms) >= n, timeout, topic_filter=topic_filter,
                             desc=f">= {n} messages")

    def summary(self, headline: str = "", last: int = 5) -> str:
        """Human-readable state: connection, counts per topic, last few payloads."""
        msgs = self.messages()
        counts = Counter(m.topic for m in msgs)
        lines = [headline] if headline else []
        lines.append(f"collector {self.client_id} @ {self.host}:{self.port} topics={self.topics} "
                     f"connected={self.connected} connects={self.connect_count} "
                     f"subacks={self.suback_count} last_error={self.last_error}")
        lines.append(f"received {len(msgs)} messages on {len(counts)} topics:")
        for topic, n in sorted(counts.items()):
            lines.append(f"  {n:5d}  {topic}")
        if msgs:
            lines.append(f"last {min(last, len(msgs))} messages:")
            for m in msgs[-last:]:
                payload = m.payload[:300].decode("utf-8", "replace")
                lines.append(f"  {m.topic} retain={m.retain} qos={m.qos}: {payload}")
        return "\n".join(lines)


def publish(host: str, port: int, topic: str, payload: bytes | str, *, qos: int = 1,
            retain: bool = False, timeout: float = 5.0) -> None:
    """Publish one message with a throwaway paho client and wait until it is acked."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2,
                         client_id=f"test-pub-{uuid.uuid4().hex[:8]}")
    client.connect(host, port, keepalive=10)
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise AssertionError(f"publish to {topic} on {host}:{port} not acked within {timeout}s")
    finally:
        client.disconnect()
        client.loop_stop()


class MosquittoSub:
    """Runs the real ``mosquitto_sub`` CLI as an independent client (skips/fails if missing)."""

    @staticmethod
    def binary() -> str:
        """Path of mosquitto_sub; pytest.skip locally / pytest.fail when CI=true if missing."""
        return require_tool("mosquitto_sub", *MOSQUITTO_SUB_FALLBACKS)

    @classmethod
    def collect(cls, host: str, port: int, topics: str | Sequence[str], *, timeout: float = 5.0,
                count: int | None = None, qos: int = 1, verbose: bool = True,
                extra_args: Sequence[str] = ()) -> list[str]:
        """Subscribe for up to ``timeout`` s (``-W``, rounded up to whole seconds) or until
        ``count`` messages (``-C``); return stdout lines (``"topic payload"`` with ``verbose``)."""
        if isinstance(topics, str):
            topics = [topics]
        secs = max(1, math.ceil(timeout))
        cmd = [cls.binary(), "-h", host, "-p", str(port), "-q", str(qos), "-W", str(secs),
               "-i", f"test-msub-{uuid.uuid4().hex[:8]}"]
        for t in topics:
            cmd += ["-t", t]
        if verbose:
            cmd.append("-v")
        if count is not None:
            cmd += ["-C", str(count)]
        cmd += list(extra_args)
        res = cls._run(cmd, secs)
        return res.stdout.decode("utf-8", "replace").splitlines()

    @classmethod
    def retained(cls, host: str, port: int, topic: str, timeout: float = 5.0) -> str | None:
        """The retained payload on ``topic`` as text (via ``--retained-only -C 1``), or None."""
        secs = max(1, math.ceil(timeout))
        cmd = [cls.binary(), "-h", host, "-p", str(port), "-q", "1", "-t", topic,
               "--retained-only", "-C", "1", "-W", str(secs),
               "-i", f"test-msub-{uuid.uuid4().hex[:8]}"]
        res = cls._run(cmd, secs)
        if res.returncode != 0 or not res.stdout:
            return None
        out = res.stdout.decode("utf-8", "replace")
        return out[:-1] if out.endswith("\n") else out

    @staticmethod
    def _run(cmd: list[str], secs: int) -> subprocess.CompletedProcess[bytes]:
        # -W bounds mosquitto_sub itself; the subprocess timeout is a safety net.
        res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=secs + 10)
        # rc 27 = "timed out" (-W expired): a normal outcome, not an error.
        if res.returncode not in (0, 27):
            raise AssertionError(f"{' '.join(cmd)} failed rc={res.returncode}: "
                                 f"{res.stderr.decode('utf-8', 'replace')}")
        return res
