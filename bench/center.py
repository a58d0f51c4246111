"""Center ingest benchmark: readings per second into PostgreSQL, one worker and two.

    python bench/center.py                      # ~1 minute: 200,000 readings per worker
    python bench/center.py --readings 500000 --batch 5000

A private PostgreSQL cluster is started here (initdb in a temp dir, a free port, fsync on: the
defaults of a real server, shared_buffers 128 MB). Each worker is a process that does what
``pvgate-center run`` does with a batch once paho handed the messages over: parse the JSON
payloads (data messages of 20 Huawei SUN2000-sized readings, 34 values each, ~750 bytes a
reading), COPY them into its staging table and move them with ON CONFLICT DO NOTHING, with the
stream bookkeeping, one transaction per batch. Phases:

1. one worker, fresh readings;
2. two workers at once, each with its own stations (a shared subscription splits them so);
3. one worker storing the same messages again (every reading a duplicate: a replay or resend);
4. (--mqtt) the whole path: two ``pvgate-center run`` processes on one shared subscription of a
   mosquitto started here, a bare paho client publishing the messages (QoS 1) as fast as the
   broker takes them, timed until PostgreSQL holds every reading.

Target: >= 15,000 readings/s per worker.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import paho.mqtt.client as mqtt  # noqa: E402
import psycopg  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from center import store  # noqa: E402
from center.schema import migrate  # noqa: E402
from support.broker import Broker  # noqa: E402
from support.postgres import Postgres, find_bin  # noqa: E402
from support.procs import ProcRegistry, find_tool  # noqa: E402

PER_MESSAGE = 20
KEYS = [f"p{i:02d}" for i in range(30)] + ["ac_power", "energy_total", "status", "grid_frequency"]


def messages(sites: list[str], readings: int) -> list[tuple[str, bytes]]:
    """Data messages round-robin over the sites, seqs counting up per site."""
    rng = random.Random(7)
    seq = dict.fromkeys(sites, 0)
    out: list[tuple[str, bytes]] = []
    for n in range(readings // PER_MESSAGE):
        site = sites[n % len(sites)]
        rows = []
        for _ in range(PER_MESSAGE):
            seq[site] += 1
            values = {k: round(rng.uniform(0, 1000), 2) for k in KEYS}
            rows.append({"seq": seq[site], "ts": 1764403210000 + seq[site] * 10000, "values": values, "q": []})
        body = {"v": 1, "site": site, "device": "inv01", "epoch": "b7f3c2a9e1d04a6b", "readings": rows}
        out.append((f"pvgate/{site}/data/inv01", json.dumps(body, separators=(",", ":")).encode()))
    return out


def worker(dsn: str, name: str, msgs: list[tuple[str, bytes]], batch: int, start: Any, result: Any) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        store.prepare(conn)
        start.wait()
        t0 = time.perf_counter()
        stored = 0
        for i in range(0, len(msgs), batch // PER_MESSAGE):
            b = store.Batch()
            for topic, payload in msgs[i:i + batch // PER_MESSAGE]:
                b.add(topic, payload, "pvgate")
            with conn.transaction():
                stored += store.write(conn, b, name).readings
        result.put((name, stored, time.perf_counter() - t0))


def phase(dsn: str, jobs: dict[str, list[tuple[str, bytes]]], batch: int) -> list[tuple[str, int, float]]:
    ctx = mp.get_context("fork")
    start, result = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(dsn, name, msgs, batch, start, result)) for name, msgs in jobs.items()]
    for p in procs:
        p.start()
    time.sleep(1.0)
    start.set()
    out = [result.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return sorted(out)


def report(title: str, out: list[tuple[str, int, float]], offered: int) -> None:
    wall = max(t for _, _, t in out)
    total = sum(n for _, n, _ in out)
    per = ", ".join(f"{name} {n / t:,.0f}/s" for name, n, t in out)
    print(f"{title}: {offered:,} readings offered, {total:,} stored in {wall:.1f} s = {offered / wall:,.0f} readings/s "
          f"({per})", flush=True)


def through_mqtt(pg: Postgres, workdir: Path, msgs: list[tuple[str, bytes]], workers: int) -> None:
    binary = find_tool("mosquitto", "/usr/sbin/mosquitto")
    if binary is None:
        print("mosquitto not found: --mqtt skipped", flush=True)
        return
    broker = Broker(workdir / "broker", binary=binary, extra_conf="max_queued_messages 0\n")
    broker.start()
    procs = ProcRegistry(workdir / "procs")
    try:
        for i in range(workers):
            cfg = workdir / f"w{i}.yaml"
            cfg.write_text(f"mqtt: {{host: 127.0.0.1, port: {broker.port}, client_id: bench-w{i}}}\n"
                           f"postgres: {{dsn: '{pg.dsn()}'}}\n", encoding="utf-8")
            proc = procs.start([sys.executable, "-m", "center.cli", "run", "-c", str(cfg), "--log-level", "WARNING"],
                               f"w{i}")
            time.sleep(2.0)
            assert proc.running, proc.tail()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-pub", protocol=mqtt.MQTTv5)
        client.max_inflight_messages_set(100)
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            before = _count(conn)
            t0 = time.perf_counter()
            infos = [client.publish(topic, payload, qos=1) for topic, payload in msgs]
            for info in infos:
                info.wait_for_publish(60)
            published = time.perf_counter() - t0
            want = before + len(msgs) * PER_MESSAGE
            while _count(conn) < want and time.perf_counter() - t0 < 600:
                time.sleep(0.1)
            took = time.perf_counter() - t0
            shares = conn.execute("SELECT worker, count(*) FROM reading WHERE worker LIKE 'bench-w%%' "
                                  "GROUP BY worker ORDER BY 1").fetchall()
        client.disconnect()
        client.loop_stop()
        n = len(msgs) * PER_MESSAGE
        print(f"MQTT, {workers} pvgate-center workers: {n:,} readings published in {published:.1f} s, "
              f"all in PostgreSQL after {took:.1f} s = {n / took:,.0f} readings/s "
              f"({', '.join(f'{w} {c:,}' for w, c in shares)})", flush=True)
    finally:
        procs.cleanup()
        broker.stop()


def _count(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM reading").fetchone()
    return int(row[0]) if row else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--readings", type=int, default=200_000, help="per worker")
    parser.add_argument("--batch", type=int, default=5000, help="readings per transaction")
    parser.add_argument("--stations", type=int, default=100, help="per worker")
    parser.add_argument("--mqtt", action="store_true", help="also the whole path through mosquitto (phase 4)")
    args = parser.parse_args()
    bindir = find_bin()
    if bindir is None:
        print("PostgreSQL server binaries not found (apt-get install postgresql)", file=sys.stderr)
        return 1
    pg = Postgres(bindir, fsync=True).start()
    try:
        dsn = pg.dsn()
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrate(conn)
            version = conn.execute("SHOW server_version").fetchone()
        print(f"center ingest benchmark: PostgreSQL {version[0] if version else '?'} (fsync on), "
              f"{PER_MESSAGE} readings x {len(KEYS)} values per message, {args.batch} readings per transaction, "
              f"{args.stations} stations per worker, {mp.cpu_count()} CPUs", flush=True)
        a = messages([f"a{i:03d}" for i in range(args.stations)], args.readings)
        b = messages([f"b{i:03d}" for i in range(args.stations)], args.readings)
        c = messages([f"c{i:03d}" for i in range(args.stations)], args.readings)
        size = sum(len(p) for _, p in a) / args.readings
        print(f"  {size:.0f} bytes of JSON per reading", flush=True)
        report("1 worker", phase(dsn, {"w1": a}, args.batch), args.readings)
        report("2 workers", phase(dsn, {"w1": b, "w2": c}, args.batch), 2 * args.readings)
        report("1 worker, all duplicates", phase(dsn, {"w1": a}, args.batch), args.readings)
        if args.mqtt:
            through_mqtt(pg, pg.root, messages([f"m{i:03d}" for i in range(args.stations)], args.readings), 2)
    finally:
        pg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
