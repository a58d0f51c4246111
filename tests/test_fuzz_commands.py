"""Hostile remote commands: malformed JSON, wrong types, huge payloads and unknown names each get
exactly one error reply (fuzzed with hypothesis, derandomized); a flood of a thousand a second is
counted and dropped with its error replies rate-limited, while polling goes on undisturbed."""

from __future__ import annotations

import json
import time
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_commands import _FakeAgent

from agent.uplink.cmdrunner import CommandRunner, TokenBucket
from agent.uplink.commands import COMMANDS, MAX_COMMAND_BYTES, CommandHandler

FUZZ = settings(max_examples=300, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2 ** 80), max_value=2 ** 80) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(["id", "v", "values", "device", "points", "first_seq", "last_seq", "x", ""])
requests = st.dictionaries(field_names, json_values, max_size=5)
names = st.sampled_from([*COMMANDS, "nope", "", "x" * 300, "状态", "status/../reload"]) | st.text(max_size=30)
payloads = st.one_of(
    requests.map(lambda r: json.dumps(r).encode()),
    st.binary(max_size=200),
    st.text(max_size=100).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"", b"{", b"null", b"[]", b'"id"', b"{\"id\": 1", b"\xff\xfe", b"{\"id\": NaN}",
                     b'{"id": 1e999}', b'{"id": ' + b"9" * 5000 + b"}", b"[" * 100000,
                     b'{"id": 1, "pad": "' + b"a" * (MAX_COMMAND_BYTES * 4) + b'"}']),
)


def _valid_reply(name: str, reply: Any) -> dict[str, Any]:
    assert isinstance(reply, dict)
    json.dumps(reply, ensure_ascii=False, allow_nan=True)
    assert reply["command"] == name and isinstance(reply["ok"], bool)
    if not reply["ok"]:
        assert isinstance(reply["error"], str) and reply["error"]
        assert len(reply["error"]) < 2000
    return reply


@FUZZ
@given(name=names, payload=payloads)
def test_every_request_gets_one_reply(name: str, payload: bytes) -> None:
    handler = CommandHandler(_FakeAgent())
    start = time.monotonic()
    got_name, reply = handler(name, payload)
    assert time.monotonic() - start < 1.0
    assert got_name == name
    _valid_reply(name, reply)
    assert handler.handled + handler.refused == 1


@FUZZ
@given(request=requests, name=st.sampled_from(COMMANDS))
def test_wrong_types_are_refused_not_crashed(request: dict[str, Any], name: str) -> None:
    handler = CommandHandler(_FakeAgent())
    _, reply = handler(name, json.dumps(request).encode())
    _valid_reply(name, reply)
    if "id" not in request:
        assert reply["ok"] is False and "missing id" in reply["error"]


