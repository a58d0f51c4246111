"""The bus time budget: the wire formula of limits.md §1, `pvgate check` warnings and `pvgate plan`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent.commission.budget import link_budget, transaction_seconds
from agent.config import load_site
from drivers.link import char_seconds
from drivers.model import Block, DataType, Point, Table

PY = sys.executable


def block(n: int) -> Block:
    return Block(Table.HOLDING, 0, n, (Point("x", Table.HOLDING, 0, DataType.U16, n),))


@pytest.mark.parametrize(("baud", "n", "turnaround_ms", "per_s"), [
    (9600, 10, 0, 21.8), (9600, 10, 20, 15.2), (9600, 10, 50, 10.4),
    (9600, 60, 0, 6.2), (9600, 60, 20, 5.5), (9600, 60, 50, 4.8),
    (9600, 125, 0, 3.2), (9600, 125, 20, 3.0), (9600, 125, 50, 2.8),
    (19200, 10, 0, 43.6), (19200, 60, 20, 10.0), (19200, 125, 50, 4.9),
])
def test_formula_reproduces_the_table_in_limits_md(baud: int, n: int, turnaround_ms: float, per_s: float) -> None:
    char_s = char_seconds(baud, "E", 1)  # 11 bits per char, as in the table
    assert 1.0 / transaction_seconds(block(n), char_s, turnaround_ms / 1000) == pytest.approx(per_s, abs=0.06)


def write_site(tmp: Path, interval: str, n_inverters: int = 30, baud: int = 9600) -> Path:
    lines = ["site: {id: budget-test}", "mqtt: {host: 127.0.0.1}", f"buffer: {{path: {tmp / 'b.sqlite'}}}",
             f"agent: {{state_dir: {tmp}}}", "links:",
             f"  - {{id: bus1, type: rtu, port: /dev/ttyUSB0, baudrate: {baud}, parity: N}}",
             "  - {id: lan, type: tcp, host: 192.168.1.20, port: 502}",
             "devices:"]
    lines += [f"  - {{id: inv{i:02d}, link: bus1, unit: {i}, profile: huawei-sun2000, interval: {interval}}}"
              for i in range(1, n_inverters + 1)]
    lines += [f"  - {{id: meter, link: bus1, unit: 100, profile: chint-dtsu666, interval: {interval}}}",
              "  - {id: lan01, link: lan, unit: 1, profile: huawei-sun2000, interval: 1s}"]
    path = tmp / "site.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def pvgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "agent.cli", *args], capture_output=True, text=True, timeout=60, check=False,
                          stdin=subprocess.DEVNULL)


def test_check_warns_when_30_inverters_at_1s_cannot_share_a_9600_bus(tmp_path: Path) -> None:
    res = pvgate("check", "-c", str(write_site(tmp_path, "1s")))
    assert res.returncode == 0, res.stderr  # a warning, not an error: the agent would still run
    warnings = [line for line in res.stdout.splitlines() if "warning" in line]
    assert len(warnings) == 1, res.stdout
    w = warnings[0]
    assert "link bus1" in w and "cannot be met" in w and "9600 baud" in w
    cycle = link_budget(load_site(tmp_path / "site.yaml"), load_site(tmp_path / "site.yaml").link("bus1")).cycle_s
    assert f"{cycle:.2f} s" in w
    assert "link lan" not in res.stdout.split("warning")[-1], "Modbus TCP is not wire-limited"


def test_check_is_quiet_when_the_intervals_fit(tmp_path: Path) -> None:
    res = pvgate("check", "-c", str(write_site(tmp_path, "60s")))
    assert res.returncode == 0, res.stderr
    assert "warning" not in res.stdout + res.stderr


def test_check_warns_when_the_bus_is_nearly_full(tmp_path: Path) -> None:
    # 31 devices need ~7.4 s per cycle at 9600 baud: a 9 s interval is ~83 % of the bus.
    res = pvgate("check", "-c", str(write_site(tmp_path, "9s")))
    assert res.returncode == 0 and "leave less than 20%" in res.stdout, res.stdout


def test_plan_prints_every_read_and_the_cycle_time(tmp_path: Path) -> None:
    site = write_site(tmp_path, "10s", n_inverters=3)
    res = pvgate("plan", "-c", str(site))
    assert res.returncode == 0, res.stderr
    out = res.stdout
    # Each device with its reads: table, 0-based PDU address, register count, wire time, points.
    assert re.search(r"inv01 \(unit 1, huawei-sun2000, every 10s\): 2 read\(s\), 76 registers, \d+ ms on the wire", out)
    assert re.search(r"holding\s+32000 \+24\s+\d+ ms\s+state_1, alarm_1", out)
    assert re.search(r"holding\s+32064 \+52\s+\d+ ms\s+dc_power", out)
    assert re.search(r"meter \(unit 100, chint-dtsu666.*3 read\(s\)", out)
    cfg = load_site(site)
    cycle = link_budget(cfg, cfg.link("bus1")).cycle_s
    assert f"minimum full cycle: {cycle:.2f} s for 4 device(s), 9 reads" in out
    assert "budget at 9600 baud, 20 ms turnaround" in out
    assert "Modbus TCP: not limited by a serial wire" in out
    assert "warning" not in out
    # A slower device (50 ms turnaround) makes the cycle longer by 9 reads x 30 ms.
    slow = pvgate("plan", "-c", str(site), "--turnaround-ms", "50").stdout
    slow_cycle = float(re.search(r"minimum full cycle: ([\d.]+) s", slow).group(1))  # type: ignore[union-attr]
    assert slow_cycle == pytest.approx(cycle + 9 * 0.030, abs=0.01)


def test_plan_reports_a_site_file_mistake_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "site.yaml"
    bad.write_text("site: {id: x}\nmqtt: {host: 127.0.0.1}\nlinks: []\ndevices: []\n", encoding="utf-8")
    res = pvgate("plan", "-c", str(bad))
    assert res.returncode == 78 and "Traceback" not in res.stderr, res.stderr
