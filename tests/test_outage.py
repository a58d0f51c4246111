"""No reading lost through a broker outage, kill -9 of the agent, or a start while the broker is down."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from support.chain import (
    SimDev,
    assert_every_seq_once_in_content,
    buffer_seqs,
    data_and_events,
    records,
    seqs_of,
    start_agent,
    start_sim,
    write_site,
)
from support.ports import free_port
from support.uplink import Uplink

pytestmark = pytest.mark.contract  # every message received is checked against docs/schemas/

DEVICES = [SimDev("inv01", 1, "huawei-sun2000"), SimDev("meter", 11, "chint-dtsu666")]


def _data_and_events(col: Any, site: str) -> list[Any]:
    return data_and_events(col.messages(f"pvgate/{site}/#"))


def _assert_complete(col: Any, site: str, last: int) -> None:
    got, _ = records(_data_and_events(col, site))
    assert_every_seq_once_in_content(got, last)


def test_broker_outage_loses_nothing(tmp_path: Path, broker, collector_factory, procs, uplink: Uplink) -> None:
    port = free_port()
    start_sim(procs, port, DEVICES, speed=60)
    # The station reaches the broker through an uplink proxy, so that after the restart the
    # test's subscriber is back before the station, as the county center's subscribers are.
    site = write_site(tmp_path / "site.yaml", site_id="outage", broker_port=uplink.port, modbus_port=port,
                      devices=DEVICES, interval="500ms")
    col = collector_factory(["pvgate/outage/#"])
    agent = start_agent(procs, site)
    col.wait_for(lambda ms: len(seqs_of(_data_and_events(col, "outage"))) >= 6, timeout=20)
    broker.stop()
    time.sleep(6)  # polling goes on, into the buffer
    last_during, _ = buffer_seqs(tmp_path / "buffer.sqlite")
    uplink.restart_broker(broker, col, starts=2)
    col.wait_for(lambda ms: set(range(1, last_during + 1)) <= set(seqs_of(_data_and_events(col, "outage"))),
                 timeout=40, desc="every seq buffered during the outage")
    time.sleep(1.5)  # polling goes on after the outage too
    assert agent.running
    agent.terminate(timeout=15)
    last, _ = buffer_seqs(tmp_path / "buffer.sqlite")
    time.sleep(0.5)
    _assert_complete(col, "outage", last)
    assert last > last_during, "polling went on after the outage"
    replayed = [m for m in _data_and_events(col, "outage") if m.json().get("replay")]
    assert replayed, "the backlog is marked as replayed"


def test_kill9_and_restart_reuses_no_seq(tmp_path: Path, broker, collector_factory, procs) -> None:
    port = free_port()
    start_sim(procs, port, DEVICES, speed=60)
    site = write_site(tmp_path / "site.yaml", site_id="crash", broker_port=broker.port, modbus_port=port,
                      devices=DEVICES, interval="300ms")
    col = collector_factory(["pvgate/crash/#"])
    for round_ in range(3):
        agent = start_agent(procs, site, name=f"agent{round_}")
        time.sleep(2.5)
        agent.kill9()
        last_before, _ = buffer_seqs(tmp_path / "buffer.sqlite")
        assert last_before > 0
    agent = start_agent(procs, site, name="agent-final")
    last_committed, _ = buffer_seqs(tmp_path / "buffer.sqlite")
    col.wait_for(lambda ms: set(range(1, last_committed + 1)) <= set(seqs_of(_data_and_events(col, "crash"))),
                 timeout=40, desc="every committed seq after restarts")
    agent.terminate(timeout=15)
    last, _ = buffer_seqs(tmp_path / "buffer.sqlite")
    time.sleep(0.5)
    _assert_complete(col, "crash", last)


def test_start_while_broker_down_buffers_from_first_poll(tmp_path: Path, broker_factory, collector_factory, procs) -> None:
    broker = broker_factory(start=False)
    port = free_port()
    start_sim(procs, port, DEVICES, speed=60)
    with Uplink(broker.port) as uplink:
        # The station reaches the broker only once the test's subscriber is there (see the outage test).
        uplink.open.clear()
        site = write_site(tmp_path / "site.yaml", site_id="coldstart", broker_port=uplink.port, modbus_port=port,
                          devices=DEVICES, interval="500ms")
        agent = start_agent(procs, site)
        time.sleep(4)
        buffered, _ = buffer_seqs(tmp_path / "buffer.sqlite")
        assert buffered >= 4, "readings are buffered from the first poll, broker or not"
        broker.start()
        col = collector_factory(["pvgate/coldstart/#"], broker=broker)
        uplink.open.set()
        col.wait_for(lambda ms: set(range(1, buffered + 1)) <= set(seqs_of(_data_and_events(col, "coldstart"))),
                     timeout=40, desc="everything buffered before the broker came up")
        agent.terminate(timeout=15)
    last, _ = buffer_seqs(tmp_path / "buffer.sqlite")
    time.sleep(0.5)
    _assert_complete(col, "coldstart", last)
