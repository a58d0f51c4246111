"""Proves the test harness in tests/support against a real mosquitto and real processes."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable

import pytest

from support.broker import Broker, BrokerError
from support.collector import Collector, MosquittoSub, Msg, publish
from support.ports import free_port, port_accepts, port_bindable
from support.procs import Proc

CollectorFactory = Callable[..., Collector]
ProcStarter = Callable[..., Proc]
BrokerFactory = Callable[..., Broker]


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
    assert port_bindable("127.0.0.1", port)


def test_broker_starts_with_own_config(broker: Broker) -> None:
    assert broker.running
    assert broker.host == "127.0.0.1"
    assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
    assert port_accepts(broker.host, broker.port)
    conf = broker.conf_path.read_text()
    assert f"listener {broker.port} 127.0.0.1" in conf
    assert "persistence false" in conf
    assert "allow_anonymous true" in conf
    assert "mosquitto version" in broker.log()


def test_collector_receives_message(broker: Broker, collector_factory: CollectorFactory) -> None:
    c = collector_factory(["pv/#", "other/+/x"])
    publish(broker.host, broker.port, "pv/site1/data", json.dumps({"p": 1.5}))
    publish(broker.host, broker.port, "other/a/x", b"raw")
    publish(broker.host, broker.port, "ignored/topic", b"nope")
    msgs = c.wait_for(lambda ms: len(ms) >= 2, timeout=5)
    assert {m.topic for m in msgs} == {"pv/site1/data", "other/a/x"}
    data = c.messages("pv/+/data")
    assert len(data) == 1 and data[0].json() == {"p": 1.5}
    assert data[0].qos == 1 and data[0].retain is False
    assert c.messages("other/#")[0].payload == b"raw"
    assert c.messages("ignored/#") == []


def test_wait_for_timeout_has_helpful_summary(broker: Broker,
                                              collector_factory: CollectorFactory) -> None:
    c = collector_factory("pv/#")
    publish(broker.host, broker.port, "pv/a", b"payload-a")
    c.wait_for_count("pv/a", 1, timeout=5)
    with pytest.raises(AssertionError) as exc:
        c.wait_for(lambda ms: len(ms) >= 5, timeout=0.3, desc="five messages")
    text = str(exc.value)
    assert "five messages" in text and "pv/a" in text and "payload-a" in text


def test_restart_keeps_port_and_collector_reconnects(
        broker: Broker, collector_factory: CollectorFactory) -> None:
    c = collector_factory("pv/#")
    port, pid = broker.port, broker.pid
    publish(broker.host, broker.port, "pv/before", b"1")
    c.wait_for_count("pv/before", 1, timeout=5)

    broker.restart()
    assert broker.running and broker.port == port and broker.pid != pid

    c.wait_subscribed(2, timeout=10)  # reconnected and resubscribed on its own
    publish(broker.host, broker.port, "pv/after", b"2")
    c.wait_for_count("pv/after", 1, timeout=5)
    assert c.connect_count >= 2


def test_kill_then_start_same_port(broker: Broker, collector_factory: CollectorFactory) -> None:
    c = collector_factory("pv/#")
    port = broker.port
    broker.kill()
    assert not broker.running
    broker.start()
    assert broker.port == port
    c.wait_subscribed(2, timeout=10)
    publish(broker.host, broker.port, "pv/x", b"after-crash")
    c.wait_for_count("pv/x", 1, timeout=5)


def test_mosquitto_sub_sees_retained(broker: Broker) -> None:
    publish(broker.host, broker.port, "pv/site1/status", b"online", retain=True)
    assert MosquittoSub.retained(broker.host, broker.port, "pv/site1/status", timeout=5) == "online"
    assert MosquittoSub.retained(broker.host, broker.port, "pv/site1/none", timeout=1) is None


def test_mosquitto_sub_collect_count(broker: Broker) -> None:
    publish(broker.host, broker.port, "pv/r1", b"one", retain=True)
    publish(broker.host, broker.port, "pv/r2", b"two", retain=True)
    lines = MosquittoSub.collect(broker.host, broker.port, "pv/#", count=2, timeout=5)
    assert sorted(lines) == ["pv/r1 one", "pv/r2 two"]


def test_collector_sees_retained_flag(broker: Broker, collector_factory: CollectorFactory) -> None:
    publish(broker.host, broker.port, "pv/status", b"online", retain=True)
    c = collector_factory("pv/status")
    (m,) = c.wait_for_count("pv/status", 1, timeout=5)
    assert isinstance(m, Msg) and m.retain and m.text() == "online"


def test_broker_extra_conf_and_failure_reports_log(broker_factory: BrokerFactory) -> None:
    b = broker_factory(extra_conf="max_keepalive 30\n")
    assert "max_keepalive 30" in b.conf_path.read_text()
    with pytest.raises(BrokerError, match="rc="):
        broker_factory(extra_conf="this_is_not_an_option 1\n")


def test_proc_wait_for_line_and_terminate(procs: ProcStarter) -> None:
    p = procs([sys.executable, "-c",
               "print('hello', flush=True); import time; time.sleep(30)"], "hello")
    m = p.wait_for_line(r"hel+o", timeout=10)
    assert m.group(0) == "hello"
    assert p.running and p.pid > 0
    rc = p.terminate(timeout=5)
    assert rc == -signal.SIGTERM and not p.running
    assert "hello" in p.output()


def test_proc_env_since_and_early_exit(procs: ProcStarter) -> None:
    code = ("import os, sys, time; print('a', os.environ['PVG_X'], flush=True); "
            "print('err-line', file=sys.stderr, flush=True); time.sleep(0.3); print('b', flush=True)")
    p = procs([sys.executable, "-c", code], "envtest", env={"PVG_X": "42"})
    p.wait_for_line(r"^a 42$", timeout=10)
    mark = p.mark()
    p.wait_for_line("err-line", timeout=10, stream="stderr")
    with pytest.raises(AssertionError, match="exited"):
        p.wait_for_line("never printed", timeout=10, since=mark)
    assert p.returncode == 0
    assert p.find_line("^a", since=mark) is None and p.find_line("^b", since=mark)


def test_proc_kill9(procs: ProcStarter) -> None:
    p = procs([sys.executable, "-c", "import time; time.sleep(30)"], "sleeper")
    assert p.kill9() == -signal.SIGKILL