def test_known_error_replies() -> None:
    handler = CommandHandler(_FakeAgent())
    cases = {
        ("ping", b"{not json"): "malformed request: not JSON",
        ("ping", b"[1]"): "malformed request: expected a JSON object",
        ("ping", b'{"id": true}'): "invalid id",
        ("status", b'{"id": 1, "values": "yes"}'): "values: expected true or false",
        ("read", b'{"id": 1, "device": 7}'): "device: required",
        ("resend", b'{"id": 1, "first_seq": "1", "last_seq": 2}'): "integers",
        ("bogus", b'{"id": 1}'): "unknown command 'bogus'",
        ("ping", b'{"id": 1, "pad": "' + b"a" * 5000 + b'"}'): "request too large",
    }
    for (name, payload), fragment in cases.items():
        _, reply = handler(name, payload)
        assert reply["ok"] is False and fragment in reply["error"], (name, payload[:40], reply)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket() -> None:
    clock = _Clock()
    bucket = TokenBucket(10.0, 3, clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    clock.now += 0.1
    assert bucket.take() and not bucket.take()


def test_a_flood_of_a_thousand_a_second_is_counted_and_dropped() -> None:
    ran: list[str] = []

    def handler(name: str, payload: bytes) -> tuple[str, dict[str, Any]]:
        ran.append(name)
        return name, {"v": 1, "id": 1, "command": name, "ok": True}

    runner = CommandRunner(handler, rate=10.0, burst=30, error_rate=1.0)
    replies = []
    start = time.monotonic()
    try:
        for i in range(2000):  # two seconds of a thousand a second
            runner.submit("ping", json.dumps({"id": i}).encode())
            if i % 100 == 0:
                replies += runner.poll()
            time.sleep(max(0.0, start + (i + 1) / 1000 - time.monotonic()))
        deadline = time.monotonic() + 5
        while len(ran) < 2000 - runner.dropped and time.monotonic() < deadline:
            time.sleep(0.05)
        replies += runner.poll()
    finally:
        runner.stop()
    elapsed = time.monotonic() - start
    served = 2000 - runner.dropped
    assert served <= 30 + 10 * elapsed + 1, (served, elapsed)
    assert runner.dropped >= 2000 - served and runner.dropped > 1900
    errors = [r for _, r in replies if not r["ok"]]
    assert 1 <= len(errors) <= 1 + elapsed * 1.0 + 1, len(errors)  # rate-limited, not one per request
    assert "rate limited" in errors[0]["error"]
    assert len([r for _, r in replies if r["ok"]]) == served == len(ran)


def test_flood_over_mqtt_leaves_polling_alone(tmp_path: Any) -> None:
    """A real broker, simulator and agent polling every second; three seconds of a thousand
    commands a second: readings keep their pace, replies stay few, the drops are counted."""
    import paho.mqtt.client as mqtt

    from support.broker import Broker, require_mosquitto
    from support.chain import SimDev, readings, start_agent, start_sim, write_site
    from support.collector import Collector, publish
    from support.ports import free_port
    from support.procs import ProcRegistry

    site_id = "flood"
    broker = Broker(tmp_path / "broker", binary=require_mosquitto())
    broker.start()
    registry = ProcRegistry(tmp_path / "procs")
    col = Collector(broker.host, broker.port, [f"pvgate/{site_id}/#"])
    flooder = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="flooder")
    try:
        port = free_port()
        inv = SimDev("inv01", 1, "huawei-sun2000")
        start_sim(registry.start, port, [inv], speed=60)
        site = write_site(tmp_path / "site.yaml", site_id=site_id, broker_port=broker.port, modbus_port=port,
                          devices=[inv], interval="1s")
        col.start()
        start_agent(registry.start, site)
        data = f"pvgate/{site_id}/data/#"
        col.wait_for(lambda ms: len(readings(ms)) >= 3, timeout=20, topic_filter=data)
        flooder.connect(broker.host, broker.port)
        flooder.loop_start()
        before, t0 = len(readings(col.messages(data))), time.monotonic()
        for i in range(3000):
            flooder.publish(f"pvgate/{site_id}/cmd/ping", json.dumps({"id": i}), qos=0)
            time.sleep(max(0.0, t0 + (i + 1) / 1000 - time.monotonic()))
        time.sleep(max(0.0, t0 + 5 - time.monotonic()))
        polled = len(readings(col.messages(data))) - before
        elapsed = time.monotonic() - t0
        assert polled >= elapsed - 2.5, (polled, elapsed)  # one poll a second, flood or not
        replies = col.messages(f"pvgate/{site_id}/reply/#")
        assert 30 <= len(replies) <= 30 + 10 * elapsed + elapsed + 5, len(replies)
        time.sleep(1.5)  # the bucket refills: a command is answered again
        publish(broker.host, broker.port, f"pvgate/{site_id}/cmd/ping", '{"id": "after"}')
        col.wait_for(lambda ms: any(m.json().get("id") == "after" and m.json()["ok"] for m in ms), 10,
                     topic_filter=f"pvgate/{site_id}/reply/ping", desc="a ping answered after the flood")
        quiet = time.monotonic()
        health = col.wait_for(lambda ms: any(m.t > quiet for m in ms), 15,
                              topic_filter=f"pvgate/{site_id}/health", desc="health after the flood")
        dropped = [m.json()["commands"]["dropped"] for m in health if m.t > quiet][0]
        # Every request the agent received was served or counted (the broker may shed some QoS 0).
        served = sum(1 for m in replies if m.json()["ok"])
        assert 2500 <= dropped and dropped + served <= 3000, (dropped, served, len(replies))
    finally:
        flooder.loop_stop()
        flooder.disconnect()
        col.stop()
        registry.cleanup()
        broker.stop()
