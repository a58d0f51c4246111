"""Plausibility ranges in device maps: `range: [MIN, MAX]` keeps a garbled value from the center."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_config import MAP_HEAD, expect, site_with_map
from test_config import env as env  # noqa: F401 - the fixture

from drivers.decode import decode_points
from drivers.model import DataType, Point, Table
from support.chain import SimDev, sim_cmd, write_site
from support.ports import free_port

REPO = Path(__file__).resolve().parent.parent


def _point(rng: tuple[float, float] | None) -> Point:
    return Point("ac_power", Table.HOLDING, 0, DataType.I32, 2, scale=0.001, unit="kW", range=rng)


@pytest.mark.parametrize(("raw", "ok"), [([0, 50000], True), ([0x0FFF, 0xFFFF], False), ([0xFFFF, 0xFC18], True),
                                         ([0xFFFE, 0x0000], False)])
def test_value_outside_the_range_is_flagged_invalid(raw: list[int], ok: bool) -> None:
    values, quality = decode_points([_point((-10.0, 150.0))], {"ac_power": raw})
    assert ("ac_power" in values) is ok
    assert quality == ([] if ok else ["invalid:ac_power"])
    assert decode_points([_point(None)], {"ac_power": raw})[0]  # no range: every value passes


@pytest.mark.parametrize("bad", ["[1]", "[5, 1]", "[a, b]", "5", "[1, .inf]", "[true, 2]"])
def test_wrong_range_is_a_located_problem(tmp_path: Path, env: dict[str, str], bad: str) -> None:
    site, map_path = site_with_map(tmp_path, "my-inv", MAP_HEAD.format(id="my-inv")
                                   + f"  - {{key: ac_power, address: 100, type: i32, unit: kW, range: {bad}}}\n")
    expect(site, env, (map_path, 4, "points[0].range", "expected [MIN, MAX]"))


def _control(port: int, msg: dict[str, Any]) -> dict[str, Any]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(json.dumps(msg).encode() + b"\n")
        reply: dict[str, Any] = json.loads(sock.makefile().readline())
        return reply


def test_simulated_garbage_is_not_read_as_a_value(procs: Any, tmp_path: Path) -> None:
    """pvgate-sim serves a map with a range; a value set outside it reads as 'not available'."""
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "ranged-inv.yaml").write_text(
        "id: ranged-inv\nname: Ranged inverter\npoints:\n"
        "  - {key: ac_power, address: 100, type: i32, scale: 0.001, unit: kW, range: [-5, 150]}\n"
        "  - {key: temperature, address: 110, type: i16, scale: 0.1, unit: degC, range: [-40, 110], sim: 35}\n")
    port, control = free_port(), free_port()
    sim = procs(sim_cmd(port, [SimDev("inv01", 1, "ranged-inv")], control_port=control)
                + ["--profiles", str(profiles)], "sim")
    sim.wait_for_line(r'^\{"event": "ready"', timeout=15, stream="stdout")
    site = write_site(tmp_path / "site.yaml", site_id="ranged", broker_port=free_port(), modbus_port=port,
                      devices=[SimDev("inv01", 1, "ranged-inv")])
    read = [sys.executable, "-m", "agent.cli", "read", "-c", str(site), "--device", "inv01"]
    assert _control(control, {"unit": 1, "set": {"ac_power": 42.5}})["ok"]
    good = subprocess.run(read, capture_output=True, text=True, timeout=30, cwd=REPO, check=False)
    assert good.returncode == 0 and "42.5" in good.stdout, good.stdout + good.stderr
    assert _control(control, {"unit": 1, "set": {"ac_power": 2000000}})["ok"]  # 2 GW: a garbled register
    bad = subprocess.run(read, capture_output=True, text=True, timeout=30, cwd=REPO, check=False)
    line = next(text for text in bad.stdout.splitlines() if "ac_power" in text)
    assert "not available" in line and "2000000" not in line, bad.stdout
    assert "35" in bad.stdout  # the other point is unaffected
