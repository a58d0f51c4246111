"""The JSON Schemas for editors (docs/schemas) accept what pvgate ships, and catch the typical slips.

`pvgate check` stays the authority; the schemas only give an editor completion and early squiggles.
The YAML is read by pvgate's own loader, so YAML 1.2 scalars are what the schema sees.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

jsonschema = pytest.importorskip("jsonschema")

from drivers.yamlsrc import load_file, load_text  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SCHEMAS = REPO / "docs" / "schemas"
PROFILES = sorted((REPO / "config" / "profiles").glob("*.yaml"))


def _plain(value: Any) -> Any:
    """LDict/LList and dates as JSON would see them."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _validator(name: str) -> Any:
    schema = json.loads((SCHEMAS / name).read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _errors(name: str, data: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator(name).iter_errors(_plain(data))]


def test_example_site_file_matches_the_schema() -> None:
    assert _errors("site.json", load_file(REPO / "config" / "examples" / "site.yaml")) == []


def test_there_are_profiles() -> None:
    assert len(PROFILES) >= 5


@pytest.mark.parametrize("profile", PROFILES, ids=[p.stem for p in PROFILES])
def test_shipped_device_maps_match_the_schema(profile: Path) -> None:
    assert _errors("device-map.json", load_file(profile)) == []


@pytest.mark.parametrize(("text", "where"), [
    ("site: {id: Gucheng_1}\nmqtt: {host: x}\nlinks: []\ndevices: []\n", "site/id"),
    ("site: {id: a}\nmqtt: {host: x, prot: 1883}\nlinks: []\ndevices: []\n", "mqtt"),
    ("site: {id: a}\nmqtt: {host: x}\nlinks: [{id: b, type: rtu, parity: none}]\ndevices: []\n", "links/0/parity"),
    ("site: {id: a}\nmqtt: {host: x}\nlinks: [{id: b, type: tcp}]\n"
     "devices: [{id: d, link: b, profile: p, invert_power: yes}]\n", "devices/0/invert_power"),
    ("site: {id: a}\nmqtt: {host: x}\nlinks: [{id: b, type: tcp}]\n"
     "devices: [{id: d, link: b, profile: p, interval: fast}]\n", "devices/0/interval"),
])
def test_site_schema_catches_slips(text: str, where: str) -> None:
    errors = _errors("site.json", load_text(text, "x.yaml"))
    assert any(e.startswith(where) for e in errors), errors


def test_map_schema_catches_slips() -> None:
    data = load_text("id: x\npoints:\n  - {key: p, address: 1, type: int8}\n  - {key: q, adress: 2, type: u16}\n", "m")
    errors = _errors("device-map.json", data)
    assert any(e.startswith("points/0/type") for e in errors), errors
    assert any(e.startswith("points/1") and "adress" in e for e in errors), errors
