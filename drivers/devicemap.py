"""Device maps (profiles): YAML files that describe a device model's points, checked and typed.

The shipped library lives in config/profiles/; a site may keep its own maps beside its site
file, which win over shipped ones of the same id. docs/device-maps.md is the reference.
"""

from __future__ import annotations

import importlib.resources
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from drivers.codec import SENTINEL_SETS
from drivers.errors import N_, ConfigError
from drivers.model import DataType, DeviceMap, Point, Table, WordOrder
from drivers.pointfields import plausible_range, valid_when
from drivers.yamlsrc import Checker, LDict, load_file

KEY_RE = re.compile(r"^[a-z][a-z0-9_]*$")
ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
# A top-level key only device maps have: tells a map from the site file or a simulator file
# when both live in the site's directory.
_MAP_MARK = re.compile(r"^(points|extends|sunspec)\s*:", re.MULTILINE)

TABLES = {"holding": Table.HOLDING, "input": Table.INPUT, "coil": Table.COIL, "discrete": Table.DISCRETE}
TYPE_NAMES = tuple(t.name_ for t in DataType)
MAP_KEYS = ("id", "name", "source", "extends", "defaults", "read", "identity", "points", "sunspec")
POINT_KEYS = (
    "key", "table", "address", "type", "count", "word_order", "byte_order", "scale", "offset",
    "scale_factor", "unit", "counter", "invalid", "enum", "bits", "publish", "sim", "valid_when", "range",
)
DEFAULT_KEYS = ("table", "word_order", "byte_order", "invalid", "address_offset")
IDENTITY_KEYS = ("model", "serial", "rated_power_kw", "manufacturer", "firmware", "device_time")


def shipped_profile_dirs() -> list[Path]:
    """Where the shipped library is: package data drivers/profiles, read with importlib.resources.

    In a checkout drivers/profiles is a link to config/profiles (the source of truth); a wheel
    holds the files themselves, so the maps are found in a venv, a --user or a system install.
    """
    shipped = Path(str(importlib.resources.files("drivers").joinpath("profiles")))
    return [shipped] if shipped.is_dir() else []


class ProfileLibrary:
    """Finds device maps by id in an ordered list of directories and caches them."""

    def __init__(self, dirs: list[Path], mixed: tuple[Path, ...] = ()) -> None:
        self.dirs = dirs
        self.mixed = mixed  # directories that also hold other YAML (the site file's own)
        self._cache: dict[str, DeviceMap] = {}

    @classmethod
    def default(cls, site_dir: Path | None = None) -> ProfileLibrary:
        dirs = [site_dir / "profiles", site_dir] if site_dir else []
        return cls([d for d in dirs if d.is_dir()] + shipped_profile_dirs(),
                   (site_dir,) if site_dir else ())

    def ids(self) -> list[str]:
        found = {p.stem for d in self.dirs for p in d.glob("*.yaml")
                 if d not in self.mixed or _looks_like_map(p)}
        return sorted(i for i in found if ID_RE.match(i))

    def find(self, profile_id: str) -> Path | None:
        for d in self.dirs:
            path = d / f"{profile_id}.yaml"
            if path.is_file():
                return path
        return None

    def get(self, profile_id: str, _chain: tuple[str, ...] = ()) -> DeviceMap:
        if profile_id in self._cache:
            return self._cache[profile_id]
        path = self.find(profile_id)
        if path is None:
            raise KeyError(profile_id)
        dmap = load_device_map(path, self, _chain + (profile_id,), expect_id=profile_id)
        self._cache[profile_id] = dmap
        return dmap


def _looks_like_map(path: Path) -> bool:
    try:
        return _MAP_MARK.search(path.read_text(encoding="utf-8", errors="replace")) is not None
    except OSError:
        return False


