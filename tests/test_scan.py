"""`pvgate scan` / `pvgate read` over a real pseudo-terminal pair (socat) to the simulator's RTU bus.

The bus serves four units of different vendors: Huawei (1), Sungrow (2), a SunSpec device (5)
and a Chint meter (11), at 9600 baud wire timing. The commands run as subprocesses, as a
technician runs them (`pvgate scan`, `pvgate read`).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from test_sunspec import ServerThread

from drivers.codec import decode_point
from drivers.devicemap import ProfileLibrary
from drivers.model import Table
from simulator.device import Fault, SimDevice
from simulator.physics import PvPlant, SimClock, Sun
from simulator.server import Listen
from simulator.sunspec import make_sim_device
from support.procs import require_tool

TZ = "Asia/Shanghai"
NOON = datetime(2026, 6, 21, 12, 0, tzinfo=ZoneInfo(TZ)).timestamp()
ROOT = Path(__file__).resolve().parent.parent
EXPECTED = {1: "huawei-sun2000", 2: "sungrow-sg", 5: "sunspec", 11: "chint-dtsu666"}
CMD_TIMEOUT_S = 90.0


@dataclass
class RtuBus:
    port: str  # the client's side of the pty pair
    devices: dict[int, SimDevice]


def _wait_for(paths: list[Path], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(p.exists() for p in paths):
            return True
        time.sleep(0.02)
    return False


@pytest.fixture(scope="module")
def rtu_bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RtuBus]:
    socat = require_tool("socat", "/usr/bin/socat")
    tmp = tmp_path_factory.mktemp("pty")
    a, b = tmp / "a", tmp / "b"
    proc = subprocess.Popen([socat, "-d", "-d", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert _wait_for([a, b], 10), "socat did not create the pty pair"
        library = ProfileLibrary.default()
        clock = SimClock(time.time(), NOON, 0.0)  # frozen at noon: what was served is known exactly
        sun = Sun(TZ)

        def sim(unit: int, profile: str, meter: bool = False) -> SimDevice:
            return SimDevice(unit, library.get(profile), PvPlant(seed=unit, meter=meter, sun=sun), clock, Fault())

        devices: dict[int, SimDevice] = {
            1: sim(1, "huawei-sun2000"), 2: sim(2, "sungrow-sg"), 11: sim(11, "chint-dtsu666", meter=True),
            5: make_sim_device(5, PvPlant(seed=5, sun=sun), clock),
        }
        with ServerThread(Listen("rtu", device=str(a), baudrate=9600), devices):
            yield RtuBus(str(b), devices)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def pvgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=CMD_TIMEOUT_S)


def test_scan_finds_four_vendors_and_suggests_their_maps(rtu_bus: RtuBus) -> None:
    started = time.monotonic()
    r = pvgate("scan", "--rtu", rtu_bus.port, "--baudrate", "9600", "--units", "1-12", "--timeout", "0.2")
    elapsed = time.monotonic() - started
    assert r.returncode == 0, r.stdout + r.stderr
    found = dict(re.findall(r"^unit (\d+): (\S+) ", r.stdout, re.M))
    assert {int(k): v for k, v in found.items()} == EXPECTED, r.stdout
    # The evidence names what convinced the scan, and the site-file snippet is ready to paste.
    assert re.search(r"^unit 1: .*\n\s+evidence: model 'SUN2000-50KTL-M3'", r.stdout, re.M), r.stdout
    assert re.search(r"^unit 5: .*\n\s+evidence: SunSpec marker at 40000; models 1 common, 103", r.stdout, re.M)
    assert "model 'SIM-SUNSPEC-50'" in r.stdout
    assert "- {id: meter11, link: bus1, unit: 11, profile: chint-dtsu666}" in r.stdout
    assert "- {id: inv05, link: bus1, unit: 5, profile: sunspec}" in r.stdout
    assert "[##############################] 12/12" in r.stderr, "progress bar on stderr"
    assert "Traceback" not in r.stderr
    assert elapsed < 60


def test_scan_of_empty_addresses_finds_nothing(rtu_bus: RtuBus) -> None:
    r = pvgate("scan", "--rtu", rtu_bus.port, "--units", "3,4,200", "--timeout", "0.1", "-q")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "no unit answered" in r.stdout and r.stderr == ""


def test_read_profile_points_as_a_table(rtu_bus: RtuBus) -> None:
    r = pvgate("read", "--rtu", rtu_bus.port, "--unit", "1", "--profile", "huawei-sun2000",
               "--points", "ac_power,grid_frequency,phase_a_voltage,model", "--timeout", "0.5")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {m[0]: m[1:] for m in re.findall(r"^(\w+)\s+(\S+)\s+(\S*)\s+holding (\d+)$", r.stdout, re.M)}
    assert set(rows) == {"ac_power", "grid_frequency", "phase_a_voltage", "model"}, r.stdout
    dev = rtu_bus.devices[1]
    served = dev.values_at(NOON)
    for key in ("ac_power", "grid_frequency", "phase_a_voltage"):
        point = dev.profile.point(key)
        regs = dev.read(point.table, point.address, point.count)
        assert isinstance(regs, list)
        assert float(rows[key][0]) == pytest.approx(float(decode_point(point, regs)), abs=abs(point.scale)), key
        assert float(rows[key][0]) == pytest.approx(float(served[key]), abs=abs(point.scale)), key
        assert rows[key][1] == point.unit and int(rows[key][2]) == point.address
    assert rows["model"][0] == "'SUN2000-50KTL-M3'"


def test_read_sunspec_profile_discovers_first(rtu_bus: RtuBus) -> None:
    r = pvgate("read", "--rtu", rtu_bus.port, "--unit", "5", "--profile", "sunspec",
               "--points", "ac_power,meter_ac_power,serial", "--timeout", "0.5")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SunSpec at 40000: 1 common @40002, 103 inverter (three phase) @40070" in r.stdout
    served = rtu_bus.devices[5].values_at(NOON)
    got = dict(re.findall(r"^(\w+)\s+(\S+)", r.stdout, re.M))
    assert float(got["ac_power"]) == pytest.approx(float(served["ac_power"]), abs=0.01)
    assert float(got["meter_ac_power"]) == pytest.approx(float(served["meter_ac_power"]), abs=0.01)
    assert got["serial"] == "'SIM00500005'"


def test_read_raw_register_with_a_type(rtu_bus: RtuBus) -> None:
    r = pvgate("read", "--rtu", rtu_bus.port, "--unit", "11", "--register", "0x2006", "--type", "f32",
               "--timeout", "0.5")
    assert r.returncode == 0, r.stdout + r.stderr
    regs = rtu_bus.devices[11].read(Table.HOLDING, 0x2006, 2)
    assert isinstance(regs, list)
    assert f"raw   0x{regs[0]:04X} 0x{regs[1]:04X}" in r.stdout
    value = float(re.search(r"^\s+f32\s+(\S+),", r.stdout, re.M).group(1))  # type: ignore[union-attr]
    served = float(rtu_bus.devices[11].values_at(NOON)["phase_a_voltage"])
    assert value == pytest.approx(served * 10, abs=0.01), "Chint sends V x10"


def test_read_errors_are_clean(rtu_bus: RtuBus, tmp_path: Path) -> None:
    absent = pvgate("read", "--rtu", rtu_bus.port, "--unit", "7", "--register", "0", "--timeout", "0.1")
    assert absent.returncode == 1 and "no answer from unit 7" in absent.stderr
    refused = pvgate("read", "--rtu", rtu_bus.port, "--unit", "5", "--register", "100", "--timeout", "0.5")
    assert refused.returncode == 1 and "exception 2 (illegal data address" in refused.stderr
    no_port = pvgate("read", "--rtu", str(tmp_path / "nope"), "--unit", "1", "--register", "0")
    assert no_port.returncode == 69 and "cannot open" in no_port.stderr
    unknown = pvgate("read", "--rtu", rtu_bus.port, "--unit", "1", "--profile", "no-such-map")
    assert unknown.returncode == 78 and "unknown device map 'no-such-map'" in unknown.stderr
    for r in (absent, refused, no_port, unknown):
        assert "Traceback" not in r.stderr, r.stderr


# --- the matching rule, without a bus --------------------------------------------------------


class _FakeProbe:
    """Answers every read with the same register value, like a gateway that fills gaps."""

    def __init__(self, fill: int) -> None:
        self.unit = 9
        self.fill = fill

    async def read(self, table: Table, address: int, count: int) -> list[int]:
        return [self.fill] * count


@pytest.mark.parametrize("fill", [0x0000, 0xFFFF, 0x7FFF])
def test_uniform_answers_match_no_shipped_map(fill: int) -> None:
    import asyncio

    from agent.commission.scan import judge_map

    library = ProfileLibrary.default()
    maps = [library.get(i) for i in library.ids() if not library.get(i).sunspec]
    assert len(maps) >= 6
    verdicts = {m.id: asyncio.run(judge_map(_FakeProbe(fill), m)) for m in maps}  # type: ignore[arg-type]
    assert all(v is None for v in verdicts.values()), verdicts


def test_units_option() -> None:
    import argparse

    from agent.commission.scan import _units

    assert _units("1-3,11") == [1, 2, 3, 11]
    assert _units("5") == [5] and _units("1-247")[-1] == 247
    for bad in ("x", "3-1", "1-300", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            _units(bad)
