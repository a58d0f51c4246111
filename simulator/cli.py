"""`pvgate-sim`: serve simulated inverters and meters from the shipped device maps.

    pvgate-sim --listen tcp://127.0.0.1:1502 --device 1:huawei-sun2000 --device 11:chint-dtsu666
    pvgate-sim -c sim.yaml

Inverters sleep at night like string inverters do: from their dusk to their dawn (where the sun
curve is zero, 18:00-06:00 local) they do not answer. `--night standby` (or `--night UNIT:standby`,
`night: standby` in a sim.yaml device, {"unit": 1, "night": "standby"} on the control port) keeps
them answering with zero power and their standby status. Meters always answer.

On start it prints one JSON line ({"event": "ready", ...}) with its listeners and its clock, so
that a test (or a curious technician) knows what was served when. Faults can be set at start
(--fault UNIT:KIND[:ARG]) or at run time through the control port, one JSON object per line:
{"unit": 3, "fault": "silent"}; {"unit": 3, "fault": "slow:0.8:0.5"}; {"unit": 3, "fault": "none"};
{"unit": 1, "set": {"ac_power": 12.345}} (a constant value), {"unit": 1, "unset": ["ac_power"]};
{"unit": 3, "turnaround_ms": 40}; {"cmd": "state"} (requests and answers per unit);
{"cmd": "drop"} (close every TCP connection, like a DTU that reboots). `--chaos SEED[:SECONDS]`
lets faults and broken frames come and go by themselves, the same for the same seed, on every unit
or only on `--chaos-units 3,4` (simulator/chaos.py, simulator/frames.py).

Serial listeners emulate the wire: `rtu:///dev/pts/N?baudrate=9600&parity=N&turnaround_ms=20` holds
each answer back until request and response could have crossed a real 9600-baud line, plus the
unit's turnaround (a pty has no baud rate of its own). `rtu-over-tcp://HOST:PORT?baudrate=9600`
does the same for the serial side of a simulated DTU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from drivers.devicemap import ProfileLibrary
from drivers.errors import ConfigError
from drivers.yamlsrc import Checker, load_file
from simulator.chaos import Chaos, Line, speak
from simulator.chaos import run as run_chaos
from simulator.device import NIGHT_MODES, Fault, SimDevice
from simulator.image import ImageDevice, load_image
from simulator.physics import PvPlant, SimClock, Sun
from simulator.server import Bus, Listen, SerialListener, serve_tcp
from simulator.sunspec import make_sim_device

EX_CONFIG = 78
EX_USAGE = 64


@dataclass
class DeviceSpec:
    unit: int
    profile: str
    rated_kw: float = 50.0
    fault: str = "none"
    turnaround_ms: float | None = None  # None: the listener's
    night: str = "silent"  # inverters between dusk and dawn: silent | standby (meters always answer)
    image: str | None = None  # a register image file served instead of the map (simulator/image.py)


@dataclass
class ListenerSpec:
    listen: str
    devices: list[DeviceSpec] = field(default_factory=list)


@dataclass
class SimSpec:
    listeners: list[ListenerSpec]
    timezone: str = "Asia/Shanghai"
    speed: float = 1.0
    start: str | None = None
    control: str | None = None
    profiles: list[str] = field(default_factory=list)
    chaos: str | None = None  # SEED[:SECONDS], simulator/chaos.py
    chaos_units: str | None = None  # "3,4": only these units are chaotic


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pvgate-sim", description="Modbus PV device simulator")
    p.add_argument("-c", "--config", help="simulator file (YAML) for bigger sites")
    p.add_argument("--listen", help="tcp://HOST:PORT, rtu-over-tcp://HOST:PORT or rtu:///dev/ttyX?baudrate=9600&parity=N")
    p.add_argument("--device", action="append", default=[], metavar="UNIT:PROFILE[:KW][:image=PATH]",
                   help="a unit to serve (repeat); image=PATH serves a register image instead of the map")
    p.add_argument("--fault", action="append", default=[], metavar="UNIT:KIND[:ARG]",
                   help="silent, slow:SECONDS[:P], corrupt[:P], exception:CODE[:P], intermittent:P, busy:P")
    p.add_argument("--turnaround", action="append", default=[], metavar="UNIT:MS",
                   help="a unit's own turnaround (time to start answering), overriding the listener's turnaround_ms")
    p.add_argument("--night", action="append", default=[], metavar="[UNIT:]MODE",
                   help="inverters at night: silent (default: no answer from dusk to dawn) or standby; "
                        "MODE alone sets every unit")
    p.add_argument("--speed", type=float, default=None, help="simulated clock runs N times faster")
    p.add_argument("--start", default=None, help="simulated start, local time: 12:00 or 2026-06-21T12:00")
    p.add_argument("--timezone", default=None, help="site time zone for the sun curve (default Asia/Shanghai)")
    p.add_argument("--control", default=None, help="tcp://HOST:PORT for run-time fault control")
    p.add_argument("--profiles", action="append", default=[], help="extra directory of device maps")
    p.add_argument("--chaos", default=None, metavar="SEED[:SECONDS]",
                   help="faults that come and go: every SECONDS (default 10) each unit draws a new one (seeded)")
    p.add_argument("--chaos-units", default=None, metavar="UNIT[,UNIT...]",
                   help="chaos only for these units; the others on the same bus stay healthy (default: all)")
    args = p.parse_args(argv)
    try:
        spec = _spec(args)
        return asyncio.run(_run(spec))
    except ConfigError as err:
        print("\n".join(str(x) for x in err.problems), file=sys.stderr)
        return EX_CONFIG
    except (ValueError, OSError) as err:
        print(f"pvgate-sim: {err}", file=sys.stderr)
        return EX_USAGE
    except KeyboardInterrupt:
        return 0


def _spec(args: argparse.Namespace) -> SimSpec:
    if args.config:
        spec = _load_spec(Path(args.config))
    elif args.listen:
        spec = SimSpec([ListenerSpec(args.listen, [_device_arg(d) for d in args.device])])
    else:
        raise ValueError("give --listen URL with --device UNIT:PROFILE, or -c sim.yaml")
    if not any(lst.devices for lst in spec.listeners):
        raise ValueError("no devices: add --device UNIT:PROFILE (e.g. --device 1:huawei-sun2000)")
    for text in args.fault:
        unit, _, fault = text.partition(":")
        Fault.parse(fault)
        found = [d for lst in spec.listeners for d in lst.devices if str(d.unit) == unit]
        if not found:
            raise ValueError(f"--fault {text}: no unit {unit}")
        for d in found:
            d.fault = fault
    for text in args.turnaround:
        unit, _, ms = text.partition(":")
        found = [d for lst in spec.listeners for d in lst.devices if str(d.unit) == unit]
        if not found:
            raise ValueError(f"--turnaround {text}: no unit {unit}")
        try:
            value = float(ms)
        except ValueError:
            raise ValueError(f"--turnaround {text}: expected UNIT:MILLISECONDS, e.g. 3:40") from None
        for d in found:
            d.turnaround_ms = value
    for text in args.night:
        _night_arg(spec, text)
    spec.speed = args.speed if args.speed is not None else spec.speed
    spec.start = args.start or spec.start
    spec.timezone = args.timezone or spec.timezone
    try:
        ZoneInfo(spec.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {spec.timezone!r}; expected an IANA name such as Asia/Shanghai") from None
    spec.control = args.control or spec.control
    spec.profiles += args.profiles
    _chaos_args(spec, args.chaos, getattr(args, "chaos_units", None))  # a namespace built by hand may lack it
    return spec


def _chaos_args(spec: SimSpec, chaos_text: str | None, units: str | None) -> None:
    if units and not chaos_text:
        raise ValueError("--chaos-units needs --chaos SEED[:SECONDS]")
    if chaos_text:
        chaos = Chaos.parse(chaos_text, units)
        served = {d.unit for lst in spec.listeners for d in lst.devices}
        if chaos.units - served:
            raise ValueError(f"--chaos-units {units}: no unit {', '.join(map(str, sorted(chaos.units - served)))}")
        spec.chaos, spec.chaos_units = chaos_text, units


def _night_arg(spec: SimSpec, text: str) -> None:
    unit, _, mode = text.rpartition(":")
    if mode not in NIGHT_MODES:
        raise ValueError(f"--night {text}: expected [UNIT:]MODE with MODE one of {', '.join(NIGHT_MODES)}")
    found = [d for lst in spec.listeners for d in lst.devices if not unit or str(d.unit) == unit]
    if not found:
        raise ValueError(f"--night {text}: no unit {unit}")
    for d in found:
        d.night = mode


def _device_arg(text: str) -> DeviceSpec:
    text, _, image = text.partition(":image=")
    if image:
        spec = _device_arg(text)
        spec.image = image
        return spec
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0].isdigit():
        raise ValueError(f"--device {text}: expected UNIT:PROFILE or UNIT:PROFILE:KW, e.g. 1:huawei-sun2000")
    return DeviceSpec(int(parts[0]), parts[1], float(parts[2]) if len(parts) == 3 else 50.0)


def _load_spec(path: Path) -> SimSpec:
    data = load_file(path)
    chk = Checker(str(path))
    root = chk.mapping(data, "", 1, ("timezone", "speed", "start", "control", "profiles", "listeners"))
    if root is None:
        chk.raise_if_any()
        raise AssertionError("unreachable")
    listeners = []
    for i, item, line in chk.sequence(root.get("listeners"), "listeners", chk.line_of(root, "listeners")):
        node = chk.mapping(item, f"listeners[{i}]", line, ("listen", "devices"))
        if node is None:
            continue
        lst = ListenerSpec(chk.get(node, "listen", f"listeners[{i}]", str, "", required=True))
        for j, dev, dline in chk.sequence(node.get("devices"), f"listeners[{i}].devices", chk.line_of(node, "devices")):
            path_ = f"listeners[{i}].devices[{j}]"
            d = chk.mapping(dev, path_, dline, ("unit", "profile", "rated_kw", "fault", "turnaround_ms", "night",
                                                "image"))
            if d is not None:
                lst.devices.append(DeviceSpec(chk.get(d, "unit", path_, int, 1, required=True),
                                              chk.get(d, "profile", path_, str, "", required=True),
                                              chk.get(d, "rated_kw", path_, float, 50.0),
                                              chk.get(d, "fault", path_, str, "none"),
                                              chk.get(d, "turnaround_ms", path_, float, None),
                                              chk.choice(d, "night", path_, NIGHT_MODES, "silent") or "silent",
                                              _relative(path, chk.get(d, "image", path_, str, None))))
        listeners.append(lst)
    chk.raise_if_any()
    return SimSpec(listeners, chk.get(root, "timezone", "", str, "Asia/Shanghai"),
                   chk.get(root, "speed", "", float, 1.0), chk.get(root, "start", "", str, None),
                   chk.get(root, "control", "", str, None),
                   [str((path.parent / p).resolve()) for p in (root.get("profiles") or [])])


def _relative(sim_file: Path, image: str | None) -> str | None:
    """An image path in a simulator file is relative to that file."""
    return None if image is None else str((sim_file.parent / image).resolve())


def _sim_start(spec: SimSpec) -> float | None:
    if not spec.start:
        return None
    tz = ZoneInfo(spec.timezone)
    text = spec.start
    if len(text) <= 5 and ":" in text:  # a time of day: today, local time
        hh, mm = (int(x) for x in text.split(":"))
        dt = datetime.now(tz).replace(hour=hh, minute=mm, second=0, microsecond=0)
    else:
        dt = datetime.fromisoformat(text)
        dt = dt if dt.tzinfo else dt.replace(tzinfo=tz)
    return dt.timestamp()


def build_buses(spec: SimSpec, clock: SimClock) -> list[Bus]:
    library = ProfileLibrary([Path(p) for p in spec.profiles] + ProfileLibrary.default().dirs)
    sun = Sun(spec.timezone)
    buses = []
    for lst in spec.listeners:
        devices: dict[int, SimDevice] = {}
        for d in lst.devices:
            try:
                profile = library.get(d.profile)
            except KeyError:
                raise ValueError(f"unknown device map {d.profile!r}; known: {', '.join(library.ids())}") from None
            if d.unit in devices:
                raise ValueError(f"unit {d.unit} twice on {lst.listen}")
            meter = "meter" in profile.name.lower() or profile.id in ("chint-dtsu666", "eastron-sdm630")
            plant = PvPlant(rated_kw=d.rated_kw, seed=d.unit, meter=meter, sun=sun)
            if profile.sunspec:  # a whole model chain rather than a flat map
                dev = make_sim_device(d.unit, plant, clock, fault=Fault.parse(d.fault))
                dev.turnaround_s = None if d.turnaround_ms is None else d.turnaround_ms / 1000.0
                devices[d.unit] = dev
                continue
            devices[d.unit] = SimDevice(d.unit, profile, plant, clock, Fault.parse(d.fault),
                                        turnaround_s=None if d.turnaround_ms is None else d.turnaround_ms / 1000.0)
            if d.image:  # the same unit, answering from the vendor's registers instead of the map
                devices[d.unit] = ImageDevice.from_device(devices[d.unit], load_image(Path(d.image)))
        buses.append(Bus(Listen.parse(lst.listen), devices))
    for bus, lst in zip(buses, spec.listeners):  # what inverters do between dusk and dawn
        for d in lst.devices:
            bus.devices[d.unit].night = d.night
    return buses


async def _run(spec: SimSpec) -> int:
    clock = SimClock.starting_now(spec.speed, _sim_start(spec))
    buses = build_buses(spec, clock)
    closers: list[Any] = []
    for bus in buses:
        if bus.listen.kind == "rtu":
            closers.append(SerialListener(bus))
        else:
            server = await serve_tcp(bus)
            closers.append(server)
    control = await _start_control(spec.control, buses) if spec.control else None
    chaos = Chaos.parse(spec.chaos, spec.chaos_units) if spec.chaos else None
    line = Line(random.Random(chaos.seed + 1 if chaos else 1))
    for bus in buses:  # each broken frame, as it goes out (chaos, --fault or the control port)
        bus.on_chaos = lambda event: print(json.dumps(event), flush=True)
    tasks = [asyncio.create_task(speak(buses, line))]
    if chaos is not None:
        tasks.append(asyncio.create_task(run_chaos(chaos, buses, line)))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({
        "event": "ready",
        "listen": [b.listen.__dict__ for b in buses],
        "units": {str(i): sorted(b.devices) for i, b in enumerate(buses)},
        "clock": {"real0": clock.real0, "sim0": clock.sim0, "speed": clock.speed},
        "timezone": spec.timezone,
    }), flush=True)
    await stop.wait()
    for task in tasks:
        task.cancel()
    for c in closers:
        c.close()
    if control is not None:
        control.close()
    return 0


async def _start_control(url: str, buses: list[Bus]) -> asyncio.Server:
    listen = Listen.parse(url)

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            try:
                reply = _control(json.loads(line), buses)
            except (ValueError, KeyError, TypeError) as err:
                reply = {"ok": False, "error": str(err)}
            writer.write((json.dumps(reply) + "\n").encode())
            await writer.drain()
        writer.close()

    return await asyncio.start_server(on_client, listen.host, listen.port)


def _control(msg: dict[str, Any], buses: list[Bus]) -> dict[str, Any]:
    if msg.get("cmd") == "drop":  # close the TCP connections of every listener (or one: "listener": i)
        dropped = sum(b.drop_clients() for i, b in enumerate(buses) if msg.get("listener", i) == i)
        return {"ok": True, "dropped": dropped}
    if msg.get("cmd") == "state":
        return {"ok": True, "t": time.time(), "buses": [
            {"requests": b.requests, "units": {u: {"served": d.served, "requests": d.requests, "fault": d.fault.kind}
                                               for u, d in b.devices.items()}}
            for b in buses]}
    unit = int(msg["unit"])
    targets = [b.devices[unit] for i, b in enumerate(buses)
               if unit in b.devices and msg.get("listener", i) == i]
    if not targets:
        raise KeyError(f"no unit {unit}")
    for device in targets:
        if "fault" in msg:
            device.fault = Fault.parse(str(msg["fault"]))
        if "night" in msg:
            if msg["night"] not in NIGHT_MODES:
                raise ValueError(f"night must be one of {', '.join(NIGHT_MODES)}")
            device.night = str(msg["night"])
        if "turnaround_ms" in msg:
            device.turnaround_s = None if msg["turnaround_ms"] is None else float(msg["turnaround_ms"]) / 1000.0
        for key, value in (msg.get("set") or {}).items():
            device.overrides[key] = value
        for key in msg.get("unset") or []:
            device.overrides.pop(str(key), None)
    return {"ok": True, "unit": unit, "fault": targets[0].fault.kind}


if __name__ == "__main__":
    sys.exit(main())
