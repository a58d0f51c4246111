"""invert_power (drivers.sign.apply_sign) and valid_when (conditional points) in decoding."""

from __future__ import annotations

from pathlib import Path

import pytest

from drivers.decode import decode_points
from drivers.devicemap import ProfileLibrary, load_device_map
from drivers.errors import ConfigError
from drivers.model import DataType, Device, Point, Table
from drivers.sign import apply_sign, is_direction_signed, swap_quality

LIBRARY = ProfileLibrary.default()


def test_reversed_meter_flips_powers_and_swaps_counters() -> None:
    read = {"ac_power": -7.2, "phase_a_power": -2.4, "reactive_power": 0.35, "power_factor": -0.998,
            "phase_b_power_factor": 0.99, "energy_import": 8765.25, "energy_export": 12345.5,
            "phase_a_voltage": 230.0, "phase_a_current": 10.5, "grid_frequency": 50.0, "apparent_power": 7.3}
    out = apply_sign(read, True)
    assert out == {"ac_power": 7.2, "phase_a_power": 2.4, "reactive_power": -0.35, "power_factor": 0.998,
                   "phase_b_power_factor": -0.99, "energy_import": 12345.5, "energy_export": 8765.25,
                   "phase_a_voltage": 230.0, "phase_a_current": 10.5, "grid_frequency": 50.0,
                   "apparent_power": 7.3}
    assert read["ac_power"] == -7.2  # the input is not touched


def test_no_inversion_by_default_and_zero_stays_positive() -> None:
    meter = Device("m", "bus1", 11, LIBRARY.get("chint-dtsu666"))
    assert meter.invert_power is False
    assert apply_sign({"ac_power": 1.5, "energy_import": 3}, meter) == {"ac_power": 1.5, "energy_import": 3}
    flipped = apply_sign({"ac_power": 0.0, "phase_a_power": 0}, Device("m", "b", 1, meter.profile, invert_power=True))
    assert repr(flipped["ac_power"]) == "0.0" and flipped["phase_a_power"] == 0


def test_one_missing_counter_moves_with_the_swap() -> None:
    out = apply_sign({"energy_import": 100.0}, True)
    assert out == {"energy_export": 100.0}
    assert swap_quality(["invalid:energy_export", "decode:ac_power", "clock:unsynced"], True) == [
        "invalid:energy_import", "decode:ac_power", "clock:unsynced"]
    assert swap_quality(["invalid:energy_export"], False) == ["invalid:energy_export"]


@pytest.mark.parametrize("key", ["ac_power", "phase_c_power", "reactive_power", "power_factor",
                                 "phase_a_reactive_power", "phase_a_power_factor"])
def test_signed_keys(key: str) -> None:
    assert is_direction_signed(key)


@pytest.mark.parametrize("key", ["apparent_power", "dc_power", "phase_a_apparent_power", "pv1_power",
                                 "energy_total", "peak_power_today"])
def test_unsigned_keys(key: str) -> None:
    assert not is_direction_signed(key)


def _pt(key: str, address: int, valid_when: tuple[str, tuple[int, ...]] | None = None) -> Point:
    return Point(key, Table.INPUT, address, DataType.U16, 1, valid_when=valid_when)


def test_valid_when_omits_and_flags_the_point_outside_its_states() -> None:
    points = [_pt("status", 0), _pt("fault_code", 1, ("status", (0x5500, 0x9100)))]
    assert decode_points(points, {"status": [0x5500], "fault_code": [39]}) == ({"status": 0x5500, "fault_code": 39}, [])
    assert decode_points(points, {"status": [0x9100], "fault_code": [70]})[0]["fault_code"] == 70
    assert decode_points(points, {"status": [0x0000], "fault_code": [39]}) == ({"status": 0}, ["invalid:fault_code"])
    # The state was not read this poll: the code cannot be trusted either.
    assert decode_points(points, {"fault_code": [39]}) == ({}, ["invalid:fault_code"])


def test_sungrow_fault_code_is_conditional() -> None:
    point = LIBRARY.get("sungrow-sg").point("fault_code")
    assert point.valid_when == ("status", (0x5500, 0x9100))
    assert LIBRARY.get("sungrow-sg-ktlm").point("fault_code").valid_when == point.valid_when


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "acme-x.yaml"
    path.write_text("id: acme-x\nsource: test\npoints:\n" + text, encoding="utf-8")
    return path


@pytest.mark.parametrize(("text", "message"), [
    ("  - {key: code, address: 1, type: u16, valid_when: {point: state, in: [1]}}\n", "no other point 'state'"),
    ("  - {key: code, address: 1, type: u16, valid_when: {point: code, in: [1]}}\n", "no other point 'code'"),
    ("  - {key: state, address: 0, type: u16}\n  - {key: code, address: 1, type: u16, valid_when: {point: state}}\n",
     "valid_when.in"),
    ("  - {key: state, address: 0, type: u16}\n"
     "  - {key: code, address: 1, type: u16, valid_when: {point: state, in: [], when: 1}}\n", "valid_when"),
])
def test_valid_when_mistakes_are_reported_with_their_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_device_map(_write(tmp_path, text), ProfileLibrary([tmp_path]), expect_id="acme-x")
    problems = "\n".join(str(p) for p in err.value.problems)
    assert message in problems and "acme-x.yaml:" in problems


def test_sunspec_vendor_sign_flips_power_but_not_counters() -> None:
    from agent.poller.vendor import vendor_values
    from drivers.sign import sunspec_meter_exports_positive

    assert sunspec_meter_exports_positive("SolarEdge ") and not sunspec_meter_exports_positive("Fronius")
    # pvgate's SunSpec meter points negate W: a SolarEdge meter exporting 5 kW (W = +5000) decodes
    # as -5.0; the vendor correction makes it +5.0 and leaves the counters alone.
    read = {"ac_power": -5.0, "phase_a_power": -1.7, "energy_import": 10.0, "energy_export": 20.0}
    assert vendor_values(read, "SolarEdge", "") == {
        "ac_power": 5.0, "phase_a_power": 1.7, "energy_import": 10.0, "energy_export": 20.0}
    assert vendor_values(read, "Fronius", "") == read
