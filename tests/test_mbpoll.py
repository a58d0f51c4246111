"""An independent Modbus client proves the simulator: mbpoll reads the registers pvgate-sim serves,
over Modbus TCP and over a socat pty (RTU at 9600 baud), and they are (1) the encoding of the
values the simulator was told to serve and (2) what pvgate's own poll decodes.

Values are pinned through the simulator's control port ({"unit": 1, "set": {...}}) so that the
two reads, made a second apart by two different clients, must agree exactly.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.poller import LinkWorker
from drivers.codec import encode_point
from drivers.decode import decode_blocks
from drivers.devicemap import ProfileLibrary
from drivers.model import Block, Device, Link, LinkType, Reading, SerialSettings, Value
from drivers.plan import plan_device
from support.ports import free_port
from support.procs import Proc, require_tool

PY = sys.executable
ProcStarter = Callable[..., Proc]

PINNED: dict[int, dict[str, Value]] = {
    1: {"ac_power": 12.345, "dc_power": 12.9, "grid_frequency": 50.01, "phase_a_voltage": 231.4,
        "internal_temperature": -3.5, "energy_total": 123456.78, "status": 512, "reactive_power": -1.25},
    11: {"ac_power": -3.5, "grid_frequency": 49.98, "line_ab_voltage": 401.2, "power_factor": -0.95,
         "energy_export": 4321.5, "energy_import": 77.25},
}
PROFILES = {1: "huawei-sun2000", 11: "chint-dtsu666"}


def control(port: int, msg: dict[str, Any]) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall((json.dumps(msg) + "\n").encode())
        assert json.loads(s.makefile().readline())["ok"]


def mbpoll(args: list[str], block: Block, unit: int) -> list[int]:
    """Registers of one block read by mbpoll, with 1-based references as mbpoll uses by default."""
    exe = require_tool("mbpoll", "/usr/bin/mbpoll")
    cmd = [exe, *args[:-1], "-a", str(unit), "-r", str(block.start + 1), "-c", str(block.count),
           "-t", "4:hex", "-1", "-o", "2", args[-1]]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL, check=False)
    assert res.returncode == 0, f"{' '.join(cmd)}: rc={res.returncode}\n{res.stdout}\n{res.stderr}"
    regs = {int(m.group(1)): int(m.group(2), 16) for m in re.finditer(r"^\[(\d+)\]:\s+0x([0-9A-Fa-f]+)", res.stdout, re.MULTILINE)}
    assert sorted(regs) == list(range(block.start + 1, block.start + block.count + 1)), res.stdout
    return [regs[block.start + 1 + i] for i in range(block.count)]


def pvgate_poll(link: Link, devices: list[Device]) -> dict[str, Reading]:
    """One poll per device through pvgate's own link worker and client."""
    async def go() -> dict[str, Reading]:
        worker = LinkWorker(link, devices, lambda _: None)
        try:
            out = {}
            for d in devices:
                reading = await worker.poll(worker.states[d.id])
                assert reading is not None, f"pvgate could not poll {d.id}"
                out[d.id] = reading
            return out
        finally:
            worker.client.close()
    return asyncio.run(asyncio.wait_for(go(), 30))


@pytest.mark.parametrize("transport", ["tcp", "rtu"])
def test_mbpoll_reads_what_pvgate_decodes(transport: str, tmp_path: Path, procs: ProcStarter) -> None:
    require_tool("mbpoll", "/usr/bin/mbpoll")
    ctl = free_port()
    if transport == "tcp":
        port = free_port()
        listen = f"tcp://127.0.0.1:{port}"
        link = Link("lan", LinkType.TCP, host="127.0.0.1", port=port, timeout=1.0, retries=1)
        mb_args = ["-m", "tcp", "-p", str(port), "127.0.0.1"]
    else:
        socat = require_tool("socat", "/usr/bin/socat")
        a, b = tmp_path / "pty-sim", tmp_path / "pty-client"
        procs([socat, "-d", "-d", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"], "socat")
        deadline = time.monotonic() + 10
        while not (a.exists() and b.exists()):
            assert time.monotonic() < deadline, "socat made no pty pair"
            time.sleep(0.02)
        listen = f"rtu://{a}?baudrate=9600&parity=N&turnaround_ms=10"
        link = Link("bus1", LinkType.RTU, serial=SerialSettings(str(b), 9600, "N", 1), timeout=0.5, retries=1,
                    inter_frame_s=0.05)
        mb_args = ["-m", "rtu", "-b", "9600", "-P", "none", "-s", "1", str(b)]
    sim = procs([PY, "-m", "simulator.cli", "--listen", listen, "--control", f"tcp://127.0.0.1:{ctl}",
                 "--speed", "1", "--start", "12:00", "--device", "1:huawei-sun2000", "--device", "11:chint-dtsu666"],
                "sim")
    sim.wait_for_line(r'^\{"event": "ready"', timeout=15, stream="stdout")
    for unit, values in PINNED.items():
        control(ctl, {"unit": unit, "set": values})

    lib = ProfileLibrary.default()
    devices = [Device(f"u{u}", link.id, u, lib.get(p)) for u, p in PROFILES.items()]
    raw: dict[str, dict[int, list[int]]] = {}
    for d in devices:
        blocks = plan_device(d.profile)
        raw[d.id] = {i: mbpoll(mb_args, b, d.unit) for i, b in enumerate(blocks)}
    readings = pvgate_poll(link, devices)

    for d in devices:
        blocks = plan_device(d.profile)
        by_mbpoll, quality = decode_blocks(blocks, raw[d.id])
        assert quality == [] and readings[d.id].quality == []
        for key, value in PINNED[d.unit].items():
            point = d.profile.point(key)
            # (1) the simulator serves the encoding of the value it was given ...
            (block_i, block), = [(i, b) for i, b in enumerate(blocks) if point in b.points]
            offset = point.address - block.start
            assert raw[d.id][block_i][offset:offset + point.count] == encode_point(point, value), key
            # (2) ... and mbpoll's registers decode to exactly what pvgate published.
            assert by_mbpoll[key] == readings[d.id].values[key], key
            assert by_mbpoll[key] == pytest.approx(value, abs=abs(point.scale)), key
        # Everything else drifts slowly with the simulated sun; a second apart they agree closely.
        for key, got in readings[d.id].values.items():
            want = by_mbpoll[key]
            if isinstance(got, float) and isinstance(want, float):
                assert got == pytest.approx(want, rel=0.02, abs=5 * abs(d.profile.point(key).scale)), key

