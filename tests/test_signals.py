"""Signals: SIGHUP re-reads the site file (valid: applied without a restart; invalid: rejected,
old config kept), SIGTERM in the middle of publishing a backlog loses no reading."""

from __future__ import annotations

import json
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.store.buffer import Buffer
from drivers.model import Reading
from support.broker import Broker
from support.chain import (
    SimDev,
    agent_cmd,
    assert_every_seq_once_in_content,
    buffer_seqs,
    data_and_events,
    readings,
    records,
    seqs_of,
    start_agent,
    start_sim,
    write_site,
)
from support.collector import Collector, MosquittoSub
from support.ports import free_port
from support.procs import Proc

INV = SimDev("inv01", 1, "huawei-sun2000")
METER = SimDev("meter", 11, "chint-dtsu666")


def _assert_complete(col: Any, site: str, last: int) -> None:
    got, _ = records(data_and_events(col.messages(f"pvgate/{site}/#")))
    assert_every_seq_once_in_content(got, last)


def _states(col: Any, site: str) -> list[str]:
    return [m.json()["state"] for m in col.messages(f"pvgate/{site}/status")]


def test_sighup_with_a_valid_site_file_applies_it_without_restart(
        tmp_path: Path, broker: Broker, collector_factory: Callable[..., Collector], procs: Callable[..., Proc]
) -> None:
    port = free_port()
    start_sim(procs, port, [INV, METER], speed=60)
    site = write_site(tmp_path / "site.yaml", site_id="hup-ok", broker_port=broker.port, modbus_port=port,
                      devices=[INV], interval="1s")
    col = collector_factory(["pvgate/hup-ok/#"])
    agent = start_agent(procs, site)
    col.wait_for(lambda ms: len(readings(ms)) >= 3, timeout=20, topic_filter="pvgate/hup-ok/data/#",
                 desc="3 readings before the reload")
    seq_before, _ = buffer_seqs(tmp_path / "buffer.sqlite")

    # A device more, and a shorter interval for the one that was there.
    text = site.read_text(encoding="utf-8")
    text = text.replace("profile: huawei-sun2000, interval: 1s", "profile: huawei-sun2000, interval: 500ms")
    text += "  - {id: meter, link: lan, unit: 11, profile: chint-dtsu666, interval: 1s}\n"
    site.write_text(text, encoding="utf-8")
    mark = agent.mark()
    reload_t = time.monotonic()
    agent.send_signal(signal.SIGHUP)
    agent.wait_for_line(r"device=_site reload \(SIGHUP\) applied .*2 devices \(1 added, 0 removed, 1 changed\)",
                        timeout=15, since=mark)
    assert agent.find_line(r"device=meter added by reload", since=mark)

    col.wait_for(lambda ms: sum(1 for r in readings(ms) if r["device"] == "meter") >= 3, timeout=20,
                 topic_filter="pvgate/hup-ok/data/#", desc="the new device's readings")
    col.wait_for(lambda ms: any(m.json().get("interval_s") == 0.5 for m in ms), timeout=10,
                 topic_filter="pvgate/hup-ok/meta/inv01", desc="meta republished with the new interval")
    assert col.messages("pvgate/hup-ok/meta/meter"), "meta for the new device"
    time.sleep(2.5)
    inv_ts = sorted(m.t for m in col.messages("pvgate/hup-ok/data/inv01") if m.t > reload_t + 1.0)
    assert len(inv_ts) >= 4 and statistics.median(b - a for a, b in zip(inv_ts, inv_ts[1:])) < 0.8, \
        "inv01 is polled every 500 ms now"

    assert agent.running
    assert agent.find_line(r"running: site", since=mark) is None, "no restart"
    assert "offline" not in _states(col, "hup-ok"), "the station stayed online through the reload"
    assert agent.terminate(timeout=15) == 0
    last, _ = buffer_seqs(tmp_path / "buffer.sqlite")
    assert last > seq_before + 6
    time.sleep(0.5)
    # Same buffer, same sequence: every seq from 1 arrived once per content, none reused, no gap.
    _assert_complete(col, "hup-ok", last)


