"""`pvgate read`, and what both commissioning commands share: a link to a live device and reading it.

The link is a site file's (-c SITE --link ID, or --device) or an ad-hoc one (--tcp, --rtu-over-tcp,
--rtu); ad-hoc links get a short timeout and no retries. `Probe` is one unit on such a link,
`read_points` reads and decodes points of a device map, `format_value` shows a value the way a
technician reads it, and `run_command` turns user mistakes and dead links into one line and an exit code.

read prints the points of a device map (SunSpec maps are discovered first), or raw registers
decoded as a type. Exit codes: 0 found / read, 1 nothing found or read, 64 usage, 69 link
unavailable, 78 configuration error. docs/commissioning.md is the technician's guide.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from drivers.codec import decode_point
from drivers.decode import active_bits, decode_blocks
from drivers.devicemap import TYPE_NAMES, ProfileLibrary
from drivers.errors import ConfigError, DecodeError, DeviceError, LinkError, Problem
from drivers.link import LinkClient
from drivers.model import DataType, DeviceMap, Link, LinkType, Point, SerialSettings, Table, Value, WordOrder
from drivers.plan import plan_reads
from drivers.sunspec import DiscoveryError, device_map, discover, model_title, without_scale_factors

EX_OK, EX_NOT_FOUND, EX_USAGE, EX_UNAVAILABLE, EX_CONFIG = 0, 1, 64, 69, 78
DEFAULT_TIMEOUT = 0.3
TABLES = {"holding": Table.HOLDING, "input": Table.INPUT}
EXCEPTIONS = {1: " (illegal function: try the other --table)", 2: " (illegal data address: no such registers)",
              3: " (illegal data value: try fewer registers)", 4: " (device failure)", 6: " (busy: try again)"}


class UsageError(Exception):
    """A command-line mistake: message and exit 64."""


# --- command line -------------------------------------------------------------------------------


def add_read(sub: Any) -> None:
    read = sub.add_parser("read", help="read a device map's points, or raw registers, from a live device")
    add_link_options(read)
    read.add_argument("--unit", type=int, default=None, help="unit id (default 1, or the --device's)")
    read.add_argument("--device", help="a device of the site file (-c): its link, unit and map")
    read.add_argument("--profile", help="device map id, e.g. huawei-sun2000 or sunspec")
    read.add_argument("--points", help="only these keys, comma-separated")
    read.add_argument("--register", type=_address, help="raw read from this 0-based address (0x.. allowed)")
    read.add_argument("--type", choices=TYPE_NAMES, default="u16", help="type of --register (default u16)")
    read.add_argument("--table", choices=tuple(TABLES), default="holding")
    read.add_argument("--word-order", choices=("big", "little"), default="big")
    read.add_argument("--byte-order", choices=("big", "little"), default="big")
    read.add_argument("--count", type=int, default=None, help="registers, for --type string")
    read.add_argument("--scale", type=float, default=1.0, help="multiply the raw value by this")
    read.set_defaults(func=cmd_read)


def add_link_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("link: a site file's, or an ad-hoc one")
    g.add_argument("-c", "--config", help="site file (YAML)")
    g.add_argument("--link", help="link id in the site file")
    g.add_argument("--tcp", metavar="HOST:PORT", help="Modbus TCP")
    g.add_argument("--rtu-over-tcp", metavar="HOST:PORT", help="RTU frames through a serial server / DTU")
    g.add_argument("--rtu", metavar="DEVICE", help="serial port, e.g. /dev/ttyUSB0")
    g.add_argument("--baudrate", type=int, default=9600)
    g.add_argument("--parity", choices=("N", "E", "O"), default="N")
    g.add_argument("--stopbits", type=int, choices=(1, 2), default=1)
    g.add_argument("--timeout", type=float, default=None, help=f"seconds per answer (default {DEFAULT_TIMEOUT})")
    g.add_argument("-v", "--verbose", action="store_true", help="show pymodbus's own messages")


def _address(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number such as 32080 or 0x2000") from None
    if not 0 <= value <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"{text}: expected 0..65535 (0-based PDU address)")
    return value


@dataclass
class Target:
    link: Link
    library: ProfileLibrary
    unit: int | None = None
    profile: str | None = None


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":") if ":" in text else (text, "", "502")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(f"{text!r}: expected HOST:PORT, e.g. 192.168.1.20:502")
    return host, int(port)


def resolve_target(args: argparse.Namespace) -> Target:
    adhoc = [o for o in ("tcp", "rtu_over_tcp", "rtu") if getattr(args, o)]
    if args.config:
        if adhoc:
            raise UsageError("give either -c SITE --link ID, or --tcp / --rtu-over-tcp / --rtu, not both")
        return _site_target(args)
    if len(adhoc) != 1:
        raise UsageError("say where to look: --tcp HOST:PORT, --rtu-over-tcp HOST:PORT, --rtu DEVICE, "
                         "or -c SITE --link ID")
    timeout = args.timeout or DEFAULT_TIMEOUT
    if args.rtu:
        serial = SerialSettings(args.rtu, args.baudrate, args.parity, args.stopbits)
        link = Link("bus1", LinkType.RTU, serial=serial, timeout=timeout, retries=0, inter_frame_s=0.02)
    else:
        host, port = _host_port(args.tcp or args.rtu_over_tcp)
        kind = LinkType.TCP if args.tcp else LinkType.RTU_OVER_TCP
        link = Link("lan" if args.tcp else "dtu1", kind, host=host, port=port, timeout=timeout, retries=0,
                    inter_frame_s=0.0 if args.tcp else 0.02)
    return Target(link, ProfileLibrary.default())


def _site_target(args: argparse.Namespace) -> Target:
    from agent.config import load_site

    cfg = load_site(args.config)
    library = ProfileLibrary.default(Path(args.config).resolve().parent)
    unit = profile = None
    link_id = args.link
    if getattr(args, "device", None):
        dev = next((d for d in cfg.devices if d.id == args.device), None)
        if dev is None:
            known = ", ".join(d.id for d in cfg.devices)
            raise UsageError(f"no device {args.device!r} in {args.config}; devices: {known}")
        link_id, unit, profile = link_id or dev.link, dev.unit, dev.profile.id
    if link_id is None:
        if len(cfg.links) != 1:
            raise UsageError(f"give --link, one of: {', '.join(link.id for link in cfg.links)}")
        link_id = cfg.links[0].id
    link = next((lk for lk in cfg.links if lk.id == link_id), None)
    if link is None:
        raise UsageError(f"no link {link_id!r} in {args.config}; links: {', '.join(lk.id for lk in cfg.links)}")
    link = replace(link, timeout=args.timeout or link.timeout, retries=0)
    return Target(link, library, unit, profile)


def cmd_read(args: argparse.Namespace) -> int:
    return run_command(args, _read_main)


def run_command(args: argparse.Namespace, body: Any) -> int:
    """Run a command; user mistakes and dead links end in one clear line and an exit code."""
    if not getattr(args, "verbose", False):
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    # Configuration errors, a closed pipe and Ctrl-C are handled by `pvgate`'s main().
    try:
        code: int = asyncio.run(body(args))
        return code
    except UsageError as err:
        print(f"pvgate: {err}", file=sys.stderr)
        return EX_USAGE
    except LinkError as err:
        # The agent's reconnect backoff ("next try in ...") means nothing to a one-shot command.
        print(f"pvgate: {re.sub(r' [(]next try in [^)]*[)]', '', str(err))}", file=sys.stderr)
        return EX_UNAVAILABLE
    except (DeviceError, DiscoveryError) as err:
        print(f"pvgate: {err}", file=sys.stderr)
        return EX_NOT_FOUND


# --- reading --------------------------------------------------------------------------------


class Probe:
    """One unit on one link. LinkClient adds the wire time of request and reply at the link's
    baud rate to the timeout, so `timeout` is only how long the device may take to answer."""

    def __init__(self, client: LinkClient, unit: int, timeout: float) -> None:
        self.client = client
        self.unit = unit
        self.timeout = timeout

    async def read(self, table: Table, address: int, count: int) -> list[int]:
        return await self.client.read(table, address, count, self.unit, self.timeout)

    async def holding(self, address: int, count: int) -> list[int]:
        return await self.read(Table.HOLDING, address, count)


async def read_points(probe: Probe, points: list[Point], dmap: DeviceMap,
                      strict: bool = False) -> tuple[dict[str, Value], list[str]]:
    """Read and decode points (plus the scale factors they need); refused blocks become flags.

    strict: any exception answer raises instead (a probe wants all or nothing).
    """
    by_key = {p.key: p for p in (*dmap.points, *dmap.identity)}
    wanted = {p.key: p for p in points}
    for p in points:
        if p.scale_factor and p.scale_factor in by_key:
            wanted.setdefault(p.scale_factor, by_key[p.scale_factor])
    blocks = plan_reads(wanted.values(), dmap.max_block, dmap.max_gap, dmap.holes)
    registers: dict[int, list[int]] = {}
    refused: list[str] = []
    for i, block in enumerate(blocks):
        try:
            registers[i] = await probe.read(block.table, block.start, block.count)
        except DeviceError as err:
            if strict or err.exception_code is None:
                raise
            refused += [f"refused:{p.key}" for p in block.points if p.publish]
    values, quality = decode_blocks(blocks, registers)
    return values, [q for q in quality if not q.startswith("unread:")] + refused


def format_value(point: Point | None, value: Value) -> str:
    if point is not None and point.enum and isinstance(value, int):
        text = dict(point.enum).get(value)
        return f"{value} ({text})" if text else str(value)
    if point is not None and point.bits and isinstance(value, int):
        names = active_bits(point, value)
        return f"0x{value:0{point.count * 4}X}" + (f" ({', '.join(names)})" if names else "")
    if isinstance(value, float):
        return f"{value:.10g}"
    return repr(value) if isinstance(value, str) else str(value)


# --- read -------------------------------------------------------------------------------------


async def _read_main(args: argparse.Namespace) -> int:
    target = resolve_target(args)
    unit = args.unit if args.unit is not None else (target.unit if target.unit is not None else 1)
    profile_id = args.profile or target.profile
    if (args.register is None) == (profile_id is None):
        raise UsageError("give --profile ID (or --device with -c) or --register ADDR, one of them")
    dmap = _profile(target.library, profile_id) if profile_id else None
    client = LinkClient(target.link)
    try:
        await client.connect()
        probe = Probe(client, unit, target.link.timeout)
        if dmap is None:
            return await _read_register(probe, args)
        return await _read_profile(probe, dmap, args.points)
    finally:
        client.close()


def _profile(library: ProfileLibrary, profile_id: str) -> DeviceMap:
    try:
        return library.get(profile_id)
    except KeyError:
        raise ConfigError([_problem(f"unknown device map {profile_id!r}; known: {', '.join(library.ids())}")]) from None


def _problem(message: str) -> Problem:
    return Problem("--profile", 0, "", message)


async def _read_profile(probe: Probe, dmap: DeviceMap, keys: str | None) -> int:
    if dmap.sunspec:
        disc = await discover(probe.holding)
        print(f"SunSpec at {disc.base}: " + ", ".join(f"{m.id} {model_title(m.id)} @{m.address}" for m in disc.models))
        dmap = device_map(disc, dmap.name, dmap.id)
    points = [p for p in dmap.points if p.publish]
    identity = without_scale_factors(dmap.identity)
    if keys:
        wanted = [k.strip() for k in keys.split(",") if k.strip()]
        known = {p.key: p for p in (*points, *identity) if p.publish}
        unknown = [k for k in wanted if k not in known]
        if unknown:
            raise UsageError(f"{dmap.id} has no point {', '.join(unknown)}; points: {', '.join(known)}")
        points, identity = [known[k] for k in wanted], []
    rows: list[tuple[str, str, str, str]] = []
    read_any = False
    for group in (identity, points):
        if not group:
            continue
        values, quality = await read_points(probe, [p for p in group if p.publish], dmap)
        read_any = read_any or bool(values)
        flags = {q.split(":", 1)[1]: q.split(":", 1)[0] for q in quality}
        for p in group:
            if not p.publish:
                continue
            shown = format_value(p, values[p.key]) if p.key in values else f"- ({_flag_text(flags.get(p.key))})"
            rows.append((p.key, shown, p.unit, f"{p.table.name.lower()} {p.address}"))
    print(_table(("key", "value", "unit", "register"), rows))
    return EX_OK if read_any else EX_NOT_FOUND


def _flag_text(flag: str | None) -> str:
    return {"invalid": "not available", "refused": "refused: illegal address", "decode": "undecodable",
            "unsupported": "refused"}.get(flag or "", "not read")


async def _read_register(probe: Probe, args: argparse.Namespace) -> int:
    dtype = DataType.parse(args.type)
    if dtype is DataType.STRING and not args.count:
        raise UsageError("--type string needs --count (registers)")
    count = args.count or dtype.words
    if args.count and dtype is not DataType.STRING and args.count != dtype.words:
        raise UsageError(f"{dtype.name_} is always {dtype.words} register(s); --count is for strings")
    point = Point("value", TABLES[args.table], args.register, dtype, count, WordOrder(args.word_order),
                  args.byte_order == "little", scale=args.scale)
    try:
        regs = await probe.read(point.table, point.address, count)
    except DeviceError as err:
        if err.exception_code is None:
            raise
        print(f"pvgate: unit {probe.unit} refused {args.table} {args.register}+{count} with exception "
              f"{err.exception_code}{EXCEPTIONS.get(err.exception_code, '')}", file=sys.stderr)
        return EX_NOT_FOUND
    print(f"unit {probe.unit}, {args.table} {args.register} (0x{args.register:04X}), {count} register(s)")
    print("  raw   " + " ".join(f"0x{r:04X}" for r in regs))
    try:
        value = decode_point(point, regs)
    except DecodeError as err:
        value, note = None, str(err)
    else:
        note = "not a number (NaN) or empty" if value is None else ""
    shown = format_value(point, value) if value is not None else f"- ({note})"
    order = f", {args.word_order} word order" if dtype.words > 1 else ""
    print(f"  {dtype.name_:<5} {shown}{order}")
    return EX_OK


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in (header, *rows)]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])
