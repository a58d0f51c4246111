"""The bare client: the agent's block reads done with pymodbus and nothing else, in its own process.

    python bench/bare.py PLAN.json
    python bench/bare.py PLAN.json --chain BROKER_PORT DB_PATH

PLAN.json (written by the suite from `pvgate plan -c site.yaml`):
    [{"kind": "tcp", "host": "127.0.0.1", "port": 1502,          # or "kind": "rtu", "port": "/dev/pts/3",
      "devices": [{"unit": 1, "interval": 1.0,                    #    "baudrate": 115200
                   "blocks": [["holding", 0, 13]]}]}]

One client per link, like the agent; every interval (aligned to multiples of it, like the agent)
each device's blocks are read in turn. The values are not decoded, stored or published: this is
the floor the agent's CPU per reading is compared with. Prints `polls N` (devices polled so far)
after every cycle. plan_of() / parse_plan(): how the suite gets the reads from `pvgate plan`.

With --chain it is the bare chain: the least the MQTT contract asks of each read, written the
shortest way, so the suite can tell what the contract costs from what pvgate adds to it. Each read
becomes one row in SQLite (WAL, synchronous=FULL: a seq must survive a power cut), committed once
per cycle when every link has polled, then one QoS 1 MQTT 5 message of the data payload per row
(paho's own network thread); a PUBACK marks its row sent in the next cycle's commit. No decode
(the first ten registers are the values), no quality flags, health, windows, limits or replay.
Prints `chain rows N sent M` after every commit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient

ROOT = Path(__file__).resolve().parent.parent
POLLS = 0
KEYS = [f"v{i}" for i in range(10)]


class Chain:
    """Store, then publish at QoS 1, then mark sent on PUBACK: one row and one message per read."""

    def __init__(self, port: int, db_path: str, links: int) -> None:
        self.db = sqlite3.connect(db_path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS reading (seq INTEGER PRIMARY KEY, device TEXT NOT NULL, "
                        "ts INTEGER NOT NULL, body TEXT NOT NULL, sent INTEGER NOT NULL DEFAULT 0)")
        self.seq = self.db.execute("SELECT coalesce(max(seq), 0) FROM reading").fetchone()[0]
        self.links, self.done = links, 0
        self.rows: list[tuple[int, str, int, str]] = []
        # paho calls on_publish holding its own lock, which publish() takes too: the callback only
        # appends the mid; mid -> seq lives on the event loop's thread alone.
        self.lock = threading.Lock()
        self.mids: dict[int, int] = {}
        self.acked: list[int] = []
        self.stored = self.sent = 0
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bare-chain-{os.getpid()}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, rc: ReasonCode,
                    props: Properties) -> None:
        if not rc.is_failure:
            with self.lock:
                self.acked.append(mid)

    def add(self, device: str, registers: list[int]) -> None:
        self.seq += 1
        ts = int(time.time() * 1000)
        body = json.dumps({"v": 1, "site": "bare", "device": device, "epoch": "bare", "readings": [
            {"seq": self.seq, "ts": ts, "values": dict(zip(KEYS, registers)), "q": []}]}, separators=(",", ":"))
        self.rows.append((self.seq, device, ts, body))

    def link_done(self) -> None:
        """A link finished its cycle; the last one commits the cycle and publishes it."""
        self.done += 1
        if self.done < self.links:
            return
        self.done = 0
        with self.lock:
            mids, self.acked = self.acked, []
        acked = [(self.mids.pop(mid),) for mid in mids]
        self.db.execute("BEGIN")
        self.db.executemany("INSERT INTO reading (seq, device, ts, body) VALUES (?, ?, ?, ?)", self.rows)
        self.db.executemany("UPDATE reading SET sent = 1 WHERE seq = ?", acked)
        self.db.execute("COMMIT")
        self.stored += len(self.rows)
        self.sent += len(acked)
        for seq, device, _ts, body in self.rows:
            self.mids[self.client.publish(f"bare/data/{device}", body, qos=1).mid] = seq
        self.rows = []
        print(f"chain rows {self.stored} sent {self.sent}", flush=True)


CHAIN: Chain | None = None


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
            registers: list[int] = []
            for table, start, count in dev["blocks"]:
                try:
                    if table == "input":
                        rr = await client.read_input_registers(start, count=count, device_id=dev["unit"])
                    else:
                        rr = await client.read_holding_registers(start, count=count, device_id=dev["unit"])
                    ok = ok and not rr.isError()
                    registers += [] if rr.isError() else rr.registers
                except Exception:  # a bench client: count the poll as failed and go on
                    ok = False
                    if not client.connected:
                        await client.connect()
            POLLS += ok
            if CHAIN is not None and ok:
                CHAIN.add(f"{link.get('port')}-{dev['unit']}", registers)
        if CHAIN is not None:
            CHAIN.link_done()
        print(f"polls {POLLS}", flush=True)


async def main(path: str, chain: tuple[int, str] | None) -> None:
    global CHAIN
    with open(path, encoding="utf-8") as fh:
        links = json.load(fh)
    if chain is not None:
        CHAIN = Chain(chain[0], chain[1], len(links))
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
    ap = argparse.ArgumentParser(description="the bare client, or with --chain the bare chain")
    ap.add_argument("plan")
    ap.add_argument("--chain", nargs=2, metavar=("BROKER_PORT", "DB_PATH"))
    args = ap.parse_args()
    try:
        asyncio.run(main(args.plan, (int(args.chain[0]), args.chain[1]) if args.chain else None))
    except KeyboardInterrupt:
        pass