def load_device_map(path: Path, library: ProfileLibrary, chain: tuple[str, ...] = (),
                    expect_id: str | None = None) -> DeviceMap:
    """Load and check one map; expect_id is the id it was looked up by (its file name)."""
    data = load_file(path)
    chk = Checker(str(path))
    root = chk.mapping(data, "", 1, MAP_KEYS)
    if root is None:
        chk.raise_if_any()
        raise AssertionError("unreachable")
    map_id = chk.get(root, "id", "", str, required=True) or path.stem
    if not ID_RE.match(map_id):
        chk.problem(chk.line_of(root, "id"), "id", N_("use lower-case letters, digits and '-'"))
    elif expect_id is not None and map_id != expect_id:
        # Site files name maps by file; an id that differs would publish under another name.
        chk.problem(chk.line_of(root, "id"), "id",
                    N_("{id!r} differs from the file name {file}; make them the same"), id=map_id, file=path.name)
    parent = _parent(root, chk, library, chain)
    defaults = _defaults(root, chk)
    read = chk.mapping(root.get("read", LDict()), "read", chk.line_of(root, "read"),
                       ("max_block", "max_gap", "holes")) if "read" in root else None
    lines: dict[str, int] = {}
    points = _points(root.get("points"), chk, defaults, root, lines) if "points" in root else []
    identity = _identity(root, chk, defaults)
    merged = _merge(parent.points if parent else (), points)
    _check_overlaps(merged, lines, chk, parent.id if parent else "")
    _check_conditions(merged, lines, chk)
    max_block = parent.max_block if parent else 125
    max_gap = parent.max_gap if parent else 16
    holes: list[tuple[Table, int, int]] = list(parent.holes) if parent else []
    if read is not None:
        max_block = chk.get(read, "max_block", "read", int, max_block)
        if not 1 <= max_block <= 125:
            chk.problem(chk.line_of(read, "max_block"), "read.max_block", N_("expected 1..125"))
        max_gap = chk.get(read, "max_gap", "read", int, max_gap)
        if max_gap < 0:
            chk.problem(chk.line_of(read, "max_gap"), "read.max_gap", N_("expected 0 or more registers"))
        holes += _holes(read, chk, defaults)
    chk.raise_if_any()
    return DeviceMap(
        id=map_id,
        name=chk.get(root, "name", "", str, parent.name if parent else map_id),
        source=chk.get(root, "source", "", str, parent.source if parent else ""),
        points=tuple(merged),
        identity=tuple(_merge(parent.identity if parent else (), identity)),
        max_block=max_block,
        max_gap=max_gap,
        holes=tuple(holes),
        path=str(path),
        sunspec=bool(chk.get(root, "sunspec", "", bool, parent.sunspec if parent else False)),
    )


def _parent(root: LDict, chk: Checker, library: ProfileLibrary, chain: tuple[str, ...]) -> DeviceMap | None:
    name = chk.get(root, "extends", "", str)
    if name is None:
        return None
    line = chk.line_of(root, "extends")
    if name in chain:
        chk.problem(line, "extends", N_("circular: {chain}"), chain=' -> '.join(chain + (name,)))
        return None
    try:
        return library.get(name, chain)
    except KeyError:
        chk.problem(line, "extends", N_("no device map {id!r}; known: {known}"), id=name,
                    known=', '.join(library.ids()))
    except ConfigError as err:
        chk.problems.extend(err.problems)
        chk.problem(line, "extends", N_("device map {id!r} has errors (above)"), id=name)
    return None


def _defaults(root: LDict, chk: Checker) -> dict[str, Any]:
    out: dict[str, Any] = {"table": "holding", "word_order": "big", "byte_order": "big",
                           "invalid": "none", "address_offset": 0}
    if "defaults" not in root:
        return out
    node = chk.mapping(root["defaults"], "defaults", chk.line_of(root, "defaults"), DEFAULT_KEYS)
    if node is None:
        return out
    # Checked here, once: every point takes these as given, and a wrong one would otherwise
    # surface as a KeyError or ValueError deep inside _point.
    out["table"] = chk.choice(node, "table", "defaults", TABLES, out["table"])
    out["word_order"] = chk.choice(node, "word_order", "defaults", ("big", "little"), out["word_order"])
    out["byte_order"] = chk.choice(node, "byte_order", "defaults", ("big", "little"), out["byte_order"])
    out["address_offset"] = chk.get(node, "address_offset", "defaults", int, 0)
    if "invalid" in node:
        value = node["invalid"]
        ok = (value is None or value in ("none", *SENTINEL_SETS)
              or (isinstance(value, int) and not isinstance(value, bool))
              or (isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)))
        if ok:
            out["invalid"] = value
        else:
            chk.problem(chk.line_of(node, "invalid"), "defaults.invalid",
                        N_("expected none, {sets}, a raw number or a list of raw numbers"), sets=', '.join(SENTINEL_SETS))
    return out


def _points(node: Any, chk: Checker, defaults: dict[str, Any], root: LDict,
            seen: dict[str, int]) -> list[Point]:
    """The valid points; seen gets the line of each point's key."""
    out: list[Point] = []
    for i, item, line in chk.sequence(node, "points", chk.line_of(root, "points")):
        point = _point(item, f"points[{i}]", line, chk, defaults)
        if point is None:
            continue
        if point.key in seen:
            chk.problem(line, f"points[{i}].key", N_("duplicate key {key!r} (first at line {first})"),
                        key=point.key, first=seen[point.key])
            continue
        seen[point.key] = line
        out.append(point)
    known = {p.key for p in out}
    for p in out:
        if p.scale_factor is not None and p.scale_factor not in known:
            chk.problem(seen[p.key], f"points.{p.key}.scale_factor", N_("no point {key!r} in this map"),
                        key=p.scale_factor)
    return out


