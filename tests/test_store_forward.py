"""Store and forward, end to end with real processes: pvgate-sim -> pvgate run -> mosquitto.

- a long broker outage behind a slow uplink: every seq arrives, live readings before the
  backlog has drained;
- kill -9 at five random moments: every seq arrives, none reused, duplicates < 1 %;
- a small max_mb filling during an outage: the agent goes on, drops are announced by seq range;
- a real full file system (tmpfs): drop announced, no crash, recovery when space returns;
- resend of a seq range on request, in process and through P/S/cmd/resend.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_site
from agent.store.buffer import Buffer
from agent.uplink import resend as resend_mod
from agent.uplink.publisher import Publisher
from drivers.model import Event, Reading
from support.broker import Broker
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
from support.collector import Collector, Msg, publish
from support.fs import small_tmpfs
from support.ports import free_port
from support.procs import Proc
from support.uplink import Uplink

CollectorFactory = Callable[..., Collector]
ProcStarter = Callable[..., Proc]

INV = [SimDev("inv01", 1, "huawei-sun2000"), SimDev("inv02", 2, "huawei-sun2000"), SimDev("meter", 11, "chint-dtsu666")]


# -- helpers ----------------------------------------------------------------------------------


def site_with(tmp_path: Path, buffer_opts: str = "", **kw: Any) -> Path:
    """write_site() plus buffer options (max_mb, min_free_mb, ...)."""
    path = write_site(tmp_path / "site.yaml", **kw)
    if buffer_opts:
        extra = "".join(f"  {line.strip()}\n" for line in buffer_opts.splitlines() if line.strip())
        text = path.read_text(encoding="utf-8").replace("  commit_interval: 0.2s\n", "  commit_interval: 0.2s\n" + extra)
        path.write_text(text, encoding="utf-8")
    return path


def drop_events(msgs: list[Msg]) -> list[dict[str, Any]]:
    out = {}
    for m in msgs:
        if m.topic.endswith("/events/_site") and m.json().get("event") == "dropped":
            out[m.json()["seq"]] = m.json()
    return [out[s] for s in sorted(out)]


def dropped_seqs(events: list[dict[str, Any]]) -> set[int]:
    return {s for ev in events for s in range(ev["first_seq"], ev["last_seq"] + 1)}





# -- outage -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_long_outage_every_seq_arrives_and_live_comes_before_the_backlog(
        tmp_path: Path, broker: Broker, collector_factory: CollectorFactory, procs: ProcStarter) -> None:
    """The broker is down for 32 s behind a 20 kB/s uplink. After it is back, every seq arrives;
    live readings (replay absent) arrive within two poll intervals of their poll while the
    backlog (replay: true) is still draining."""
    interval = 1.0
    modbus = free_port()
    start_sim(procs, modbus, INV, speed=60)
    col = collector_factory(["pvgate/sf-outage/#"])
    with Uplink(broker.port, rate=20_000) as uplink:
        site = site_with(tmp_path, site_id="sf-outage", broker_port=uplink.port, modbus_port=modbus,
                         devices=INV, interval="1s")
        agent = start_agent(procs, site)
        col.wait_for(lambda ms: len(seqs_of(data_and_events(ms))) >= 6, timeout=20, desc="first readings")
        broker.stop()
        time.sleep(32)
        backlog_last, _ = buffer_seqs(tmp_path / "buffer.sqlite")
        t_restart = time.monotonic()
        uplink.restart_broker(broker, col, starts=2)
        online = col.wait_for(lambda ms: any(m.t > t_restart and m.json()["state"] == "online" for m in ms),
                              timeout=45, topic_filter="pvgate/sf-outage/status", desc="the agent is back")
        t_online = next(m.t for m in online if m.t > t_restart and m.json()["state"] == "online")
        col.wait_for(lambda ms: set(range(1, backlog_last + 1)) <= set(seqs_of(data_and_events(ms))),
                     timeout=60, desc="the whole backlog")
        time.sleep(2 * interval)
        assert agent.running
        agent.terminate(timeout=15)
    last, _ = buffer_seqs(tmp_path / "buffer.sqlite")
    msgs = data_and_events(col.messages("pvgate/sf-outage/#"))
    got, _ = records(msgs)
    assert_every_seq_once_in_content(got, last)
    assert backlog_last > 32 * len(INV) * 0.8 / interval, "polling went on during the outage"

    after = [m for m in msgs if m.t >= t_online and "/data/" in m.topic]
    replay = [m for m in after if m.json().get("replay")]
    live = [m for m in after if not m.json().get("replay")]
    assert replay and live
    replay_seqs = [r["seq"] for m in replay for r in m.json()["readings"]]
    live_seqs = [r["seq"] for m in live for r in m.json()["readings"]]
    assert max(replay_seqs) < min(live_seqs), "replay carries what was buffered before the reconnect"
    print(f"backlog up to seq {backlog_last}: first live reading {live[0].t - t_online:.2f} s after the reconnect, "
          f"backlog drained after {replay[-1].t - t_online:.2f} s")
    assert live[0].t < replay[-1].t, (
        f"the newest arrived before the backlog had drained (first live {live[0].t - t_online:.2f} s, "
        f"backlog drained {replay[-1].t - t_online:.2f} s after the reconnect)")
    assert live[0].t - t_online <= 2 * interval, f"station live {live[0].t - t_online:.2f} s after the reconnect"
    wall = time.time() - time.monotonic()
    late = [(r["seq"], round(m.t + wall - r["ts"] / 1000, 2)) for m in live for r in m.json()["readings"]
            if m.t + wall - r["ts"] / 1000 > 2 * interval]
    assert not late, f"live readings later than two poll intervals after their poll: {late[:10]}"


# -- crashes ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill9_at_five_random_moments(tmp_path: Path, broker: Broker, collector_factory: CollectorFactory,
                                      procs: ProcStarter) -> None:
    """The agent is killed with kill -9 at five random moments while polling and publishing,
    and restarted each time: every seq arrives, none with two contents, duplicates < 1 %."""
    seed = int(os.environ.get("PVGATE_TEST_SEED", time.time()))
    rng = random.Random(seed)
    devices = [*INV, SimDev("inv03", 3, "huawei-sun2000")]
    modbus = free_port()
    start_sim(procs, modbus, devices, speed=60)
    site = site_with(tmp_path, site_id="sf-crash", broker_port=broker.port, modbus_port=modbus,
                     devices=devices, interval="200ms")
    col = collector_factory(["pvgate/sf-crash/#"])
    moments = [round(rng.uniform(1.0, 5.0), 2) for _ in range(5)]
    for i, after in enumerate(moments):
        agent = start_agent(procs, site, name=f"agent{i}")
        time.sleep(after)
        agent.kill9()
    agent = start_agent(procs, site, name="agent-final")
    committed, _ = buffer_seqs(tmp_path / "buffer.sqlite")
    col.wait_for(lambda ms: set(range(1, max(committed, 500) + 1)) <= set(seqs_of(data_and_events(ms))),
                 timeout=40, desc="every seq committed before the last restart, and at least 500")
    agent.terminate(timeout=15)
    last, _ = buffer_seqs(tmp_path / "buffer.sqlite")
    time.sleep(0.3)
    got, arrivals = records(data_and_events(col.messages("pvgate/sf-crash/#")))
    assert_every_seq_once_in_content(got, last)
    duplicates = arrivals - len(got)
    print(f"kill -9 after {moments} s (seed {seed}): {len(got)} records, {duplicates} duplicates")
    assert duplicates < 0.01 * len(got), (
        f"{duplicates} duplicates for {len(got)} records (seed {seed}, kills after {moments} s)")


# -- a small buffer fills -----------------------------------------------------------------------


@pytest.mark.slow
def test_small_buffer_fills_during_an_outage(tmp_path: Path, broker: Broker, uplink: Uplink,
                                             collector_factory: CollectorFactory, procs: ProcStarter) -> None:
    max_mb = 0.25
    modbus = free_port()
    start_sim(procs, modbus, INV, speed=60)
    site = site_with(tmp_path, f"max_mb: {max_mb}\nmin_free_mb: 0", site_id="sf-small",
                     broker_port=uplink.port, modbus_port=modbus, devices=INV, interval="200ms")
    col = collector_factory(["pvgate/sf-small/#"])
    agent = start_agent(procs, site)
    col.wait_for(lambda ms: len(seqs_of(data_and_events(ms))) >= 6, timeout=20)
    broker.stop()
    db = tmp_path / "buffer.sqlite"
    peak = 0
    deadline = time.monotonic() + 16
    while time.monotonic() < deadline:
        peak = max(peak, sum(p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists()))
        time.sleep(0.05)
    assert peak <= max_mb * 1024 * 1024, f"buffer file + WAL reached {peak} bytes"
    assert agent.running
    assert agent.find_line(r"buffer dropped \d+ unsent records, seq \d+\.\.\d+"), agent.tail()
    before_restart, _ = buffer_seqs(db)
    uplink.restart_broker(broker, col, starts=2)

    def complete(ms: list[Msg]) -> bool:
        msgs = data_and_events(ms)
        return set(range(1, before_restart + 1)) <= set(seqs_of(msgs)) | dropped_seqs(drop_events(msgs))

    col.wait_for(complete, timeout=45, desc="everything not dropped, and the drop events")
    agent.terminate(timeout=15)
    last, _ = buffer_seqs(db)
    msgs = data_and_events(col.messages("pvgate/sf-small/#"))
    events = drop_events(msgs)
    assert events and all(ev["reason"] == "buffer full (buffer.max_mb reached)" for ev in events)
    got, _ = records(msgs)
    missing = set(range(1, last + 1)) - set(got)
    assert missing, "the buffer was too small to keep everything"
    assert missing <= dropped_seqs(events), f"gaps no drop event names: {sorted(missing - dropped_seqs(events))[:20]}"
    assert len(missing) <= sum(ev["count"] for ev in events)
    assert_every_seq_once_in_content(got, last, allowed_missing=missing)


# -- a full disk ------------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path, 6) as mnt:
        yield mnt


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.mark.slow
def test_disk_full_is_survived_and_announced(tmp_path: Path, tmpfs: Path, broker: Broker, uplink: Uplink,
                                             collector_factory: CollectorFactory, procs: ProcStarter) -> None:
    modbus = free_port()
    start_sim(procs, modbus, INV, speed=60)
    db = tmpfs / "buffer.sqlite"
    site = site_with(tmp_path, "max_mb: 8\nmin_free_mb: 0", site_id="sf-disk", broker_port=uplink.port,
                     modbus_port=modbus, devices=INV, interval="200ms", buffer=db)
    col = collector_factory(["pvgate/sf-disk/#"])
    agent = start_agent(procs, site)
    try:
        col.wait_for(lambda ms: len(seqs_of(data_and_events(ms))) >= 6, timeout=20)
        broker.stop()
        time.sleep(2)
        filler = tmpfs / "filler"
        filler.write_bytes(b"\0" * max(0, free_bytes(tmpfs) - 160 * 1024))  # someone else fills the disk
        agent.wait_for_line(r"buffer dropped \d+ unsent records, seq \d+\.\.\d+: disk full", timeout=30)
        time.sleep(3)
        assert agent.running, agent.tail()
        size_full = db.stat().st_size
        filler.unlink()  # space returns
        deadline = time.monotonic() + 20
        while db.stat().st_size <= size_full + 64 * 1024 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert db.stat().st_size > size_full, "the buffer grows again once space is back"
        drops_then = len(agent.stderr().split("buffer dropped")) - 1
        before_restart, _ = buffer_seqs(db)
        uplink.restart_broker(broker, col, starts=2)
        col.wait_for(lambda ms: set(range(1, before_restart + 1))
                     <= set(seqs_of(data_and_events(ms))) | dropped_seqs(drop_events(data_and_events(ms))),
                     timeout=45, desc="everything not dropped, and the drop events")
        assert agent.running
        assert len(agent.stderr().split("buffer dropped")) - 1 == drops_then, "no drops after recovery"
    finally:
        agent.terminate(timeout=15)
    last, _ = buffer_seqs(db)
    msgs = data_and_events(col.messages("pvgate/sf-disk/#"))
    events = drop_events(msgs)
    assert events and all(ev["reason"].startswith("disk full") for ev in events)
    got, _ = records(msgs)
    missing = set(range(1, last + 1)) - set(got)
    assert missing and missing <= dropped_seqs(events)
    assert "Traceback" not in agent.stderr()


# -- resend -----------------------------------------------------------------------------------


def _reading(i: int) -> Reading:
    return Reading("inv01", 1_764_400_000_000 + i * 10_000, {"ac_power": i * 1.5, "energy_total": 1000 + i}, [])


def test_resend_publishes_kept_rows_again(tmp_path: Path, broker: Broker, collector_factory: CollectorFactory,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """request_resend() republishes what is kept in the range, sent or not, marked replay and
    resend; an invalid or unknown range is an error reply, not a crash."""
    site = site_with(tmp_path, "keep_sent_days: 7", site_id="sf-resend", broker_port=broker.port,
                     modbus_port=502, devices=INV[:1])
    cfg = load_site(site)
    buf = Buffer(cfg.buffer.path, cfg.buffer.max_mb, cfg.buffer.keep_sent_days, 0)
    buf.append([_reading(i) for i in range(60)] + [Event("inv01", 1_764_400_700_000, "offline", {"reason": "test"})])
    col = collector_factory(["pvgate/sf-resend/data/#", "pvgate/sf-resend/events/#"])
    pub = Publisher(cfg.uplink(), buf)
    pub.start()
    try:
        col.wait_for(lambda ms: set(seqs_of(ms)) >= set(range(1, 63)), timeout=15, desc="first delivery")
        assert buf.stats().unsent == 0
        col.clear()
        ok, reply = pub.request_resend(10, 62)  # seq 1 is the buffer_reset of the new file
        assert ok and reply == {"queued_first_seq": 10, "queued_last_seq": 62}
        msgs = col.wait_for(lambda ms: set(seqs_of(ms)) >= set(range(10, 63)), timeout=15, desc="resent")
        assert sorted(seqs_of(msgs)) == list(range(10, 63)), "exactly the range, once"
        assert all(m.json()["replay"] is True and m.json()["resend"] is True for m in msgs)
        event = next(m.json() for m in msgs if "/events/" in m.topic)
        assert event["event"] == "offline" and event["seq"] == 62
        r10 = next(r for m in msgs if "/data/" in m.topic for r in m.json()["readings"] if r["seq"] == 10)
        assert r10["values"] == _reading(8).values and r10["ts"] == _reading(8).ts_ms

        assert pub.request_resend(20, 10) == (False, {"error": "invalid seq range 20..10: expected 1 <= first_seq <= last_seq"})
        ok, reply = pub.request_resend(500, 900)
        assert not ok and "no records kept in seq 500..900" in reply["error"] and "1..62" in reply["error"]
        ok, reply = pub.request_resend(0, 5)
        assert not ok
        ok, reply = pub.request_resend(1, 10**9)
        assert ok and reply == {"queued_first_seq": 1, "queued_last_seq": 62}, "a range may reach past what is kept"
        monkeypatch.setattr(resend_mod, "RESEND_MAX_SEQS", 20)
        ok, reply = pub.request_resend(5, 10**9)
        assert ok and reply == {"queued_first_seq": 5, "queued_last_seq": 24, "truncated": True,
                                "next_first_seq": 25, "max_seqs": 20}
        assert pub.connected, "refused requests did not disturb the publisher"
    finally:
        pub.stop()
        buf.close()


@pytest.mark.slow
def test_resend_command_from_the_center(tmp_path: Path, broker: Broker, collector_factory: CollectorFactory,
                                        procs: ProcStarter) -> None:
    modbus = free_port()
    start_sim(procs, modbus, INV[:1], speed=60)
    site = site_with(tmp_path, site_id="sf-cmd", broker_port=broker.port, modbus_port=modbus,
                     devices=INV[:1], interval="500ms")
    col = collector_factory(["pvgate/sf-cmd/#"])
    agent = start_agent(procs, site)
    col.wait_for(lambda ms: len(seqs_of(data_and_events(ms))) >= 8, timeout=20)
    publish(broker.host, broker.port, "pvgate/sf-cmd/cmd/resend", json.dumps({"id": "r1", "first_seq": 2, "last_seq": 5}))
    publish(broker.host, broker.port, "pvgate/sf-cmd/cmd/resend", json.dumps({"id": "r2", "first_seq": 10**6, "last_seq": 10**6 + 5}))
    # r1 is answered twice (queued, then done), so wait for both ids, not for two replies.
    replies = col.wait_for(lambda ms: {m.json()["id"] for m in ms} >= {"r1", "r2"}, timeout=15,
                           topic_filter="pvgate/sf-cmd/reply/resend")
    by_id = {m.json()["id"]: m.json() for m in replies if "done" not in m.json() and "abandoned" not in m.json()}
    assert by_id["r1"]["ok"] is True, by_id["r1"]
    assert by_id["r2"]["ok"] is False and "no records kept" in by_id["r2"]["error"]
    resent = col.wait_for(lambda ms: set(seqs_of([m for m in ms if m.json().get("resend")])) >= {2, 3, 4, 5},
                          timeout=15, topic_filter="pvgate/sf-cmd/+/+")
    assert all(s in range(2, 6) for s in seqs_of([m for m in resent if m.json().get("resend")]))
    assert agent.running
    agent.terminate(timeout=15)
