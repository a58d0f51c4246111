"""Commands and resend never hold up live data: in process, real mosquitto, real buffer.

- a slow ``read`` and a slow ``reload`` in flight: live readings still arrive within a fraction
  of a second (the commands run on their own worker, not on the publisher's network thread);
- resend keeps to ``mqtt.resend_kb_per_min``: over budget it is delayed, never dropped, live
  data passes it, and a second reply says ``"done": true``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_site
from agent.store.buffer import Buffer
from agent.uplink.commands import CommandHandler
from agent.uplink.publisher import Publisher
from drivers.model import Reading
from support.broker import Broker
from support.chain import SimDev, seqs_of, write_site
from support.collector import Collector, publish

CollectorFactory = Callable[..., Collector]
SITE = "iso"
SLOW_S = 4.0


class SlowAgent:
    """A CommandTarget whose read and reload take SLOW_S on a real event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.publisher: Any = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()

    def site_id(self) -> str:
        return SITE

    def uptime_s(self) -> int:
        return 1

    def device_points(self) -> dict[str, tuple[str, ...]]:
        return {"inv01": ("ac_power",)}

    def status_snapshot(self, values: bool = True) -> dict[str, Any]:
        return {}

    def process_coro(self) -> Coroutine[Any, Any, dict[str, Any]]:
        return self._slow({"rss_bytes": 1})

    async def _slow(self, result: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(SLOW_S)
        return result

    def reload_coro(self, origin: str) -> Coroutine[Any, Any, dict[str, Any]]:
        return self._slow({"ok": True, "changed": False})

    def read_coro(self, device_id: str, points: list[str] | None,
                  timeout_s: float) -> Coroutine[Any, Any, dict[str, Any]]:
        return self._slow({"ok": True, "values": {"ac_power": 1.0}, "ts": 0})


@pytest.fixture
def slow_agent() -> Iterator[SlowAgent]:
    agent = SlowAgent()
    yield agent
    agent.close()


def _reading(i: int) -> Reading:
    return Reading("inv01", int(time.time() * 1000), {"ac_power": float(i), "pad": "x" * 600}, [])


def _setup(tmp_path: Path, broker: Broker, mqtt: str = "") -> tuple[Path, Buffer]:
    site = write_site(tmp_path / "site.yaml", site_id=SITE, broker_port=broker.port, modbus_port=502,
                      devices=[SimDev("inv01", 1, "huawei-sun2000")], extra_mqtt=mqtt)
    cfg = load_site(site)
    return site, Buffer(cfg.buffer.path, cfg.buffer.max_mb, cfg.buffer.keep_sent_days, 0)


def _live_latencies(buf: Buffer, col: Collector, seconds: float) -> list[float]:
    """Append a reading every 0.2 s; how long each took to reach the subscriber."""
    sent: dict[int, float] = {}
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        (seq,) = buf.append([_reading(i)])
        sent[seq] = time.monotonic()
        i += 1
        time.sleep(0.2)
    col.wait_for(lambda ms: set(sent) <= set(seqs_of(ms)), timeout=10, topic_filter=f"pvgate/{SITE}/data/#")
    arrived: dict[int, float] = {}
    for m in col.messages(f"pvgate/{SITE}/data/#"):
        for r in m.json()["readings"]:
            arrived.setdefault(r["seq"], m.t)
    return [arrived[s] - t for s, t in sent.items()]


def test_slow_read_and_reload_do_not_stop_live_data(tmp_path: Path, broker: Broker, slow_agent: SlowAgent,
                                                    collector_factory: CollectorFactory) -> None:
    site, buf = _setup(tmp_path, broker)
    col = collector_factory([f"pvgate/{SITE}/#"])
    handler = CommandHandler(slow_agent)
    pub = Publisher(load_site(site).uplink(), buf, commands=handler)
    slow_agent.publisher = pub
    pub.start()
    try:
        col.wait_for(lambda ms: any(m.json().get("state") == "online" for m in ms), timeout=10,
                     topic_filter=f"pvgate/{SITE}/status")
        time.sleep(0.3)  # the command subscription
        t0 = time.monotonic()
        publish(broker.host, broker.port, f"pvgate/{SITE}/cmd/read", json.dumps({"id": "r", "device": "inv01"}))
        publish(broker.host, broker.port, f"pvgate/{SITE}/cmd/reload", json.dumps({"id": "l"}))
        latencies = _live_latencies(buf, col, SLOW_S - 0.5)
        replies = col.wait_for(lambda ms: len(ms) >= 2, timeout=3 * SLOW_S, topic_filter=f"pvgate/{SITE}/reply/#")
        took = max(m.t for m in replies) - t0
        assert {m.json()["id"]: m.json()["ok"] for m in replies} == {"r": True, "l": True}
        print(f"live latency during slow commands: max {max(latencies) * 1000:.0f} ms, "
              f"mean {sum(latencies) / len(latencies) * 1000:.0f} ms over {len(latencies)} readings; "
              f"both replies after {took:.1f} s")
        assert took >= 2 * SLOW_S - 0.5, "the commands really were slow (and ran one after the other)"
        assert max(latencies) < 1.0, latencies
    finally:
        pub.stop(grace_s=1)
        buf.close()


def test_resend_over_budget_is_delayed_not_dropped_and_replies_done(tmp_path: Path, broker: Broker,
                                                                     collector_factory: CollectorFactory) -> None:
    """Budget 60 KiB/min (1 KiB/s, bursts of 10 KiB); the range is ~24 KiB of readings, two per message."""
    site, buf = _setup(tmp_path, broker, mqtt="resend_kb_per_min: 60\nbatch_max: 2")
    seqs = buf.append([_reading(i) for i in range(34)])  # after the new buffer's buffer_reset
    col = collector_factory([f"pvgate/{SITE}/#"])
    pub = Publisher(load_site(site).uplink(), buf)
    pub.start()
    try:
        col.wait_for(lambda ms: set(seqs_of(ms)) >= set(seqs), timeout=10,
                     topic_filter=f"pvgate/{SITE}/data/#")
        t0 = time.monotonic()
        ok, _ = pub.request_resend(seqs[0], seqs[-1], "b-1")
        assert ok

        def resent() -> list[int]:
            return seqs_of([m for m in col.messages(f"pvgate/{SITE}/data/#") if m.json().get("resend")])

        time.sleep(3)
        early = len(resent())
        latencies = _live_latencies(buf, col, 2.0)
        col.wait_for(lambda _: set(resent()) >= set(seqs), timeout=40, desc="the whole range resent")
        took = time.monotonic() - t0
        done = col.wait_for(lambda ms: bool(ms), timeout=10, topic_filter=f"pvgate/{SITE}/reply/resend")[0].json()
        print(f"resend of 34 readings (~24 KiB) at 60 KiB/min: {early} after 3 s, all after {took:.1f} s; "
              f"live latency meanwhile max {max(latencies) * 1000:.0f} ms")
        assert 0 < early < 34, "a burst first, then the budget holds the rest back"
        assert took > 8, "about (24 - 10) KiB at 1 KiB/s"
        assert sorted(resent()) == seqs, "nothing dropped, nothing twice"
        assert max(latencies) < 1.0, "live data passes a resend that waits for its budget"
        assert done["id"] == "b-1" and done["ok"] is True and done["done"] is True
        assert done["result"]["records"] == 34
        assert pub.counters()["resend_delayed_s"] > 0
    finally:
        pub.stop(grace_s=1)
        buf.close()
