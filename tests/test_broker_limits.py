"""Broker limits, in process against a real mosquitto 2.0: the publisher with a real buffer.

What mosquitto 2.0.11 does (checked with paho 2.2, and the reason for each test):
- an ACL that denies a topic answers an MQTT 5 PUBACK with 0x87 (not authorized); over 3.1.1
  it acknowledges and discards, which no client can see;
- ``max_packet_size`` is declared in CONNACK to MQTT 5 clients; a larger packet closes the
  connection (MQTT 5: DISCONNECT 0x95; 3.1.1: just closed);
- ``message_size_limit`` answers MQTT 5 with PUBACK code 0x95, which is not a valid PUBACK code:
  paho drops the connection as a protocol error. Over 3.1.1 it acknowledges and discards.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_site
from agent.store.buffer import Buffer
from agent.uplink.commands import CommandHandler
from agent.uplink.publisher import Publisher
from drivers.model import Reading
from support.broker import Broker
from support.chain import seqs_of, write_site
from support.collector import Collector, Msg

CollectorFactory = Callable[..., Collector]
BrokerFactory = Callable[..., Broker]
SITE = "lim"


def _site(tmp_path: Path, broker: Broker, devices: int = 1, mqtt: str = "") -> Path:
    from support.chain import SimDev

    devs = [SimDev(f"inv{i:02d}", i, "huawei-sun2000") for i in range(1, devices + 1)]
    return write_site(tmp_path / "site.yaml", site_id=SITE, broker_port=broker.port, modbus_port=502,
                      devices=devs, extra_mqtt=mqtt)


def _reading(i: int, device: str = "inv01", pad: int = 600) -> Reading:
    return Reading(device, 1_764_400_000_000 + i * 1000, {"ac_power": i * 1.5, "note": "x" * pad}, [])


def _events(msgs: list[Msg], kind: str) -> list[dict[str, Any]]:
    return [m.json() for m in msgs if m.topic.endswith("/events/_site") and m.json().get("event") == kind]


def _covered(msgs: list[Msg]) -> set[int]:
    """Seqs that arrived, or that a dropped event announced."""
    got = set(seqs_of([m for m in msgs if "/data/" in m.topic or "/events/" in m.topic]))
    for ev in _events(msgs, "dropped"):
        got |= set(range(ev["first_seq"], ev["last_seq"] + 1))
    return got


def _run(cfg_path: Path, rows: list[Reading], col: Collector,
         until: Callable[[list[Msg], list[int]], bool],
         timeout: float = 40.0) -> tuple[Publisher, Buffer, float, list[int]]:
    """Rows appended to a new buffer (their seqs follow its buffer_reset), then published."""
    cfg = load_site(cfg_path)
    buf = Buffer(cfg.buffer.path, cfg.buffer.max_mb, cfg.buffer.keep_sent_days, 0)
    seqs = buf.append(rows)
    pub = Publisher(cfg.uplink(), buf)
    t0 = time.monotonic()
    pub.start()
    try:
        col.wait_for(lambda ms: until(ms, seqs), timeout=timeout, desc="all seqs delivered or announced")
    except BaseException:
        pub.stop(grace_s=0.5)
        buf.close()
        raise
    return pub, buf, time.monotonic() - t0, seqs


def test_acl_refusal_0x87_keeps_rows_unsent_and_is_announced(tmp_path: Path, broker_factory: BrokerFactory,
                                                             collector_factory: CollectorFactory) -> None:
    acl = tmp_path / "acl"
    acl.write_text(f"pattern read #\ntopic write pvgate/{SITE}/status\ntopic write pvgate/{SITE}/meta/#\n"
                   f"topic write pvgate/{SITE}/events/#\ntopic write pvgate/{SITE}/health\n"
                   f"topic write pvgate/{SITE}/data/inv02\n", encoding="utf-8")
    broker = broker_factory(extra_conf=f"acl_file {acl}\n")
    col = collector_factory([f"pvgate/{SITE}/#"], broker=broker)
    rows = [_reading(i, "inv01" if i % 2 else "inv02", 50) for i in range(20)]
    pub, buf, _, seqs = _run(_site(tmp_path, broker, 2), rows, col,
                             lambda ms, _s: bool(_events(ms, "publish_refused")) and len(seqs_of(
                                 [m for m in ms if "/data/inv02" in m.topic])) == 10)
    try:
        refused = _events(col.messages(), "publish_refused")[0]
        assert refused["topic"] == f"pvgate/{SITE}/data/inv01" and refused["reason_code"] == 0x87
        assert "not authorized" in refused["reason"]
        time.sleep(0.5)
        unsent = {r.seq for r in buf.unsent(0, limit=100)}
        assert unsent == {seqs[i] for i in range(20) if i % 2}, "refused rows stay unsent, the others are sent"
        assert pub.counters()["refused"] == {"0x87": pub.window.announcer.refused[0x87]} and pub.connected
        assert pub.stats.connects == 1, "a refusal is not a reason to reconnect"
    finally:
        pub.stop(grace_s=0.5)
        buf.close()


@pytest.mark.parametrize(("conf", "protocol", "max_connects"), [
    ("message_size_limit 8192", "5", 8),  # paho: protocol error on mosquitto's 0x95 PUBACK
    ("max_packet_size 8192", "5", 1),  # declared in CONNACK: never exceeded
    ("max_packet_size 8192", "3.1.1", 13),  # closed connections: 3 strikes per halving
])
def test_oversized_batches_are_split_and_an_unpassable_reading_is_dropped_announced(
        tmp_path: Path, broker_factory: BrokerFactory, collector_factory: CollectorFactory,
        conf: str, protocol: str, max_connects: int) -> None:
    """300 readings of ~700 bytes (a backlog batch of 200 is ~140 KiB) and one of 20 KiB behind
    a broker that takes 8 KiB: every seq arrives or is announced dropped, with few reconnects."""
    broker = broker_factory(extra_conf=conf + "\n")
    col = collector_factory([f"pvgate/{SITE}/#"], broker=broker)
    rows = [_reading(i) for i in range(300)]
    rows[150] = _reading(150, pad=20_000)
    site = _site(tmp_path, broker, mqtt=f"protocol: {protocol}")
    pub, buf, took, seqs = _run(site, rows, col, lambda ms, s: _covered(ms) >= set(s), timeout=50)
    try:
        big = seqs[150]
        drops = _events(col.messages(), "dropped")
        assert [(d["first_seq"], d["last_seq"], d["count"]) for d in drops] == [(big, big, 1)], drops
        assert "too large" in drops[0]["reason"]
        assert big not in seqs_of(col.messages(f"pvgate/{SITE}/data/#")), "never published in part"
        assert pub.stats.connects <= max_connects, f"{pub.stats.connects} connects: a reconnect loop"
        assert pub.guard.packet_limit() <= 8192
        time.sleep(1.0)
        assert buf.stats().unsent == 0
        print(f"{conf} MQTT {protocol}: {took:.1f} s, {pub.stats.connects} connects, "
              f"limit {pub.guard.packet_limit()} B, counters {pub.counters()}")
    finally:
        pub.stop(grace_s=0.5)
        buf.close()


def test_max_message_kb_bounds_every_message_over_3_1_1(tmp_path: Path, broker_factory: BrokerFactory,
                                                        collector_factory: CollectorFactory) -> None:
    """Over 3.1.1 mosquitto's message_size_limit acknowledges and discards: invisible. With
    max_message_kb below it nothing is discarded and nothing reconnects."""
    broker = broker_factory(extra_conf="message_size_limit 8192\n")
    col = collector_factory([f"pvgate/{SITE}/#"], broker=broker)
    rows = [_reading(i) for i in range(300)]
    site = _site(tmp_path, broker, mqtt="protocol: 3.1.1\nmax_message_kb: 7")
    pub, buf, _, _ = _run(site, rows, col, lambda ms, s: _covered(ms) >= set(s))
    try:
        sizes = [len(m.payload) for m in col.messages(f"pvgate/{SITE}/data/#")]
        assert max(sizes) <= 7 * 1024 and pub.stats.connects == 1
        assert "Dropped too large" not in broker.log()
    finally:
        pub.stop(grace_s=0.5)
        buf.close()


def test_huge_integers_are_refused_cleanly(tmp_path: Path, broker: Broker) -> None:
    cfg = load_site(_site(tmp_path, broker))
    buf = Buffer(cfg.buffer.path, cfg.buffer.max_mb, cfg.buffer.keep_sent_days, 0)
    buf.append([_reading(i) for i in range(3)])
    pub = Publisher(cfg.uplink(), buf)

    class Agent:
        loop = None
        publisher = pub

    handler = CommandHandler(Agent())  # type: ignore[arg-type]
    try:
        for body, error in [
            ({"id": 1, "first_seq": 10**30, "last_seq": 10**30 + 1}, "at most 9223372036854775807"),
            ({"id": 2, "first_seq": 1, "last_seq": 2**63}, "at most 9223372036854775807"),
            ({"id": 10**30, "first_seq": 1, "last_seq": 2}, "invalid id"),
        ]:
            _, reply = handler("resend", json.dumps(body).encode())
            assert reply["ok"] is False and error in reply["error"], reply
            json.dumps(reply)
        _, reply = handler("resend", b'{"id": 3, "first_seq": 1, "last_seq": ' + b"9" * 4040 + b"}")
        assert reply["ok"] is False and "at most 9223372036854775807" in reply["error"]
        json.dumps(reply)
        ok, details = pub.request_resend(1, 10**40)
        assert not ok and "too large" in details["error"]
        assert pub.request_resend(1, 2)[0] is True
    finally:
        buf.close()
