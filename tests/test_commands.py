"""Remote commands P/S/cmd/<name> -> P/S/reply/<name> over a real mosquitto, against a running agent
polling the simulator; plus the handler's validation on its own (no broker)."""

from __future__ import annotations

import json
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.uplink.commands import MAX_COMMAND_BYTES, CommandHandler
from agent.uplink.publisher import Publisher
from support.broker import Broker, require_mosquitto
from support.chain import SimDev, readings, seqs_of, start_agent, start_sim, write_site
from support.collector import Collector, Msg, publish
from support.ports import free_port
from support.procs import Proc, ProcRegistry
from support.schemas import validate, validate_all

SITE = "cmd"
INV = SimDev("inv01", 1, "huawei-sun2000")
METER = SimDev("meter", 11, "chint-dtsu666")


@dataclass
class Station:
    broker: Broker
    col: Collector
    agent: Proc
    site: Path

    def ask(self, name: str, payload: Any, timeout: float = 20.0) -> dict[str, Any]:
        """Publish one command and return the reply that follows it on reply/<name>."""
        reply_topic = f"pvgate/{SITE}/reply/{name}"
        before = len(self.col.messages(reply_topic))
        body = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
        publish(self.broker.host, self.broker.port, f"pvgate/{SITE}/cmd/{name}", body)
        msgs = self.col.wait_for(lambda ms: len(ms) > before, timeout, topic_filter=reply_topic,
                                 desc=f"reply to {name}")
        assert not msgs[before].retain
        validate(msgs[before])
        reply: dict[str, Any] = msgs[before].json()
        if reply["ok"]:  # a request the agent took follows its schema (bad ones are sent on purpose)
            validate(Msg(f"pvgate/{SITE}/cmd/{name}", body if isinstance(body, bytes) else body.encode(),
                         False, 1, 0.0))
        return reply


@pytest.fixture(scope="module")
def station(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Station]:
    """One broker, simulator and agent for the whole module (starting them is the slow part)."""
    binary = require_mosquitto()
    root = tmp_path_factory.mktemp("cmd")
    broker = Broker(root / "broker", binary=binary)
    broker.start()
    registry = ProcRegistry(root / "procs")
    col = Collector(broker.host, broker.port, [f"pvgate/{SITE}/#"])
    try:
        port = free_port()
        start_sim(registry.start, port, [INV, METER], speed=60)
        site = write_site(root / "site.yaml", site_id=SITE, broker_port=broker.port, modbus_port=port,
                          devices=[INV], interval="1s")
        col.start()
        agent = start_agent(registry.start, site)
        col.wait_for(lambda ms: len(readings(ms)) >= 2, timeout=20, topic_filter=f"pvgate/{SITE}/data/#")
        yield Station(broker, col, agent, site)
        validate_all(col.messages())  # every message of the module follows docs/schemas/
    finally:
        col.stop()
        registry.cleanup()
        broker.stop()


def test_ping_echoes_the_id(station: Station) -> None:
    reply = station.ask("ping", {"id": "p-1"})
    assert reply["id"] == "p-1" and reply["ok"] is True and reply["command"] == "ping"
    assert reply["result"]["pong"] is True and reply["result"]["version"]
    assert station.ask("ping", {"id": 42})["id"] == 42, "integer ids are echoed as integers"


def test_status_reports_links_devices_values_and_buffer(station: Station) -> None:
    reply = station.ask("status", {"id": "s-1"})
    assert reply["ok"] is True and reply["id"] == "s-1"
    st = reply["result"]
    assert st["site"] == SITE and st["state"] == "running"
    assert st["links"]["lan"]["transactions"] > 0 and st["links"]["lan"]["endpoint"].startswith("127.0.0.1:")
    inv = st["devices"]["inv01"]
    assert inv["state"] == "online" and inv["consecutive_failures"] == 0
    assert inv["values"]["ac_power"] is not None and inv["units"]["ac_power"] == "kW"
    assert st["buffer"]["last_seq"] > 0 and "unsent" in st["buffer"]
    assert st["mqtt"]["connected"] is True
    lean = station.ask("status", {"id": "s-2", "values": False})["result"]
    assert "values" not in lean["devices"]["inv01"]
    proc = st["process"]  # as `pvgate status` shows it, taken on the agent's loop
    assert proc["rss_bytes"] > 5 * 2**20 and proc["fds"] > 5 and proc["threads"] >= 3
    assert isinstance(proc["tasks"], int) and proc["tasks"] > 0


