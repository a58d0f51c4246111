"""The bare client: the agent's block reads done with pymodbus and nothing else, in its own process.

    python bench/bare.py PLAN.json

PLAN.json (written by the suite from `pvgate plan -c site.yaml`):
    [{"kind": "tcp", "host": "127.0.0.1", "port": 1502,          # or "kind": "rtu", "port": "/dev/pts/3",
      "devices": [{"unit": 1, "interval": 1.0,                    #    "baudrate": 115200
                   "blocks": [["holding", 0, 13]]}]}]

One client per link, like the agent; every interval (aligned to multiples of it, like the agent)
each device's blocks are read in turn. The values are not decoded, stored or published: this is
the floor the agent's CPU per reading is compared with. Prints `polls N` (devices polled so far)
after every cycle. plan_of() / parse_plan(): how the suite gets the reads from `pvgate plan`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient

ROOT = Path(__file__).resolve().parent.parent
POLLS = 0


async def link_loop(link: dict[str, Any]) -> None:
    global POLLS
    client: AsyncModbusTcpClient | AsyncModbusSerialClient
    if link["kind"] == "tcp":
        client = AsyncModbusTcpClient(link["host"], port=link["port"], timeout=1.0, retries=0)
    else:
        client = AsyncModbusSerialClient(link["port"], baudrate=link.get("baudrate", 115200), parity="N",
                                         stopbits=1, bytesize=8, timeout=1.0, retries=0)
    await client.connect()
    interval = min(d["interval"] for d in link["devices"])
    while True:
        now = time.time()
        await asyncio.sleep((now // interval + 1) * interval - now)
        for dev in link["devices"]:
            ok = True
            for table, start, count in dev["blocks"]:
                try:
                    if table == "input":
                        rr = await client.read_input_registers(start, count=count, device_id=dev["unit"])
                    else:
                        rr = await client.read_holding_registers(start, count=count, device_id=dev["unit"])
                    ok = ok and not rr.isError()
                except Exception:  # a bench client: count the poll as failed and go on
                    ok = False
                    if not client.connected:
                        await client.connect()
            POLLS += ok
        print(f"polls {POLLS}", flush=True)


async def main(path: str) -> None:
    with open(path, encoding="utf-8") as fh:
        links = json.load(fh)
    await asyncio.gather(*(link_loop(lk) for lk in links))


PLAN_LINK = re.compile(r"^link (\S+) \((\S+) (.+)\)$")
PLAN_DEVICE = re.compile(r"^  (\S+) \(unit (\d+), (\S+), every ([\d.]+)s\)")
PLAN_BLOCK = re.compile(r"^    (\w+)\s+(\d+) \+(\d+)")


def parse_plan(text: str) -> list[dict[str, Any]]:
    """`pvgate plan` output -> [{link, type, endpoint, devices: [{id, unit, interval, blocks}]}],
    blocks as [[table, start, count]]."""
    links: list[dict[str, Any]] = []
    for line in text.splitlines():
        if m := PLAN_LINK.match(line):
            links.append({"link": m[1], "type": m[2], "endpoint": m[3], "devices": []})
        elif (m := PLAN_DEVICE.match(line)) and links:
            links[-1]["devices"].append({"id": m[1], "unit": int(m[2]), "interval": float(m[4]), "blocks": []})
        elif (m := PLAN_BLOCK.match(line)) and links and links[-1]["devices"]:
            links[-1]["devices"][-1]["blocks"].append([m[1], int(m[2]), int(m[3])])
    return links


def plan_of(site: Path) -> list[dict[str, Any]]:
    out = subprocess.run([sys.executable, "-m", "agent.cli", "plan", "-c", str(site)], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        raise RuntimeError(f"pvgate plan failed: {out.stderr}")
    return parse_plan(out.stdout)


if __name__ == "__main__":
    try:
        asyncio.run(main(sys.argv[1]))
    except KeyboardInterrupt:
        pass