def _identity(root: LDict, chk: Checker, defaults: dict[str, Any]) -> list[Point]:
    if "identity" not in root:
        return []
    node = chk.mapping(root["identity"], "identity", chk.line_of(root, "identity"), IDENTITY_KEYS)
    if node is None:
        return []
    out = []
    for key, item in node.items():
        if isinstance(item, LDict) and "key" not in item:
            # Keep the entry's own lines, so a mistake inside it is reported where it is.
            named = LDict(item, key=key)
            named.line, named.key_lines, named.duplicates = item.line, dict(item.key_lines), list(item.duplicates)
            item = named
        point = _point(item, f"identity.{key}", node.key_lines[key], chk, defaults)
        if point is not None:
            out.append(replace(point, publish=False))
    return out


def _point(item: Any, path: str, line: int, chk: Checker, defaults: dict[str, Any]) -> Point | None:
    node = chk.mapping(item, path, line, POINT_KEYS)
    if node is None:
        return None
    before = len(chk.problems)
    key = chk.get(node, "key", path, str, required=True)
    if key is not None and not KEY_RE.match(key):
        chk.problem(chk.line_of(node, "key"), f"{path}.key", N_("use snake_case: a-z, 0-9 and _"))
    table = TABLES[chk.choice(node, "table", path, TABLES, defaults["table"]) or "holding"]
    type_name = chk.choice(node, "type", path, TYPE_NAMES, None)
    if type_name is None and "type" not in node:
        chk.problem(node.line, f"{path}.type", N_("required key is missing; one of {types}"),
                    types=', '.join(TYPE_NAMES))
    dtype = DataType.parse(type_name) if type_name else DataType.U16
    address = chk.get(node, "address", path, int, required=True)
    if address is not None:
        address += int(defaults.get("address_offset", 0))
    count = _count(node, path, chk, dtype, table)
    if address is not None and not 0 <= address <= 65535:
        shift = int(defaults.get("address_offset", 0))
        chk.problem(chk.line_of(node, "address"), f"{path}.address",
                    N_("expected 0..65535 (0-based PDU address) after defaults.address_offset {shift}") if shift
                    else N_("expected 0..65535 (0-based PDU address)"), shift=shift)
    elif address is not None and address + count > 65536:
        chk.problem(chk.line_of(node, "address"), f"{path}.address",
                    N_("the point's {count} registers run past 65535"), count=count)
    scale = chk.get(node, "scale", path, float, 1.0)
    if scale == 0:
        chk.problem(chk.line_of(node, "scale"), f"{path}.scale", N_("must not be 0"))
    word = chk.choice(node, "word_order", path, ("big", "little"), defaults["word_order"])
    byte = chk.choice(node, "byte_order", path, ("big", "little"), defaults["byte_order"])
    point = Point(
        key=key or "?", table=table, address=address or 0, type=dtype, count=count,
        word_order=WordOrder(word or "big"), byte_swap=byte == "little",
        scale=scale or 1.0, offset=chk.get(node, "offset", path, float, 0.0),
        scale_factor=chk.get(node, "scale_factor", path, str),
        unit=chk.get(node, "unit", path, str, ""),
        counter=chk.get(node, "counter", path, bool, False),
        invalid=_invalid(node, path, chk, dtype, defaults),
        enum=_code_table(node, "enum", path, chk),
        bits=_code_table(node, "bits", path, chk),
        publish=chk.get(node, "publish", path, bool, dtype is not DataType.SUNSSF),
        sim=chk.get(node, "sim", path, (int, float, str), None, expected="a number or text"),
        valid_when=valid_when(node, path, chk),
        range=plausible_range(node, path, chk),
    )
    return point if len(chk.problems) == before else None


def _count(node: LDict, path: str, chk: Checker, dtype: DataType, table: Table) -> int:
    if table.is_bit:
        bits: int = chk.get(node, "count", path, int, 1)
        if not 1 <= bits <= 2000:
            chk.problem(chk.line_of(node, "count"), f"{path}.count", N_("expected 1..2000 bits"))
            return 1
        return bits
    if dtype is DataType.STRING:
        count = chk.get(node, "count", path, int, None, required=True)
        if count is not None and not 1 <= count <= 125:
            chk.problem(chk.line_of(node, "count"), f"{path}.count", N_("expected 1..125 registers"))
        return count or 1
    if "count" in node and node["count"] != dtype.words:
        chk.problem(chk.line_of(node, "count"), f"{path}.count", N_("{type} is always {words} register(s)"),
                    type=dtype.name_, words=dtype.words)
    return dtype.words


