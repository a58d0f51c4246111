"""YAML as a technician means it: YAML 1.2 numbers and booleans, not PyYAML's YAML 1.1.

Each trap goes through `pvgate check` (exit 78, file:line, no traceback) and load_site, with the
helpers of tests/test_config.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_config import BASE, L_DEV_INV_INTERVAL, L_DEV_METER_UNIT, MAP_HEAD, edit, expect, site_with_map, write
from test_config import env as env  # noqa: F401 - the fixture

from drivers.yamlsrc import load_text


def test_address_with_leading_zero_is_refused(tmp_path: Path, env: dict[str, str]) -> None:
    # YAML 1.1 reads 0100 as octal 64: the wrong register, silently.
    site, map_path = site_with_map(tmp_path, "my-inv", MAP_HEAD.format(id="my-inv")
                                   + "  - {key: ac_power, address: 0100, type: i32, unit: kW}\n")
    out = expect(site, env, (map_path, 4, "", "0100: a number with a leading zero is ambiguous"))
    assert "write 100, or 0x0100 if it is hex" in out
    assert "octal 64" in out


def test_unit_with_leading_zero_is_refused(tmp_path: Path, env: dict[str, str]) -> None:
    path = write(tmp_path, edit(BASE, "    unit: 11\n", "    unit: 010\n"))
    out = expect(path, env, (L_DEV_METER_UNIT, "", "010: a number with a leading zero is ambiguous"))
    assert "write 10" in out


def test_sexagesimal_interval_is_not_60(tmp_path: Path, env: dict[str, str]) -> None:
    # YAML 1.1 reads 1:00 as 60 (base 60); a technician may mean one minute or one hour.
    path = write(tmp_path, edit(BASE, "    interval: 10s\n", "    interval: 1:00\n"))
    expect(path, env, (L_DEV_INV_INTERVAL, "devices[0].interval", "got '1:00'; h:mm or m:ss is not read"))


@pytest.mark.parametrize("word", ["yes", "no", "on", "off", "Yes", "OFF", "y"])
def test_yes_no_on_off_are_not_booleans(tmp_path: Path, env: dict[str, str], word: str) -> None:
    path = write(tmp_path, edit(BASE, "    interval: 5s\n", f"    interval: 5s\n    invert_power: {word}\n"))
    expect(path, env, (30, "devices[1].invert_power",
                       f"expected true or false, got text '{word}'; write true or false"))


@pytest.mark.parametrize("word", ["true", "false", "True", "FALSE"])
def test_true_false_are_booleans(word: str) -> None:
    assert load_text(f"a: {word}\n", "x.yaml") == {"a": word.lower() == "true"}


@pytest.mark.parametrize(("text", "value"), [
    ("0", 0), ("-7", -7), ("+3", 3), ("100", 100), ("0x0100", 256), ("0o17", 15),
    ("1.5", 1.5), ("1e3", 1000.0), ("-.5", -0.5), (".inf", float("inf")), ("-.Inf", float("-inf")),
    ("1:00", "1:00"), ("1_000", "1_000"), ("yes", "yes"), ("off", "off"), ("0b101", "0b101"),
])
def test_yaml_1_2_scalars(text: str, value: object) -> None:
    assert load_text(f"a: {text}\n", "x.yaml") == {"a": value}


def test_nan_is_a_float() -> None:
    got = load_text("a: .nan\n", "x.yaml")["a"]
    assert isinstance(got, float) and got != got


def test_quoted_leading_zero_is_text() -> None:
    assert load_text("a: '0100'\n", "x.yaml") == {"a": "0100"}


def test_on_as_a_key_stays_on() -> None:
    # YAML 1.1 turns the key `on:` into True.
    assert list(load_text("on: 1\n", "x.yaml")) == ["on"]
