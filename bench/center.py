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
3. one worker storing the same messages again (every reading a duplicate: a replay or resend).

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

import psycopg  # noqa: E402

from center import store  # noqa: E402
from center.schema import migrate  # noqa: E402
from support.postgres import Postgres, find_bin  # noqa: E402

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--readings", type=int, default=200_000, help="per worker")
    parser.add_argument("--batch", type=int, default=5000, help="readings per transaction")
    parser.add_argument("--stations", type=int, default=100, help="per worker")
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
    finally:
        pg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