def test_read_polls_one_device_on_demand(station: Station) -> None:
    asked = time.time() * 1000
    reply = station.ask("read", {"id": "r-1", "device": "inv01", "points": ["ac_power", "energy_total"]})
    assert reply["ok"] is True, reply
    res = reply["result"]
    assert set(res["values"]) == {"ac_power", "energy_total"}
    assert res["units"] == {"ac_power": "kW", "energy_total": "kWh"}
    assert res["ts"] >= asked - 50, "a fresh poll, not the last cached values"
    # The on-demand poll is an ordinary reading: buffered and published with its seq.
    station.col.wait_for(lambda ms: any(r["ts"] == res["ts"] for r in readings(ms)), timeout=10,
                         topic_filter=f"pvgate/{SITE}/data/inv01", desc="the on-demand reading published")
    whole = station.ask("read", {"id": "r-2", "device": "inv01"})
    assert whole["ok"] is True and len(whole["result"]["values"]) > 20


def test_read_refuses_unknown_devices_and_points(station: Station) -> None:
    reply = station.ask("read", {"id": "r-3", "device": "nope"})
    assert reply["ok"] is False and "unknown device" in reply["error"] and reply["id"] == "r-3"
    reply = station.ask("read", {"id": "r-4", "device": "inv01", "points": ["ac_power", "flux_capacitor"]})
    assert reply["ok"] is False and "flux_capacitor" in reply["error"]
    assert "ac_power" in reply["points"], "the refusal lists the device's points"
    reply = station.ask("read", {"id": "r-5", "device": "inv01", "points": "ac_power"})
    assert reply["ok"] is False and "points" in reply["error"]


def test_resend_a_seq_range(station: Station) -> None:
    data = f"pvgate/{SITE}/+/+"

    def count(seq: int) -> int:
        msgs = [m for m in station.col.messages(data) if "/data/" in m.topic or "/events/" in m.topic]
        return seqs_of(msgs).count(seq)

    reply = station.ask("resend", {"id": "rs-bad", "first_seq": 5, "last_seq": 2})
    assert reply["ok"] is False and "first_seq" in reply["error"]
    reply = station.ask("resend", {"id": "rs-bad2", "first_seq": "1", "last_seq": 2})
    assert reply["ok"] is False

    before = {s: count(s) for s in (1, 2, 3)}
    assert all(before.values()), "seqs 1..3 were published once already"
    reply = station.ask("resend", {"id": "rs-1", "first_seq": 1, "last_seq": 3})
    assert reply["id"] == "rs-1"
    if not hasattr(Publisher, "request_resend"):
        assert reply["ok"] is False and "not supported" in reply["error"]
        pytest.skip("Publisher.request_resend is not there yet: the command answers with an error")
    assert reply["ok"] is True, reply
    station.col.wait_for(lambda _: all(count(s) > before[s] for s in (1, 2, 3)), timeout=15,
                         desc="seqs 1..3 published again")


@pytest.mark.parametrize(("payload", "error"), [
    (b"{not json", r"malformed request: not JSON"),
    (b"\xff\xfe", r"malformed request: not JSON"),
    (b"[1, 2]", r"expected a JSON object"),
    (b'{"ping": true}', r"missing id"),
    (b'{"id": ""}', r"invalid id"),
    (b'{"id": {"a": 1}}', r"invalid id"),
    (b'{"id": "x", "reboot": true}', r"unknown field\(s\) reboot"),
    (b'{"id": "big", "pad": "' + b"x" * MAX_COMMAND_BYTES + b'"}', r"request too large"),
])
def test_bad_requests_get_an_error_reply(station: Station, payload: bytes, error: str) -> None:
    import re

    reply = station.ask("ping", payload)
    assert reply["ok"] is False and re.search(error, reply["error"]), reply
    assert "result" not in reply


def test_unknown_command_gets_an_error_reply_on_its_own_topic(station: Station) -> None:
    reply = station.ask("write-register", {"id": "w-1", "address": 40000, "value": 0})
    assert reply["ok"] is False and reply["id"] == "w-1"
    assert "unknown command" in reply["error"] and "ping" in reply["error"]


