"""Golden tests: hand-made register dumps of each shipped device map and their expected values.

Each tests/golden/<profile-id>.yaml holds a register dump (table -> {0-based address: raw
register}) written from the vendor document, and the values and quality flags worked out by hand
from it. The test plans the device's reads exactly as the agent does, slices the dump into the
planned blocks, decodes them, and compares. A second group of tests holds every shipped map to
the library's conventions (source cited, canonical keys and units, no overlaps, a golden file).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from drivers.codec import decode_point
from drivers.decode import decode_blocks
from drivers.devicemap import KEY_RE, ProfileLibrary
from drivers.model import DeviceMap, Point, Table
from drivers.plan import plan_device

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
TABLES = {"holding": Table.HOLDING, "input": Table.INPUT, "coil": Table.COIL, "discrete": Table.DISCRETE}
GOLDEN_IDS = sorted(p.stem for p in GOLDEN_DIR.glob("*.yaml"))

LIBRARY = ProfileLibrary.default()
SHIPPED_IDS = LIBRARY.ids()


def _load_golden(profile_id: str) -> dict[str, Any]:
    data = yaml.safe_load((GOLDEN_DIR / f"{profile_id}.yaml").read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{profile_id}: golden file is not a mapping"
    assert data.get("profile") == profile_id, f"{profile_id}: 'profile' must name the file's map"
    return data


def _dump(golden: dict[str, Any]) -> dict[Table, dict[int, int]]:
    dump: dict[Table, dict[int, int]] = {}
    for table_name, regs in golden["registers"].items():
        table = TABLES[table_name]
        dump[table] = {}
        for address, value in regs.items():
            assert isinstance(address, int) and isinstance(value, int), (table_name, address, value)
            assert 0 <= value <= 0xFFFF, f"{table_name} {address}: {value:#x} is not a register"
            dump[table][address] = value
    return dump


def _regs(dump: dict[Table, dict[int, int]], table: Table, start: int, count: int) -> list[int]:
    """What the device answers for a read; registers not in the dump (gaps) read as 0."""
    regs = dump.get(table, {})
    return [regs.get(address, 0) for address in range(start, start + count)]


def _assert_value(key: str, got: Any, want: Any) -> None:
    if isinstance(want, bool) or isinstance(want, str):
        assert got == want, f"{key}: got {got!r}, expected {want!r}"
    elif isinstance(want, int):
        assert got == want and isinstance(got, int) and not isinstance(got, bool), (
            f"{key}: got {got!r}, expected the integer {want!r}"
        )
    else:
        assert isinstance(got, (int, float)) and not isinstance(got, bool), f"{key}: got {got!r}"
        # Every golden float32 is exactly representable and integers scale exactly: only the
        # binary noise of scaling (0.1 x 3) is tolerated.
        assert got == pytest.approx(want, rel=1e-9, abs=1e-9), f"{key}: got {got!r}, expected {want!r}"


@pytest.mark.parametrize("profile_id", GOLDEN_IDS)
def test_golden_dump_covers_every_point(profile_id: str) -> None:
    """Every register of every point (and of every identity point checked) is written out in
    the dump, not left to the implicit 0 of a gap."""
    golden = _load_golden(profile_id)
    dmap = LIBRARY.get(profile_id)
    dump = _dump(golden)
    checked_identity = set(golden["expected"].get("identity") or {})
    points = [*dmap.points, *(p for p in dmap.identity if p.key in checked_identity)]
    missing = [
        f"{p.key} ({p.table.name.lower()} {address})"
        for p in points
        for address in range(p.address, p.end)
        if address not in dump.get(p.table, {})
    ]
    assert not missing, f"registers missing from the dump: {missing}"


@pytest.mark.parametrize("profile_id", GOLDEN_IDS)
def test_golden_values(profile_id: str) -> None:
    golden = _load_golden(profile_id)
    dmap = LIBRARY.get(profile_id)
    dump = _dump(golden)
    blocks = plan_device(dmap)
    registers = {i: _regs(dump, b.table, b.start, b.count) for i, b in enumerate(blocks)}

    values, quality = decode_blocks(blocks, registers)

    expected = golden["expected"]
    want_values: dict[str, Any] = expected.get("values") or {}
    want_quality: list[str] = expected.get("quality") or []
    assert sorted(values) == sorted(want_values), (
        f"published keys differ: extra {sorted(set(values) - set(want_values))}, "
        f"missing {sorted(set(want_values) - set(values))}"
    )
    for key, want in want_values.items():
        _assert_value(key, values[key], want)
    assert sorted(quality) == sorted(want_quality)
    assert len(quality) == len(set(quality)), f"duplicate quality flags: {quality}"


@pytest.mark.parametrize("profile_id", GOLDEN_IDS)
def test_golden_identity(profile_id: str) -> None:
    golden = _load_golden(profile_id)
    dmap = LIBRARY.get(profile_id)
    dump = _dump(golden)
    want: dict[str, Any] = golden["expected"].get("identity") or {}
    by_key = {p.key: p for p in dmap.identity}
    assert set(want) <= set(by_key), f"unknown identity keys {sorted(set(want) - set(by_key))}"
    for key, value in want.items():
        point = by_key[key]
        got = decode_point(point, _regs(dump, point.table, point.address, point.count))
        _assert_value(f"identity.{key}", got, value)


# --- the shipped library --------------------------------------------------------------------

# Canonical keys (docs/device-maps.md) and their units; a pattern matches the whole key.
CANONICAL_UNITS: dict[str, str] = {
    r"ac_power": "kW",
    r"reactive_power": "kvar",
    r"apparent_power": "kVA",
    r"power_factor": "",
    r"phase_[abc]_power_factor": "",
    r"grid_frequency": "Hz",
    r"phase_[abc]_voltage": "V",
    r"line_(ab|bc|ca)_voltage": "V",
    r"phase_[abc]_current": "A",
    r"phase_[abc]_power": "kW",
    r"dc_power": "kW",
    r"pv\d+_voltage": "V",
    r"pv\d+_current": "A",
    r"pv\d+_power": "kW",
    r"energy_total": "kWh",
    r"energy_today": "kWh",
    r"energy_import": "kWh",
    r"energy_export": "kWh",
    r"[a-z_]*temperature": "°C",
    r"insulation_resistance": "MΩ",
    r"efficiency": "%",
    r"running_hours": "h",
}
COUNTERS = ("energy_total", "energy_import", "energy_export")
# Names that mean a canonical quantity under another name: use the canonical key instead.
NON_CANONICAL = {
    "active_power": "ac_power", "total_active_power": "ac_power", "power": "ac_power",
    "pac": "ac_power", "p_ac": "ac_power", "frequency": "grid_frequency", "fac": "grid_frequency",
    "pf": "power_factor", "temperature": "internal_temperature", "temp": "internal_temperature",
    "total_energy": "energy_total", "e_total": "energy_total", "yield_total": "energy_total",
    "daily_energy": "energy_today", "e_day": "energy_today", "energy_daily": "energy_today",
    "ppv": "dc_power", "input_power": "dc_power", "riso": "insulation_resistance",
    "import_energy": "energy_import", "export_energy": "energy_export",
    "voltage_a": "phase_a_voltage", "current_a": "phase_a_current", "state": "status",
}


def _canonical_unit(key: str) -> str | None:
    for pattern, unit in CANONICAL_UNITS.items():
        if re.fullmatch(pattern, key):
            return unit
    return None


def test_library_is_not_empty() -> None:
    assert {"huawei-sun2000", "chint-dtsu666", "sungrow-sg", "eastron-sdm630", "goodwe-dt",
            "growatt-tl3x"} <= set(SHIPPED_IDS)


@pytest.mark.parametrize("profile_id", SHIPPED_IDS)
def test_shipped_map_conventions(profile_id: str) -> None:
    dmap = LIBRARY.get(profile_id)  # the loader itself rejects overlapping points
    assert dmap.source.strip(), f"{profile_id}: every shipped map cites its source document"
    assert dmap.id == profile_id
    problems = []
    for p in (*dmap.points, *dmap.identity):
        if not KEY_RE.match(p.key) or "__" in p.key or p.key.endswith("_"):
            problems.append(f"{p.key}: not snake_case")
        if p.key in NON_CANONICAL:
            problems.append(f"{p.key}: use the canonical key {NON_CANONICAL[p.key]!r}")
        unit = _canonical_unit(p.key)
        if unit is not None and p.unit != unit:
            problems.append(f"{p.key}: unit {p.unit!r}, canonical is {unit!r}")
        if p.key in COUNTERS and not p.counter:
            problems.append(f"{p.key}: a lifetime energy must be `counter: true`")
    assert not problems, f"{profile_id}: {problems}"


@pytest.mark.parametrize("profile_id", SHIPPED_IDS)
def test_shipped_map_has_no_overlaps(profile_id: str) -> None:
    dmap = LIBRARY.get(profile_id)
    _assert_no_overlap(profile_id, dmap.points)
    _assert_no_overlap(profile_id, dmap.identity)


def _assert_no_overlap(profile_id: str, points: tuple[Point, ...]) -> None:
    ordered = sorted(points, key=lambda p: (p.table.value, p.address))
    for a, b in zip(ordered, ordered[1:]):
        assert not (a.table is b.table and b.address < a.end), (
            f"{profile_id}: {b.key} ({b.address}..{b.end - 1}) overlaps {a.key} ({a.address}..{a.end - 1})"
        )


@pytest.mark.parametrize("profile_id", SHIPPED_IDS)
def test_shipped_map_has_golden_file(profile_id: str) -> None:
    dmap: DeviceMap = LIBRARY.get(profile_id)
    if dmap.sunspec:
        pytest.skip("SunSpec maps are discovered at run time; they have no fixed register dump")
    assert (GOLDEN_DIR / f"{profile_id}.yaml").is_file(), (
        f"add tests/golden/{profile_id}.yaml: a hand-made register dump and its expected values"
    )


def test_every_golden_file_names_a_shipped_map() -> None:
    assert set(GOLDEN_IDS) <= set(SHIPPED_IDS)


# --- meters: one sign convention ------------------------------------------------------------

METER_IDS = [i for i in SHIPPED_IDS if not LIBRARY.get(i).sunspec
             and {"energy_import", "energy_export"} & {p.key for p in LIBRARY.get(i).points}]


@pytest.mark.parametrize("profile_id", METER_IDS)
def test_exporting_meter_publishes_positive_power(profile_id: str) -> None:
    """Every meter map has a golden dump of an exporting station, written with the raw words
    the meter holds by its vendor's own sign, and publishes it as ac_power > 0 (export)."""
    golden = _load_golden(profile_id)
    assert golden.get("exporting") is True, (
        f"{profile_id}: its golden file must describe an exporting station (exporting: true)"
    )
    dmap = LIBRARY.get(profile_id)
    dump = _dump(golden)
    blocks = plan_device(dmap)
    values, _ = decode_blocks(blocks, {i: _regs(dump, b.table, b.start, b.count) for i, b in enumerate(blocks)})
    power = values.get("ac_power")
    assert isinstance(power, (int, float)) and power > 0, f"{profile_id}: ac_power {power!r} while exporting"
    phases = [values[k] for k in ("phase_a_power", "phase_b_power", "phase_c_power") if k in values]
    assert all(isinstance(p, (int, float)) and p > 0 for p in phases), f"{profile_id}: phase powers {phases}"
