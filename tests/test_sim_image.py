"""pvgate-sim serving register images: a device that is not our map of it.

The images in config/images/ are written from the vendors' register tables. Served over Modbus
TCP, a read inside a hole is refused with exception 2, present registers come back as the image's
words, and our maps decode them to the values the vendor table gives for those words.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pymodbus.client import ModbusTcpClient

from drivers.decode import decode_points
from drivers.devicemap import ProfileLibrary
from drivers.errors import ConfigError
from drivers.model import Table
from drivers.plan import plan_device
from simulator.cli import _device_arg
from simulator.image import RegisterImage, load_image
from support.ports import free_port

IMAGES = Path(__file__).resolve().parent.parent / "config" / "images"
HUAWEI = IMAGES / "huawei-sun2000-50ktl-m3.yaml"
CHINT = IMAGES / "chint-dtsu666.yaml"
LIBRARY = ProfileLibrary.default()

# What the vendor tables say the image's words mean, worked out from the image comments.
HUAWEI_EXPECTED: dict[str, Any] = {
    "ac_power": 48.21, "dc_power": 49.57, "reactive_power": -1.25, "power_factor": 0.993,
    "grid_frequency": 50.01, "efficiency": 97.26, "internal_temperature": 51.2,
    "insulation_resistance": 2.85, "status": 0x0200, "fault_code": 0, "energy_total": 123456.78,
    "energy_today": 183.21, "phase_a_current": 69.45, "line_ab_voltage": 400.5,
    "phase_c_voltage": 230.8, "pv1_voltage": 612.3, "pv1_current": 10.21, "pv4_current": 10.02,
    "state_1": 6, "alarm_1": 0, "peak_power_today": 48.8,
}
CHINT_EXPECTED: dict[str, Any] = {
    "ac_power": 7.2, "phase_a_power": 2.4, "phase_b_power": 2.38, "phase_c_power": 2.42,
    "phase_a_voltage": 230.0, "line_ab_voltage": 400.0, "phase_b_current": 10.25,
    "reactive_power": 0.35, "power_factor": 0.998, "grid_frequency": 50.0,
    "energy_import": 12345.5, "energy_export": 8765.25,
}


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """pvgate-sim with unit 1 = the Huawei image and unit 11 = the DTSU666 image."""
    import subprocess

    port = free_port()
    log = tmp_path_factory.mktemp("sim") / "sim.log"
    cmd = [sys.executable, "-m", "simulator.cli", "--listen", f"tcp://127.0.0.1:{port}",
           "--device", f"1:huawei-sun2000:image={HUAWEI}", "--device", f"11:chint-dtsu666:image={CHINT}",
           "--night", "standby"]  # the image's words at any hour: this test is not about the night
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert json.loads(line)["event"] == "ready", (line, log.read_text())
            yield port
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def _client(port: int) -> ModbusTcpClient:
    client = ModbusTcpClient("127.0.0.1", port=port, timeout=3)
    assert client.connect()
    return client


def test_reads_inside_holes_are_refused_with_exception_2(sim: int) -> None:
    client = _client(sim)
    try:
        for unit, address, count in ((1, 32011, 1), (1, 32000, 24), (1, 32097, 9), (1, 30065, 3), (11, 0x2022, 2),
                                     (11, 0x2000, 44)):
            rr = client.read_holding_registers(address, count=count, device_id=unit)
            assert rr.isError() and rr.exception_code == 2, (unit, address, count, rr)
    finally:
        client.close()


def test_present_registers_are_the_image_words(sim: int) -> None:
    client = _client(sim)
    try:
        for unit, path, address, count in ((1, HUAWEI, 30000, 65), (1, HUAWEI, 30068, 15), (1, HUAWEI, 32064, 33),
                                           (11, CHINT, 0x2000, 34), (11, CHINT, 0x101E, 20)):
            words = load_image(path).tables[Table.HOLDING]
            rr = client.read_holding_registers(address, count=count, device_id=unit)
            assert not rr.isError(), (unit, address, rr)
            assert rr.registers == [words[a] for a in range(address, address + count)]
    finally:
        client.close()


@pytest.mark.parametrize(("unit", "profile", "expected"), [
    (1, "huawei-sun2000", HUAWEI_EXPECTED), (11, "chint-dtsu666", CHINT_EXPECTED)])
def test_our_map_decodes_the_vendor_image(sim: int, unit: int, profile: str, expected: dict[str, Any]) -> None:
    """Each planned block is read; a block the image refuses is read point by point, as the
    poller ends up doing after it learned the device's holes."""
    dmap = LIBRARY.get(profile)
    client = _client(sim)
    raw: dict[str, list[int]] = {}
    refused = 0
    try:
        for block in plan_device(dmap):
            rr = client.read_holding_registers(block.start, count=block.count, device_id=unit)
            if not rr.isError():
                raw.update({p.key: rr.registers[p.address - block.start:p.end - block.start] for p in block.points})
                continue
            refused += 1
            for p in block.points:
                single = client.read_holding_registers(p.address, count=p.count, device_id=unit)
                assert not single.isError(), f"{profile}: {p.key} at {p.address} is not in the image"
                raw[p.key] = single.registers
    finally:
        client.close()
    assert refused >= 1, "the strict image refuses at least one block the map plans across a hole"
    values, quality = decode_points(dmap.points, raw)
    assert quality == []
    for key, want in expected.items():
        assert values[key] == pytest.approx(want, abs=1e-9), key


def test_image_file_problems_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("tables:\n  holding:\n    100: 0x10000\n    101: [1, 2]\n    102: 3\n  inputs:\n    1: 1\n",
                   encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_image(bad)
    text = "\n".join(str(p) for p in err.value.problems)
    assert ":3:" in text and "0xffff" in text            # a word too large
    assert ":5:" in text and "given twice" in text       # 102 is already 101's second word
    assert ":6:" in text and "inputs" in text            # unknown table


def test_register_image_read_rules() -> None:
    image = RegisterImage({Table.INPUT: {10: 1, 11: 2, 13: 4}})
    assert image.read(Table.INPUT, 10, 2) == [1, 2]
    assert image.read(Table.INPUT, 11, 3) == 2            # 12 is a hole
    assert image.read(Table.HOLDING, 10, 1) == 2          # a table the device does not have
    assert image.read(Table.INPUT, 13, 0) == 2


def test_device_argument_takes_an_image() -> None:
    spec = _device_arg("3:chint-dtsu666:image=/tmp/x:y.yaml")
    assert (spec.unit, spec.profile, spec.image) == (3, "chint-dtsu666", "/tmp/x:y.yaml")
    spec = _device_arg("3:huawei-sun2000:80:image=a.yaml")
    assert (spec.rated_kw, spec.image) == (80.0, "a.yaml")


def test_simulator_file_image_is_relative_to_the_file(tmp_path: Path) -> None:
    from simulator.cli import _load_spec

    (tmp_path / "sim.yaml").write_text(
        "listeners:\n  - listen: tcp://127.0.0.1:1502\n    devices:\n"
        "      - {unit: 11, profile: chint-dtsu666, image: images/dtsu.yaml}\n", encoding="utf-8")
    spec = _load_spec(tmp_path / "sim.yaml")
    assert spec.listeners[0].devices[0].image == str((tmp_path / "images" / "dtsu.yaml").resolve())
