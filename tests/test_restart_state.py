"""What a restarted agent knows from before: active alarms and learned register sets.

The agent is built in-process from a real site file and a real buffer file (nothing is started:
these are the states its link workers begin with).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load_site
from agent.poller.learning import Learned, fingerprint
from agent.service.learned import LearnedFile
from agent.service.runtime import Agent
from agent.store.buffer import Buffer
from drivers.model import Event, Reading, Table

SITE = """site: {{id: s1}}
mqtt: {{host: 127.0.0.1, port: 1}}
buffer: {{path: {buf}}}
agent: {{state_dir: {dir}, clock_sync: assume}}
links:
  - {{id: bus1, type: tcp, host: 127.0.0.1, port: 1502}}
devices:
  - {{id: inv01, link: bus1, unit: 1, profile: huawei-sun2000}}
"""


def _agent(tmp_path: Path) -> Agent:
    site = tmp_path / "site.yaml"
    site.write_text(SITE.format(buf=tmp_path / "buffer.sqlite", dir=tmp_path))
    return Agent(load_site(site))


def test_a_restart_starts_from_the_alarms_active_when_it_stopped(tmp_path: Path) -> None:
    buf = Buffer(tmp_path / "buffer.sqlite")
    buf.append([Event("inv01", 1, "alarm", {"point": "alarm_1", "alarms": "grid_loss", "raw": 128})])
    buf.close()
    agent = _agent(tmp_path)
    try:
        state = agent.workers["bus1"].states["inv01"]
        assert state.alarm_bits == {"alarm_1": 128}
        # The first reading after the restart has the alarm gone: `alarm_cleared`, no new `alarm`.
        events: list[Event | Reading] = []
        worker = agent.workers["bus1"]
        worker.sink = events.append
        worker._alarm_events(state, Reading("inv01", 2, {"alarm_1": 0}, []))
        assert [e.event for e in events if isinstance(e, Event)] == ["alarm_cleared"]
    finally:
        agent.buffer.close()


def test_a_restart_starts_from_the_learned_register_set(tmp_path: Path) -> None:
    probe = _agent(tmp_path)
    state0 = probe.workers["bus1"].states["inv01"]
    dmap = state0.device.profile
    probe.buffer.close()
    covered = {a for p in dmap.points for a in range(p.address, p.end)}
    gap = next(a for b in state0.blocks for a in range(b.start, b.start + b.count) if a not in covered)
    hole = (Table.HOLDING, gap, gap)  # a register the map's plan bridges and the device lacks
    LearnedFile(tmp_path).save({"inv01": Learned(fingerprint(dmap), {hole})})
    agent = _agent(tmp_path)
    try:
        state = agent.workers["bus1"].states["inv01"]
        assert hole in state.learned.holes
        assert not any(b.start <= gap < b.start + b.count for b in state.blocks)
    finally:
        agent.buffer.close()


def test_learned_sets_saved_from_many_threads_at_once_end_as_the_newest(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Devices learn at the same moment and each save runs on an executor thread: no save may
    rename the temporary file away from another, and the file ends with the newest sets."""
    import concurrent.futures

    learned_file = LearnedFile(tmp_path)
    sets: dict[str, Learned] = {}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = []
        for i in range(200):
            sets[f"inv{i:03d}"] = Learned("layout", {(Table.HOLDING, i, i)})
            learned_file.stage(sets)
            futures.append(pool.submit(learned_file.flush))
        for f in futures:
            f.result()
    assert "cannot save" not in caplog.text
    assert set(learned_file.load()) == set(sets)
