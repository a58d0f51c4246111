"""P/S/health: every field the county center relies on, at the configured pace."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from support.broker import Broker
from support.chain import SimDev, start_agent, start_sim, write_site
from support.collector import Collector
from support.ports import free_port
from support.procs import Proc

DEVICES = [SimDev("inv01", 1, "huawei-sun2000")]


def test_health_message_carries_every_field(
        tmp_path: Path, broker: Broker, collector_factory: Callable[..., Collector], procs: Callable[..., Proc]
) -> None:
    port = free_port()
    start_sim(procs, port, DEVICES, speed=60)
    site = write_site(tmp_path / "site.yaml", site_id="hl", broker_port=broker.port, modbus_port=port,
                      devices=[*DEVICES, SimDev("ghost", 42, "chint-dtsu666")], interval="500ms", timeout="0.2s",
                      health_interval="1s")
    col = collector_factory(["pvgate/hl/health"])
    start_agent(procs, site)
    msgs = col.wait_for(lambda ms: len(ms) >= 4 and not ms[-1].json()["devices"]["ghost"]["online"]
                        and ms[-1].json()["devices"]["ghost"]["consecutive_failures"] >= 1
                        and ms[-1].json()["devices"]["inv01"]["online"], timeout=25, desc="4 health messages")
    gaps = [b.t - a.t for a, b in zip(msgs[1:], msgs[2:])]
    assert all(0.6 <= g <= 1.8 for g in gaps), f"health_interval 1s: {gaps}"
    h = msgs[-1].json()
    assert not msgs[-1].retain

    assert h["site"] == "hl" and isinstance(h["version"], str) and h["version"]
    assert isinstance(h["uptime_s"], int) and h["uptime_s"] >= 1
    assert abs(h["ts"] - time.time() * 1000) < 5000

    lan = h["links"]["lan"]
    for key in ("transactions", "errors", "timeouts", "mean_response_ms"):
        assert isinstance(lan[key], (int, float)), key
    assert lan["transactions"] > 0 and lan["timeouts"] + lan["errors"] >= 1 and lan["mean_response_ms"] > 0

    inv = h["devices"]["inv01"]
    assert inv["online"] is True and inv["consecutive_failures"] == 0
    assert abs(inv["last_good_ts"] - h["ts"]) < 3000, "last good poll: recent"
    ghost = h["devices"]["ghost"]
    assert ghost["online"] is False and ghost["consecutive_failures"] >= 1 and ghost["last_good_ts"] is None

    assert isinstance(h["poll_overruns"], int)
    buf = h["buffer"]
    for key in ("unsent", "oldest_unsent_age_s", "last_seq", "dropped_unsent", "memory_dropped"):
        assert isinstance(buf[key], int), key
    assert buf["last_seq"] > 0
    assert h["dropped"] == {"unsent": buf["dropped_unsent"], "memory": buf["memory_dropped"]}
    assert isinstance(h["disk_free_bytes"], int) and h["disk_free_bytes"] > 0
    assert h["devices_online"] == 1 and h["devices_total"] == 2
    assert h["mqtt"]["connected"] is True
