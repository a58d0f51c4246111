"""`pvgate scan`: find the Modbus devices on a link while commissioning a station.

scan walks unit ids on one link, one transaction at a time. A unit that stays silent on the first
read (the SunSpec marker at holding 40000) is taken as absent, so an empty address costs one
timeout (`--thorough` probes every map even then). A unit that answers is asked for the SunSpec
marker at 40000, 50000 and 0 and, if it has none, checked against every shipped device map:
the map's identity block and the block with its grid voltages/frequency are read and decoded,
and the map matches when nothing decodes badly, nothing is implausible, and at least one value
is positive evidence (a grid voltage or frequency in range, a readable model or serial, a known
model code). All-zero answers prove nothing. The best match is suggested with its evidence.

The link options, `Probe`, `read_points`, value formatting and the `read` command are in
agent.commission.probe; `add_commands` registers both commands, and `python -m agent.commission.scan` runs either.
Exit codes: 0 found, 1 nothing found, 64 usage, 69 link unavailable, 78 configuration error.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

from agent.commission.probe import (
    EX_NOT_FOUND,
    EX_OK,
    Probe,
    add_link_options,
    add_read,
    format_value,
    read_points,
    resolve_target,
    run_command,
)
from agent.i18n import _
from drivers.devicemap import ProfileLibrary
from drivers.errors import ConfigError, DeviceError
from drivers.link import LinkClient
from drivers.model import DeviceMap, Link, Point, Value
from drivers.plan import plan_device, plan_reads
from drivers.sunspec import BASES, MARKER, DiscoveryError, device_map, discover, model_title, without_scale_factors

MAX_EVIDENCE = 6


# --- command line -------------------------------------------------------------------------------


def add_commands(sub: Any) -> None:
    scan = sub.add_parser("scan", help=_("find the units on a link and suggest a device map for each"))
    add_link_options(scan)
    scan.add_argument("--units", type=_units, default=list(range(1, 248)), metavar="LIST",
                      help=_("unit ids: 1-247 (default), 1,2,11 or 1-10,20"))
    scan.add_argument("--thorough", action="store_true", help=_("also probe units silent on the first read"))
    scan.add_argument("-q", "--quiet", action="store_true", help=_("no progress bar"))
    scan.set_defaults(func=cmd_scan)

    add_read(sub)


def _units(text: str) -> list[int]:
    units: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise argparse.ArgumentTypeError(_("{text!r}: expected e.g. 1-247 or 1,2,11").format(text=text))
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if not 0 <= lo <= hi <= 255:
            raise argparse.ArgumentTypeError(_("{text!r}: unit ids are 0..255 (1..247 on a serial bus)").format(
                text=part.strip()))
        units += [u for u in range(lo, hi + 1) if u not in units]
    return units


def cmd_scan(args: argparse.Namespace) -> int:
    return run_command(args, _scan_main)


# --- scan -------------------------------------------------------------------------------------


@dataclass
class Finding:
    unit: int
    profile: str | None  # suggested device map id; None: answers, but no map matches
    name: str = ""
    evidence: list[str] = field(default_factory=list)
    others: list[str] = field(default_factory=list)
    meter: bool = False


async def _scan_main(args: argparse.Namespace) -> int:
    target = resolve_target(args)
    maps, sunspec_map = _vendor_maps(target.library)
    client = LinkClient(target.link)
    progress = Progress(len(args.units), enabled=not args.quiet)
    found: list[Finding] = []
    try:
        await client.connect()
        for i, unit in enumerate(args.units):
            progress.draw(i, unit)
            finding = await scan_unit(Probe(client, unit, target.link.timeout), maps, sunspec_map, args.thorough)
            if finding is not None:
                found.append(finding)
                progress.clear()
                print(_finding_text(finding), flush=True)
        progress.draw(len(args.units), None)
        progress.done()
    finally:
        client.close()
    print(_summary(found, target.link, args))
    return EX_OK if found else EX_NOT_FOUND


def _vendor_maps(library: ProfileLibrary) -> tuple[list[DeviceMap], DeviceMap | None]:
    maps: list[DeviceMap] = []
    sunspec_map = None
    for map_id in library.ids():
        try:
            dmap = library.get(map_id)
        except ConfigError as err:
            print(_("pvgate: skipping device map {id!r}: {problem}").format(id=map_id, problem=err.problems[0].text(_)),
                  file=sys.stderr)
            continue
        if dmap.sunspec:
            sunspec_map = sunspec_map or dmap
        elif dmap.points:
            maps.append(dmap)
    return maps, sunspec_map


async def scan_unit(probe: Probe, maps: list[DeviceMap], sunspec_map: DeviceMap | None,
                    thorough: bool = False) -> Finding | None:
    answered = False
    for base in BASES:
        try:
            regs = await probe.holding(base, 2)
        except DeviceError as err:
            if _absent(err) and not answered and not thorough:
                return None  # silent on the first read: nobody at this address
            answered = answered or not _absent(err)
            continue
        answered = True
        if tuple(regs) == MARKER:
            return await _sunspec_finding(probe, base, sunspec_map)
    matches: list[tuple[int, DeviceMap, list[str]]] = []
    for dmap in maps:
        try:
            verdict = await judge_map(probe, dmap)
        except DeviceError as err:
            answered = answered or not _absent(err)
            continue
        answered = True
        if verdict is not None:
            matches.append((verdict[0], dmap, verdict[1]))
    if not matches:
        return Finding(probe.unit, None, evidence=[_("answers, but matches no shipped device map")]) if answered else None
    matches.sort(key=lambda m: -m[0])
    _score, best, evidence = matches[0]
    return Finding(probe.unit, best.id, best.name, evidence[:MAX_EVIDENCE], [m[1].id for m in matches[1:]],
                   meter="meter" in best.name.lower())


def _absent(err: DeviceError) -> bool:
    """No answer, or a TCP gateway saying that nobody answered behind it (exceptions 10, 11)."""
    return err.exception_code in (None, 10, 11)


async def _sunspec_finding(probe: Probe, base: int, sunspec_map: DeviceMap | None) -> Finding:
    profile = sunspec_map.id if sunspec_map else "sunspec"
    name = sunspec_map.name if sunspec_map else _("SunSpec device")
    evidence = [_("SunSpec marker at {base}").format(base=base)]
    try:
        disc = await discover(probe.holding, bases=(base,))
    except (DiscoveryError, DeviceError) as err:
        return Finding(probe.unit, profile, name, evidence + [_("model chain not readable: {error}").format(error=err)])
    evidence.append(_("models {models}").format(models=", ".join(f"{m.id} {model_title(m.id)}" for m in disc.models)))
    dmap = device_map(disc)
    try:
        identity, _quality = await read_points(probe, without_scale_factors(dmap.identity), dmap)
        evidence += [f"{k} {format_value(None, v)}" for k, v in identity.items()]
    except DeviceError:
        evidence.append(_("identity not readable"))
    meter = all(m.id == 1 or 200 < m.id < 220 for m in disc.models)
    return Finding(probe.unit, profile, name, evidence, meter=meter)


IDENTITY_TEXTS = ("model", "serial", "manufacturer")
ANCHORS = ((re.compile(r"phase_[abc]_voltage"), 50.0, 500.0), (re.compile(r"line_(ab|bc|ca)_voltage"), 80.0, 900.0),
           (re.compile(r"grid_frequency"), 45.0, 65.0))
RANGES = ((re.compile(r"(pv\d+|dc)_voltage"), 0.0, 1500.0), (re.compile(r".*current"), -5000.0, 5000.0),
          (re.compile(r".*power"), -1e5, 1e5), (re.compile(r"energy_.*"), 0.0, 1e10),
          (re.compile(r".*temperature"), -40.0, 150.0), (re.compile(r".*power_factor"), -1.001, 1.001),
          (re.compile(r"efficiency"), 0.0, 100.5), (re.compile(r"rated_power_kw"), 0.0, 1e4))


def plausibility(point: Point, value: Value) -> int:
    """2: positive evidence; 1: plausible and not zero; 0: says nothing; -1: implausible."""
    identity = point.key in IDENTITY_TEXTS
    if isinstance(value, str):
        if not (value.isprintable() and value.isascii()):
            return -1
        return 2 if identity and len(value) >= 3 else 1
    if point.enum and isinstance(value, int):
        return 0 if not value or value not in dict(point.enum) else (2 if identity else 1)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value == 0:
        return 0
    for pattern, lo, hi in ANCHORS:
        if pattern.fullmatch(point.key):
            return 2 if lo <= value <= hi else -1
    for pattern, lo, hi in RANGES:
        if pattern.fullmatch(point.key):
            return 1 if lo <= value <= hi else -1
    return 0


def probe_points(dmap: DeviceMap) -> list[list[Point]]:
    """What a scan reads of a map: its first identity block and the block with its grid values."""
    out: list[list[Point]] = []
    if dmap.identity:
        ident = plan_reads(without_scale_factors(dmap.identity), dmap.max_block, dmap.max_gap, dmap.holes)
        out.append(list(ident[0].points))
    blocks = plan_device(dmap)
    grid = [b for b in blocks if any(pat.fullmatch(p.key) for p in b.points for pat, _lo, _hi in ANCHORS)]
    if grid or blocks:
        out.append(list((grid or blocks)[0].points))
    return out


async def judge_map(probe: Probe, dmap: DeviceMap) -> tuple[int, list[str]] | None:
    """(score, evidence) when the unit looks like this map; None when it does not."""
    score, anchors, evidence = 0, 0, []
    for points in probe_points(dmap):
        try:
            values, quality = await read_points(probe, points, dmap, strict=True)
        except DeviceError as err:
            if _absent(err):
                raise
            return None  # the registers are not there
        if any(q.startswith("decode:") for q in quality):
            return None
        score -= sum(q.startswith("invalid:") for q in quality)
        for point in points:
            if point.key not in values:
                continue
            verdict = plausibility(point, values[point.key])
            if verdict < 0:
                return None
            score += 3 * verdict if verdict == 2 else verdict
            if verdict == 2:
                anchors += 1
                unit = f" {point.unit}" if point.unit else ""
                evidence.append(f"{point.key} {format_value(point, values[point.key])}{unit}")
    return (score, evidence) if anchors else None


class Progress:
    """`[#####     ] 12/247 unit 12` on stderr, redrawn in place."""

    def __init__(self, total: int, enabled: bool = True, stream: TextIO | None = None, width: int = 30) -> None:
        self.total, self.enabled, self.width = max(total, 1), enabled, width
        self.stream = stream or sys.stderr
        self._last = ""

    def draw(self, done: int, unit: int | None) -> None:
        filled = self.width * done // self.total
        bar = "#" * filled + " " * (self.width - filled)
        self._last = f"[{bar}] {done}/{self.total}" + (_(" unit {unit}").format(unit=unit) if unit is not None else "")
        self._write("\r" + self._last)

    def clear(self) -> None:
        self._write("\r" + " " * len(self._last) + "\r")

    def done(self) -> None:
        self._write("\n")

    def _write(self, text: str) -> None:
        if self.enabled:
            self.stream.write(text)
            self.stream.flush()


def _finding_text(f: Finding) -> str:
    if f.profile is None:
        return _("unit {unit}: ? ({evidence})").format(unit=f.unit, evidence="; ".join(f.evidence))
    lines = [_("unit {unit}: {profile} ({name})").format(unit=f.unit, profile=f.profile, name=f.name),
             _("    evidence: {evidence}").format(evidence="; ".join(f.evidence))]
    if f.others:
        lines.append(_("    also plausible: {maps}").format(maps=", ".join(f.others)))
    return "\n".join(lines)


def _summary(found: list[Finding], link: Link, args: argparse.Namespace) -> str:
    mapped = [f for f in found if f.profile]
    if not found:
        return _("no unit answered on {type} {endpoint} (units {units})").format(
            type=link.type.value, endpoint=link.endpoint, units=_span(args.units))
    lines = [_("{n} unit(s) answered on {type} {endpoint}; for the site file:").format(
        n=len(found), type=link.type.value, endpoint=link.endpoint)]
    if not args.config:
        if link.serial is not None:
            s = link.serial
            lines += ["links:", f"  - {{id: {link.id}, type: rtu, port: {s.port}, baudrate: {s.baudrate}, "
                                f"parity: {s.parity}}}"]
        else:
            lines += ["links:", f"  - {{id: {link.id}, type: {link.type.value}, host: {link.host}, port: {link.port}}}"]
    lines.append("devices:")
    for f in mapped:
        dev_id = f"{'meter' if f.meter else 'inv'}{f.unit:02d}"
        lines.append(f"  - {{id: {dev_id}, link: {link.id}, unit: {f.unit}, profile: {f.profile}}}")
    return "\n".join(lines)


def _span(units: list[int]) -> str:
    if units and units == list(range(units[0], units[-1] + 1)):
        return f"{units[0]}-{units[-1]}"
    return ",".join(map(str, units))
