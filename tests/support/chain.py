"""Starting the real chain for end-to-end tests: pvgate-sim, pvgate run, site files, expectations."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drivers.codec import decode_point, encode_point
from drivers.devicemap import ProfileLibrary
from drivers.model import DataType, Point
from simulator.device import Fault, SimDevice
from simulator.physics import PvPlant, SimClock, Sun

from .collector import Msg
from .procs import Proc

Starter = Callable[..., Proc]

PY = sys.executable


@dataclass(frozen=True)
class SimDev:
    id: str
    unit: int
    profile: str
    rated_kw: float = 50.0


def write_site(path: Path, *, site_id: str, broker_port: int, modbus_port: int, devices: Sequence[SimDev],
               interval: str = "1s", buffer: Path | None = None, extra_mqtt: str = "", extra: str = "",
               link_type: str = "tcp", timeout: str = "0.5s", health_interval: str = "5s") -> Path:
    buffer = buffer or path.parent / "buffer.sqlite"
    lines = [
        "site:", f"  id: {site_id}", "  name: 测试电站 test station", "  timezone: Asia/Shanghai",
        "mqtt:", "  host: 127.0.0.1", f"  port: {broker_port}", "  topic_prefix: pvgate",
        *(f"  {line}" for line in extra_mqtt.splitlines() if line.strip()),
        "buffer:", f"  path: {buffer}", "  commit_interval: 0.2s",
        "agent:", f"  state_dir: {path.parent}", f"  health_interval: {health_interval}",
        "links:", f"  - {{id: lan, type: {link_type}, host: 127.0.0.1, port: {modbus_port}, timeout: {timeout}}}",
        "devices:",
        *(f"  - {{id: {d.id}, link: lan, unit: {d.unit}, profile: {d.profile}, interval: {interval}}}" for d in devices),
    ]
    path.write_text("\n".join(lines) + "\n" + extra, encoding="utf-8")
    return path


def sim_cmd(port: int, devices: Sequence[SimDev], speed: float = 60.0, start: str = "11:00",
            scheme: str = "tcp", control_port: int | None = None, night: str | None = None) -> list[str]:
    cmd = [PY, "-m", "simulator.cli", "--listen", f"{scheme}://127.0.0.1:{port}", "--speed", str(speed),
           "--start", start]
    for d in devices:
        cmd += ["--device", f"{d.unit}:{d.profile}:{d.rated_kw:g}"]
    if control_port:
        cmd += ["--control", f"tcp://127.0.0.1:{control_port}"]
    if night:
        cmd += ["--night", night]
    return cmd


def start_sim(procs: Starter, port: int, devices: Sequence[SimDev], **kw: Any) -> tuple[Proc, SimClock]:
    proc = procs(sim_cmd(port, devices, **kw), "sim")
    m = proc.wait_for_line(r'^\{"event": "ready".*$', timeout=15, stream="stdout")
    ready = json.loads(m.group(0))
    c = ready["clock"]
    return proc, SimClock(c["real0"], c["sim0"], c["speed"])


def agent_cmd(site: Path) -> list[str]:
    return [PY, "-m", "agent.cli", "run", "-c", str(site)]


def start_agent(procs: Starter, site: Path, name: str = "agent", sim_clock: SimClock | None = None) -> Proc:
    """The agent as a process. With sim_clock it judges day and night by the simulated station's
    clock (the agent's PVGATE_TEST_SUN_CLOCK test hook), so a silent inverter in a test at
    simulated noon is offline whatever the hour where the test runs."""
    env = None if sim_clock is None else {
        **os.environ, "PVGATE_TEST_SUN_CLOCK": f"{sim_clock.real0},{sim_clock.sim0},{sim_clock.speed}"}
    proc = procs(agent_cmd(site), name, env=env)
    proc.wait_for_line(r"running: site", timeout=20, stream="stderr")
    return proc


def sim_device(d: SimDev, clock: SimClock, timezone: str = "Asia/Shanghai") -> SimDevice:
    profile = ProfileLibrary.default().get(d.profile)
    # The same rule as pvgate-sim's (simulator/cli.py build_buses).
    meter = "meter" in profile.name.lower() or d.profile in ("chint-dtsu666", "eastron-sdm630")
    return SimDevice(d.unit, profile, PvPlant(rated_kw=d.rated_kw, seed=d.unit, meter=meter, sun=Sun(timezone)),
                     clock, Fault())


def _served(point: Point, dev: SimDevice, real_t: float) -> float | int | str | None:
    """What a client decodes from the registers the simulator serves at real time real_t."""
    value = dev.values_at(dev.clock.sim(real_t))[point.key]
    regs = encode_point(point, value)
    decoded = decode_point(point, regs)
    return decoded if not isinstance(decoded, bool) else int(decoded)


def mismatches(dev: SimDevice, ts_ms: int, values: dict[str, Any], window_s: float = 0.6) -> list[str]:
    """Points whose published value is outside what was served between the poll's start and window_s later."""
    out = []
    t0 = ts_ms / 1000.0
    for point in dev.profile.points:
        if not point.publish or point.key not in values:
            continue
        got = values[point.key]
        # Sample what was served across the window: signals wander, so the ends are not enough.
        served = [_served(point, dev, t0 - 0.05 + i * (window_s + 0.05) / 40) for i in range(41)]
        if isinstance(got, str) or point.type is DataType.STRING:
            if got not in served:
                out.append(f"{point.key}: got {got!r}, served {served[0]!r}..{served[-1]!r}")
            continue
        numbers = [v for v in served if isinstance(v, (int, float))]
        lo, hi = min(numbers), max(numbers)
        slack = abs(point.scale) + 1e-6 * max(abs(lo), abs(hi)) + 1e-9
        if not lo - slack <= got <= hi + slack:
            out.append(f"{point.key}: got {got!r}, served {lo!r}..{hi!r}")
    return out


def readings(msgs: Sequence[Any]) -> list[dict[str, Any]]:
    """Every reading in a list of data messages, with its device."""
    out = []
    for m in msgs:
        body = m.json()
        for r in body["readings"]:
            out.append({**r, "device": body["device"], "replay": body.get("replay", False)})
    return out


def seqs_of(msgs: Sequence[Any]) -> list[int]:
    """seq of every reading and event in data/ and events/ messages, in arrival order."""
    out: list[int] = []
    for m in msgs:
        body = m.json()
        if "readings" in body:
            out.extend(r["seq"] for r in body["readings"])
        elif "seq" in body:
            out.append(body["seq"])
    return out


def buffer_seqs(path: Path) -> tuple[int, set[int]]:
    """(last seq ever given, seqs still kept) straight from the buffer file."""
    import sqlite3

    db = sqlite3.connect(str(path))
    try:
        last = db.execute("SELECT seq FROM sqlite_sequence WHERE name='record'").fetchone()
        kept = {r[0] for r in db.execute("SELECT seq FROM record")}
    finally:
        db.close()
    return (last[0] if last else 0), kept


def records(msgs: list[Msg]) -> tuple[dict[int, set[str]], int]:
    """seq -> the distinct contents that carried it, and how many times seqs arrived in all."""
    out: dict[int, set[str]] = {}
    arrivals = 0
    for m in msgs:
        body = m.json()
        if "readings" in body:
            for r in body["readings"]:
                out.setdefault(r["seq"], set()).add(json.dumps([body["device"], r["ts"], r["values"], r["q"]], sort_keys=True))
                arrivals += 1
        elif "seq" in body:
            ev = {k: v for k, v in body.items() if k not in ("replay", "resend")}
            out.setdefault(body["seq"], set()).add(json.dumps(ev, sort_keys=True))
            arrivals += 1
    return out, arrivals


def data_and_events(msgs: list[Msg]) -> list[Msg]:
    return [m for m in msgs if "/data/" in m.topic or "/events/" in m.topic]


def assert_every_seq_once_in_content(got: dict[int, set[str]], last: int, allowed_missing: set[int] | None = None) -> None:
    missing = sorted(set(range(1, last + 1)) - set(got) - (allowed_missing or set()))
    assert not missing, f"seqs never arrived: {missing[:20]} ({len(missing)} in all)"
    reused = {s: c for s, c in got.items() if len(c) > 1}
    assert not reused, f"seq reused for different data: {list(reused.items())[:2]}"