def test_bad_requests_changed_nothing(station: Station) -> None:
    before = station.ask("status", {"id": "s-before", "values": False})["result"]
    for payload in (b"{", b'{"id": 1, "device": "inv01", "points": []}', b'{"id":"x","values":"yes"}'):
        assert station.ask("read", payload)["ok"] is False
        assert station.ask("status", payload)["ok"] is False
    t0 = time.monotonic()
    station.col.wait_for(lambda ms: any(m.t > t0 for m in ms), timeout=10, topic_filter=f"pvgate/{SITE}/data/#",
                         desc="a reading after the bad requests")
    after = station.ask("status", {"id": "s-after", "values": False})["result"]
    assert after["pid"] == before["pid"] and after["reloads"] == before["reloads"]
    assert set(after["devices"]) == set(before["devices"]) == {"inv01"}
    assert after["buffer"]["last_seq"] > before["buffer"]["last_seq"], "polling goes on"
    assert station.agent.running
    assert station.ask("ping", {"id": "still-here"})["ok"] is True


def test_reload_command_applies_a_valid_file_and_rejects_an_invalid_one(station: Station) -> None:
    """Last in the module: it changes the site file."""
    good = station.site.read_text(encoding="utf-8")
    station.site.write_text(good + "  - {id: meter, link: lan, unit: 11, profile: chint-dtsu666, interval: 1s}\n",
                            encoding="utf-8")
    reply = station.ask("reload", {"id": "rl-1"})
    assert reply["ok"] is True, reply
    assert reply["result"]["changed"] is True and reply["result"]["devices_added"] == ["meter"]
    station.col.wait_for(lambda ms: len(readings(ms)) >= 2, timeout=15, topic_filter=f"pvgate/{SITE}/data/meter",
                         desc="the reloaded device's readings")
    assert station.ask("reload", {"id": "rl-2"})["result"]["changed"] is False

    text = station.site.read_text(encoding="utf-8") + "  - {id: ghost, link: lan, unit: 11, profile: chint-dtsu666}\n"
    station.site.write_text(text, encoding="utf-8")
    reply = station.ask("reload", {"id": "rl-3"})
    assert reply["ok"] is False and "running configuration is kept" in reply["error"]
    line = len(text.splitlines())
    assert any(p.startswith(f"{station.site}:{line}:") and "unit 11" in p for p in reply["result"]["problems"]), reply
    st = station.ask("status", {"id": "s-3", "values": False})["result"]
    assert set(st["devices"]) == {"inv01", "meter"}
    assert station.agent.running


# -- the handler alone -------------------------------------------------------------------------


class _FakeAgent:
    """A CommandTarget without an event loop (the agent is starting or stopping)."""

    loop = None
    publisher = object()

    def site_id(self) -> str:
        return "fake"

    def uptime_s(self) -> int:
        return 1

    def device_points(self) -> dict[str, tuple[str, ...]]:
        return {"inv01": ("ac_power",)}

    def status_snapshot(self, values: bool = True) -> dict[str, Any]:
        return {"values": values}

    async def _never(self) -> dict[str, Any]:
        raise AssertionError("must not run")

    def process_coro(self) -> Coroutine[Any, Any, dict[str, Any]]:
        return self._never()

    def reload_coro(self, origin: str) -> Coroutine[Any, Any, dict[str, Any]]:
        return self._never()

    def read_coro(self, device_id: str, points: list[str] | None,
                  timeout_s: float) -> Coroutine[Any, Any, dict[str, Any]]:
        return self._never()


def test_handler_without_a_running_loop_answers_with_an_error() -> None:
    handler = CommandHandler(_FakeAgent())
    name, reply = handler("read", b'{"id": 1, "device": "inv01"}')
    assert name == "read" and reply["ok"] is False and "not running" in reply["error"]
    name, reply = handler("reload", b'{"id": 2}')
    assert reply["ok"] is False and reply["id"] == 2
    name, reply = handler("resend", b'{"id": 3, "first_seq": 1, "last_seq": 2}')
    assert reply["ok"] is False and "not supported" in reply["error"]
    name, reply = handler("status", b'{"id": 4, "values": false}')
    assert reply["ok"] is True and reply["result"] == {"values": False}
    json.dumps(reply)
    assert handler.handled == 1 and handler.refused == 3