def test_sighup_with_an_invalid_site_file_keeps_the_running_config(
        tmp_path: Path, broker: Broker, collector_factory: Callable[..., Collector], procs: Callable[..., Proc]
) -> None:
    port = free_port()
    start_sim(procs, port, [INV], speed=60)
    site = write_site(tmp_path / "site.yaml", site_id="hup-bad", broker_port=broker.port, modbus_port=port,
                      devices=[INV], interval="500ms")
    col = collector_factory(["pvgate/hup-bad/#"])
    agent = start_agent(procs, site)
    col.wait_for(lambda ms: len(readings(ms)) >= 2, timeout=20, topic_filter="pvgate/hup-bad/data/#")

    good = site.read_text(encoding="utf-8")
    bad = good + "  - {id: ghost, link: nowhere, unit: 7, profile: huawei-sun2000}\n"
    bad_line = len(bad.splitlines())
    site.write_text(bad, encoding="utf-8")
    mark = agent.mark()
    agent.send_signal(signal.SIGHUP)
    agent.wait_for_line(rf"ERROR .*device=_site reload rejected: {site}:{bad_line}: devices\[1\]\.link: no link 'nowhere'",
                        timeout=15, since=mark)
    agent.wait_for_line(r"reload \(SIGHUP\) rejected: 1 problem in .*the running configuration is kept",
                        timeout=5, since=mark)
    n = len(readings(col.messages("pvgate/hup-bad/data/#")))
    col.wait_for(lambda ms: len(readings(ms)) >= n + 3, timeout=10, topic_filter="pvgate/hup-bad/data/#",
                 desc="polling goes on with the old config")
    assert agent.running
    assert agent.find_line(r"added by reload|applied", since=mark) is None
    assert not col.messages("pvgate/hup-bad/meta/ghost")

    # A mistake in YAML itself is rejected the same way, with its line.
    site.write_text(good + "  - {id: broken, link: lan\n", encoding="utf-8")
    mark = agent.mark()
    agent.send_signal(signal.SIGHUP)
    agent.wait_for_line(rf"reload rejected: {site}:\d+", timeout=15, since=mark)
    assert agent.running
    assert "offline" not in _states(col, "hup-bad")
    assert agent.terminate(timeout=15) == 0


def _prefill(path: Path, n: int) -> None:
    """A backlog as a broker outage leaves it: n committed, unsent readings."""
    buf = Buffer(path)
    now = int(time.time() * 1000) - n * 100
    for i in range(0, n, 500):
        buf.append([Reading("inv01", now + j * 100, {"ac_power": float(j), "energy_total": 1000.0 + j})
                    for j in range(i, min(n, i + 500))])
    buf.close()


def _unsent(path: Path) -> set[int]:
    buf = Buffer(path)
    try:
        return {row.seq for row in buf.unsent(0, limit=10**7)}
    finally:
        buf.close()


def test_sigterm_mid_publish_loses_no_reading(
        tmp_path: Path, broker: Broker, collector_factory: Callable[..., Collector], procs: Callable[..., Proc]
) -> None:
    port = free_port()
    start_sim(procs, port, [INV], speed=60)
    buffer = tmp_path / "buffer.sqlite"
    _prefill(buffer, 15000)
    # One reading per message, one message in flight: draining the backlog takes several seconds.
    site = write_site(tmp_path / "site.yaml", site_id="term", broker_port=broker.port, modbus_port=port,
                      devices=[INV], interval="200ms", extra_mqtt="batch_max: 1\ninflight: 1")
    col = collector_factory(["pvgate/term/#"])
    agent = procs(agent_cmd(site), "agent")
    col.wait_for(lambda ms: sum(1 for m in ms if m.json().get("replay")) >= 100, timeout=20,
                 topic_filter="pvgate/term/data/#", desc="the backlog is being published")
    agent.send_signal(signal.SIGTERM)
    arrived_at_term = len(seqs_of(data_and_events(col.messages("pvgate/term/#"))))
    assert agent.wait(timeout=20) == 0, agent.tail()
    last, _ = buffer_seqs(buffer)
    assert arrived_at_term < last, "SIGTERM came while the backlog was still being published"

    status = MosquittoSub.retained(broker.host, broker.port, "pvgate/term/status")
    assert status is not None and json.loads(status)["state"] == "offline"
    # Whatever was marked sent did arrive; the rest is still in the buffer, unsent. The broker
    # acknowledged what is marked sent before the collector (a subscriber like the center) had
    # it, so give a lagging collector time to catch up; what never comes fails.
    unsent = _unsent(buffer)
    sent = set(range(1, last + 1)) - unsent
    deadline = time.monotonic() + 15
    while not sent <= (arrived := set(seqs_of(data_and_events(col.messages("pvgate/term/#"))))):
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert set(range(1, last + 1)) <= arrived | unsent, "a committed reading was neither delivered nor kept"
    assert not (set(range(1, last + 1)) - arrived) - unsent

    # The next start delivers what is left, with the seqs it had.
    site.write_text(site.read_text(encoding="utf-8").replace("batch_max: 1", "batch_max: 500")
                    .replace("inflight: 1", "inflight: 20"), encoding="utf-8")
    agent = start_agent(procs, site, name="agent-again")
    col.wait_for(lambda ms: set(range(1, last + 1)) <= set(seqs_of(data_and_events(col.messages("pvgate/term/#")))), timeout=30,
                 desc="every committed seq after the restart")
    assert agent.terminate(timeout=15) == 0
    last, _ = buffer_seqs(buffer)
    time.sleep(0.5)
    _assert_complete(col, "term", last)
