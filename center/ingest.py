"""One ingest worker: an MQTT 5 session on a shared subscription, a writer thread that stores
batches in PostgreSQL, and (when it holds the lock) the gap keeper.

Messages are acknowledged (PUBACK) only after the transaction that stored them committed
(paho's manual_ack), and the session outlives the process (clean_start off, session expiry): a
worker killed with -9 loses nothing the broker gave it — unacknowledged messages come again when
it is back, and whatever still goes missing shows as a gap and is asked for again.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from center import gaps, store
from center.config import CenterConfig
from center.schema import migrate

log = logging.getLogger(__name__)

RECEIVE_MAXIMUM = 1000  # messages the broker may have in flight to us, unacknowledged
SHARED = ("data/+", "events/+", "health", "reply/resend")
EVERY_WORKER = ("status", "meta/+", "report/daily")  # retained: shared subscriptions get no retained messages


class Worker:
    def __init__(self, cfg: CenterConfig) -> None:
        self.cfg = cfg
        self.name = cfg.mqtt.client_id
        self._queue: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._stop = threading.Event()
        self.stored = store.Written()
        self.bad = 0
        self.client = self._client()
        self.keeper = gaps.GapKeeper(cfg.gaps, self._publish_command)
        self._threads: list[threading.Thread] = []

    # -- MQTT (paho's network thread) --------------------------------------------------------

    def _client(self) -> mqtt.Client:
        m = self.cfg.mqtt
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=m.client_id, protocol=mqtt.MQTTv5,
                             manual_ack=True)
        if m.username is not None:
            client.username_pw_set(m.username, m.password)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        return client

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.error("broker refused the connection: %s", reason)
            return
        p, g = self.cfg.mqtt.topic_prefix, self.cfg.mqtt.share_group
        opts = SubscribeOptions(qos=1)
        topics = [(f"$share/{g}/{p}/+/{t}", opts) for t in SHARED] + [(f"{p}/+/{t}", opts) for t in EVERY_WORKER]
        client.subscribe(topics)
        log.info("connected to %s:%d as %s (session %s); shared subscription group %s",
                 self.cfg.mqtt.host, self.cfg.mqtt.port, self.name,
                 "resumed" if getattr(flags, "session_present", False) else "new", g)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not self._stop.is_set():
            log.warning("disconnected from the broker (%s); reconnecting", reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._queue.put(message)

    def _publish_command(self, site: str, command: str, request: dict[str, Any]) -> None:
        topic = f"{self.cfg.mqtt.topic_prefix}/{site}/cmd/{command}"
        self.client.publish(topic, json.dumps(request), qos=1)

    # -- lifecycle ---------------------------------------------------------------------------

    def run(self) -> int:
        with psycopg.connect(self.cfg.dsn, autocommit=True) as conn:
            migrate(conn)
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = int(self.cfg.mqtt.session_expiry_s)
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        self.client.connect_async(self.cfg.mqtt.host, self.cfg.mqtt.port, keepalive=self.cfg.mqtt.keepalive_s,
                                  clean_start=False, properties=props)
        self.client.loop_start()
        for target, name in ((self._write_loop, "writer"), (self._gap_loop, "gaps")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("running: worker %s, PostgreSQL and MQTT %s:%d", self.name, self.cfg.mqtt.host, self.cfg.mqtt.port)
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.close()
        return 0

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        self.client.disconnect()
        self.client.loop_stop()
        log.info("stopped: %d readings, %d events, %d reports stored; %d bad messages",
                 self.stored.readings, self.stored.events, self.stored.reports, self.bad)

    # -- writer thread -----------------------------------------------------------------------

    def _write_loop(self) -> None:
        conn: psycopg.Connection[tuple[Any, ...]] | None = None
        pending: list[mqtt.MQTTMessage] = []
        while not (self._stop.is_set() and not pending and self._queue.empty()):
            if not pending:
                pending = self._take()
            if not pending:
                continue
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.cfg.dsn, autocommit=True)
                    store.prepare(conn)
                self._store(conn, pending)
            except psycopg.Error as err:
                log.error("storing %d messages failed, kept unacknowledged and tried again: %s", len(pending), err)
                if conn is not None:
                    conn.close()
                conn = None
                if self._stop.wait(1.0):
                    break
                continue
            for msg in pending:
                self.client.ack(msg.mid, msg.qos)
            pending = []
        if conn is not None:
            conn.close()

    def _take(self) -> list[mqtt.MQTTMessage]:
        try:
            first = self._queue.get(timeout=0.2)
        except queue.Empty:
            return []
        out = [first]
        deadline = time.monotonic() + self.cfg.batch_wait_s
        records = 0
        while records < self.cfg.batch_records:
            try:
                out.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
            records += out[-1].payload.count(b'"seq"')
        return out

    def _store(self, conn: psycopg.Connection[tuple[Any, ...]], msgs: list[mqtt.MQTTMessage]) -> None:
        """One transaction; a batch the database refuses (a value it cannot take) is stored one
        message at a time, and the message it refuses is skipped, logged and counted."""
        try:
            self._store_batch(conn, msgs)
        except (psycopg.errors.DataError, psycopg.errors.IntegrityError) as err:
            if len(msgs) == 1:
                self.bad += 1
                log.warning("skipped a message on %s that PostgreSQL refused: %s", msgs[0].topic, err)
                return
            for msg in msgs:
                self._store(conn, [msg])

    def _store_batch(self, conn: psycopg.Connection[tuple[Any, ...]], msgs: list[mqtt.MQTTMessage]) -> None:
        batch = store.Batch()
        for msg in msgs:
            try:
                batch.add(msg.topic, bytes(msg.payload), self.cfg.mqtt.topic_prefix)
            except store.BadMessage as err:
                self.bad += 1
                log.warning("skipped a message on %s: %s", msg.topic, err)
        for attempt in range(3):
            try:
                with conn.transaction():
                    written = store.write(conn, batch, self.name)
                    for site, reply in batch.replies:
                        gaps.on_reply(conn, site, reply)
                break
            except psycopg.errors.DeadlockDetected:
                if attempt == 2:
                    raise
        self.stored.readings += written.readings
        self.stored.events += written.events
        self.stored.reports += written.reports

    # -- gap keeper thread -------------------------------------------------------------------

    def _gap_loop(self) -> None:
        conn: psycopg.Connection[tuple[Any, ...]] | None = None
        holder = False
        while not self._stop.wait(self.cfg.gaps.check_every_s):
            try:
                if conn is None or conn.closed:
                    conn, holder = psycopg.connect(self.cfg.dsn, autocommit=True), False
                if not holder:
                    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (gaps.LOCK_ID,)).fetchone()
                    holder = bool(row and row[0])
                    if holder:
                        log.info("this worker keeps the gaps now")
                if holder:
                    self.keeper.check(conn)
            except psycopg.Error as err:
                log.error("gap check failed: %s", err)
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()
