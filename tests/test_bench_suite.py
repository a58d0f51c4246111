"""The benchmark suite (python -m bench) still runs and prints figures: its quickest sections with
2-second windows against a real mosquitto, simulator and agent. Whether the targets are met is
the suite's business (docs/performance.md), not this test's: here only that every figure of the
sections was measured."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from support.broker import require_mosquitto

ROOT = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^\| (\w+) \| ([^|]+) \| ([^|]+) \| ([^|]+) \| ([^|]*) \|")


@pytest.mark.slow
def test_quick_sections_print_a_markdown_table_of_measured_figures() -> None:
    require_mosquitto()
    out = subprocess.run([sys.executable, "-m", "bench", "--quick", "--window", "5", "--markdown",
                          "idle", "disk", "profile"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {(m[1], m[2].strip()): (m[3].strip(), m[4].strip(), m[5].strip())
            for m in map(ROW.match, out.stdout.splitlines()) if m and m[1] != "section"}
    idle = rows[("idle", "idle agent, share of one core")]
    assert re.fullmatch(r"[\d.,]+ %", idle[0]) and idle[1] == "< 0.1 %" and idle[2] in ("PASS", "FAIL"), idle
    disk = rows[("disk", "bytes written per reading")]
    assert re.fullmatch(r"[\d,]+ B", disk[0]) and disk[2] in ("PASS", "FAIL"), disk
    floor = rows[("disk", "bare chain: bytes written per reading")]
    assert re.fullmatch(r"[\d,]+ B", floor[0]), floor  # measured beside the agent, same window
    assert ("disk", "fsync + fdatasync per second") in rows
    stages = {name: float(v[0].split()[0]) for (s, name), v in rows.items()
              if s == "profile" and name.startswith("stage:")}
    assert {"stage: poll", "stage: decode", "stage: buffer insert", "stage: JSON", "stage: publish",
            "stage: PUBACK bookkeeping"} <= set(stages), stages
    assert abs(sum(stages.values()) - 100.0) < 1.0, stages  # shares of one profile
    assert stages["stage: poll"] > 0 and stages["stage: publish"] > 0, stages
    assert "machine: " in out.stdout and "load average" in out.stdout


def test_plan_parser_reads_what_pvgate_plan_prints() -> None:
    sys.path.insert(0, str(ROOT))
    from bench.bare import parse_plan

    text = ("link lan01 (tcp 127.0.0.1:1502)\n"
            "  dev01 (unit 1, bench-10v, every 1s): 1 read(s), 13 registers\n"
            "    holding      0 +13   ac_power, dc_power\n"
            "  Modbus TCP: not limited by a serial wire\n"
            "link bus1 (rtu /dev/ttyUSB0 9600 8N1)\n"
            "  inv01 (unit 3, huawei-sun2000, every 10s): 2 read(s), 76 registers, 160 ms on the wire\n"
            "    holding  32000 +24    139 ms  state_1\n"
            "    input    32064 +52    250 ms  pv1_voltage\n")
    plan = parse_plan(text)
    assert [lk["link"] for lk in plan] == ["lan01", "bus1"]
    assert plan[0]["devices"] == [{"id": "dev01", "unit": 1, "interval": 1.0, "blocks": [["holding", 0, 13]]}]
    assert plan[1]["devices"][0]["unit"] == 3
    assert plan[1]["devices"][0]["blocks"] == [["holding", 32000, 24], ["input", 32064, 52]]


def test_fsyncs_are_counted_from_the_strace_summary() -> None:
    sys.path.insert(0, str(ROOT))
    from bench.sections import fsync_calls

    summary = ("% time     seconds  usecs/call     calls    errors syscall\n"
               "------ ----------- ----------- --------- --------- ----------------\n"
               " 71.00    0.001957         391         5           fdatasync\n"
               " 29.00    0.000800         100         8         1 fsync\n"
               "------ ----------- ----------- --------- --------- ----------------\n"
               "100.00    0.002757         212        13         1 total\n")
    assert fsync_calls(summary) == 13
    assert fsync_calls("") == 0


def test_a_device_that_missed_one_slot_does_not_meet_its_interval() -> None:
    sys.path.insert(0, str(ROOT))
    from bench.harness import Arrival, Window

    t0 = 1_000_000.0
    readings = [Arrival("a", i, int((t0 + 10 * k + 0.25) * 1000), t0 + 10 * k + 1.0, False, 10)
                for i, k in enumerate(range(6))]
    readings += [Arrival("b", 10 + k, int((t0 + 10 * k + 0.5) * 1000), t0 + 10 * k + 1.2, False, 10)
                 for k in range(6) if k != 3]
    win = Window(t0, t0 + 60, readings)
    assert win.devices_on_time(["a", "b"], 10.0) == 1
    assert sorted(set(round(j, 3) for j in win.jitters(10.0))) == [0.25, 0.5]
    assert all(abs(lat - 0.75) < 1e-6 or abs(lat - 0.7) < 1e-6 for lat in win.latencies())


def test_the_profile_counts_start_up_apart_from_the_running_agent() -> None:
    sys.path.insert(0, str(ROOT))
    from bench.stageprof import STAGES, STARTUP, base_stage

    site = "/usr/lib/python3/site-packages"
    assert STARTUP not in STAGES, "start-up is no share of the running agent's work"
    for path in (f"{site}/yaml/scanner.py", "/repo/agent/config/site.py", "/repo/drivers/yamlsrc.py",
                 "/repo/drivers/devicemap.py", "/usr/lib/python3.11/argparse.py"):
        assert base_stage((path, 1, "f")) == STARTUP, path
    assert base_stage(("/repo/drivers/plaindecode.py", 1, "decode_plain")) == "decode"
    assert base_stage((f"{site}/pymodbus/transaction/transaction.py", 1, "execute")) == "poll"
    assert base_stage(("/repo/agent/service/health.py", 1, "health_message")) == "other"


def test_the_bare_chain_stores_publishes_and_marks_each_read_sent() -> None:
    """The floor the contract sets (bench/bare.py --chain) does the work it is named for: against a
    real simulator and mosquitto, every read is a committed row, one QoS 1 message that arrives,
    and a row marked sent once its PUBACK came; not a cheaper stand-in."""
    require_mosquitto()
    import json
    import sqlite3
    import time

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    sys.path.insert(0, str(ROOT))
    from bench.harness import Harness
    from bench.sections import Bare, tcp_endpoints, tcp_workload, ten_value_ports

    h = Harness()
    got: list[dict[str, object]] = []
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="chain-test")
    try:
        port = h.start_broker()
        site, _ = tcp_workload(h, "chain", 2)
        _, ports = ten_value_ports(h, "chain-sim", 2)
        sub.on_message = lambda c, u, m: got.append(json.loads(m.payload))
        sub.connect("127.0.0.1", port)
        sub.subscribe("bare/data/#", qos=1)
        sub.loop_start()
        chain = Bare(h, site, tcp_endpoints(ports), chain=True)
        deadline = time.time() + 30
        while chain.sent < 6 and time.time() < deadline:
            time.sleep(0.2)
        assert chain.sent >= 6, f"acknowledged {chain.sent}, polls {chain.polls}"
        h.stop(chain.proc)
        db = sqlite3.connect(h.tmp / "chain-chain.sqlite")
        rows = db.execute("SELECT seq, sent, body FROM reading ORDER BY seq").fetchall()
        assert [r[0] for r in rows] == list(range(1, len(rows) + 1))
        assert sum(r[1] for r in rows) >= 6
        arrived = {m["readings"][0]["seq"]: m for m in got}  # type: ignore[index]
        for seq, sent, body in rows:
            if sent:
                assert arrived[seq] == json.loads(body)
                assert len(arrived[seq]["readings"][0]["values"]) == 10  # type: ignore[index]
    finally:
        sub.loop_stop()
        h.close()
