"""The bare client: the agent's block reads done with pymodbus and nothing else, in its own process.

    python bench/bare.py PLAN.json

PLAN.json (written by the suite from `pvgate plan -c site.yaml`):
    [{"kind": "tcp", "host": "127.0.0.1", "port": 1502,          # or "kind": "rtu", "port": "/dev/pts/3",
      "devices": [{"unit": 1, "interval": 1.0,                    #    "baudrate": 115200
                   "blocks": [["holding", 0, 13]]}]}]

One client per link, like the agent; every interval (aligned to multiples of it, like the agent)
each device's blocks are read in turn. The values are not decoded, stored or published: this is
the floor the agent's CPU per reading is compared with. Prints `polls N` (devices polled so far)
after every cycle.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient

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


if __name__ == "__main__":
    try:
        asyncio.run(main(sys.argv[1]))
    except KeyboardInterrupt:
        pass