def _invalid(node: LDict, path: str, chk: Checker, dtype: DataType, defaults: dict[str, Any]) -> tuple[int, ...]:
    value = node.get("invalid", defaults.get("invalid", "none"))
    if value == "none" or value is None:
        return ()
    if isinstance(value, str) and value in SENTINEL_SETS:
        return SENTINEL_SETS[value].get(dtype, ())
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return tuple(value)
    chk.problem(chk.line_of(node, "invalid"), f"{path}.invalid",
                N_("expected none, sunspec, max, a raw number or a list of raw numbers"))
    return ()


def _code_table(node: LDict, key: str, path: str, chk: Checker) -> tuple[tuple[int, str], ...]:
    if key not in node:
        return ()
    table = node[key]
    if not isinstance(table, dict) or not all(isinstance(k, str) and _int(k) is not None for k in table):
        chk.problem(chk.line_of(node, key), f"{path}.{key}", N_("expected a mapping of numbers to texts"))
        return ()
    return tuple(sorted((_int(k) or 0, str(v)) for k, v in table.items()))


def _int(text: str) -> int | None:
    try:
        return int(text, 0)
    except ValueError:
        return None


def _holes(read: LDict, chk: Checker, defaults: dict[str, Any]) -> list[tuple[Table, int, int]]:
    """Register ranges never to be read, written like the points (same table and numbering defaults)."""
    out: list[tuple[Table, int, int]] = []
    shift = int(defaults.get("address_offset", 0))
    if "holes" not in read:
        return out
    for i, item, line in chk.sequence(read["holes"], "read.holes", chk.line_of(read, "holes")):
        node = chk.mapping(item, f"read.holes[{i}]", line, ("table", "from", "to"))
        if node is None:
            continue
        path = f"read.holes[{i}]"
        table = TABLES[chk.choice(node, "table", path, TABLES, defaults["table"]) or defaults["table"]]
        first = chk.get(node, "from", path, int, required=True)
        last = chk.get(node, "to", path, int, first)
        if first is None or last is None:
            continue
        if last < first:
            chk.problem(chk.line_of(node, "to"), f"{path}.to", N_("must not be below from ({first})"), first=first)
            continue
        out.append((table, first + shift, last + shift))
    return out


def _merge(parent: tuple[Point, ...] | list[Point], own: list[Point]) -> list[Point]:
    """A child's point replaces its parent's point of the same key; new ones are appended."""
    own_keys = {p.key for p in own}
    return [p for p in parent if p.key not in own_keys] + own


def _check_conditions(points: list[Point], lines: dict[str, int], chk: Checker) -> None:
    """A `valid_when` must name another point of the map, one that is read every poll."""
    keys = {p.key for p in points}
    for p in points:
        if p.valid_when is None or p.key not in lines:
            continue
        state = p.valid_when[0]
        if state == p.key or state not in keys:
            chk.problem(lines[p.key], f"points.{p.key}.valid_when.point",
                        N_("no other point {key!r} in this map"), key=state)


def _check_overlaps(points: list[Point], lines: dict[str, int], chk: Checker, parent_id: str) -> None:
    """Two points on the same registers; reported at the line of this file's point."""
    ordered = sorted(points, key=lambda p: (p.table.value, p.address))
    widest: Point | None = None  # of the points so far in this table, the one that ends last
    for p in ordered:
        if widest is not None and widest.table is p.table and p.address < widest.end:
            # The parent's own overlaps were reported when it was loaded; only this file's count.
            if p.key in lines or widest.key in lines:
                here, other = (p, widest) if p.key in lines else (widest, p)
                chk.problem(lines[here.key], f"points.{here.key}",
                            N_("registers {first}..{last} overlap {other!r} ({other_first}..{other_last}) in the "
                               "{table} table") if other.key in lines else
                            N_("registers {first}..{last} overlap {other!r} (from {parent}) ({other_first}..{other_last}) "
                               "in the {table} table"),
                            first=here.address, last=here.end - 1, other=other.key, parent=parent_id,
                            other_first=other.address, other_last=other.end - 1, table=p.table.name.lower())
        if widest is None or widest.table is not p.table or p.end > widest.end:
            widest = p
