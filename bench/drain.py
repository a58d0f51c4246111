"""Drain benchmark: one day of a 100-inverter site at 10 s (864,000 readings) out of the buffer.

    python bench/drain.py                       # ~2-3 minutes, ~1.5 GB of disk in a temp dir
    python bench/drain.py --devices 10 --cycles 1000

The buffer file is filled straight through agent.store.buffer.Buffer with Huawei SUN2000-sized readings
(34 values, ~750 bytes of JSON). Then, against a mosquitto started here on a free port:

1. drain: pvgate's own Publisher (site file loaded with agent.config.load_site) publishes the
   backlog while a separate subscriber process (QoS 1, like the county center) counts every
   reading. Meanwhile one new reading per second enters the buffer, and the time until it
   arrives at the subscriber is measured: live data must not wait for the backlog
   (target: < 2 poll intervals = 20 s).
2. raw: the very same messages (same count, same bytes) published by a bare paho client with
   the same in-flight window, nothing else: the ceiling for this broker on this machine.

Printed: readings/s, time to drain, the ratio drain/raw, the live latencies. Target: the full
day drains in under 60 s. Figures vary with the machine: compare ratios measured in one run
(limits.md).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from agent.config import load_site  # noqa: E402
from agent.store.buffer import Buffer  # noqa: E402
from agent.uplink.messages import BACKLOG, MessageBuilder, Topics  # noqa: E402
from agent.uplink.publisher import Publisher  # noqa: E402
from drivers.devicemap import ProfileLibrary  # noqa: E402
from drivers.model import Reading, Value  # noqa: E402

SITE = "bench-drain"
SEQ_RE = re.compile(rb'"seq":(\d+)')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- the subscriber (a separate process, like the county center) ----------------------------


def subscriber(port: int) -> None:
    """Counts readings on pvgate/<site>/data/#; prints `live <seq> <t>` for every non-replay
    reading at once, and `done <readings> <unique> <replay readings> <t last replay>` on SIGTERM."""
    seen = bytearray(1 << 20)
    state = {"readings": 0, "unique": 0, "replay": 0, "t_replay": 0.0}
    done = threading.Event()

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        nonlocal seen
        now = time.time()
        seqs = [int(s) for s in SEQ_RE.findall(msg.payload)]
        replay = b'"replay":true' in msg.payload[-40:]
        for seq in seqs:
            if seq >= len(seen):
                seen.extend(bytearray(max(seq + 1 - len(seen), len(seen))))
            if not seen[seq]:
                seen[seq] = 1
                state["unique"] += 1
            if not replay:
                print(f"live {seq} {now:.6f}", flush=True)
        state["readings"] += len(seqs)
        if replay:
            state["replay"] += len(seqs)
            state["t_replay"] = now

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        client.subscribe(f"pvgate/{SITE}/data/#", qos=1)

    def on_subscribe(*args: Any) -> None:
        print("ready", flush=True)

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{os.getpid()}")
    client.on_message = on_message
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    signal.signal(signal.SIGTERM, lambda *a: done.set())
    client.connect("127.0.0.1", port)
    client.loop_start()
    done.wait()
    client.loop_stop()
    print(f"done {state['readings']} {state['unique']} {state['replay']} {state['t_replay']:.6f}", flush=True)


class SubscriberProc:
    def __init__(self, port: int) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--subscriber", str(port)],
                                     stdout=subprocess.PIPE, text=True)
        self.live: dict[int, float] = {}
        self.final: list[float] = []
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        if not self._ready.wait(15):
            raise SystemExit("subscriber did not start")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = line.split()
            if parts[0] == "ready":
                self._ready.set()
            elif parts[0] == "live":
                self.live[int(parts[1])] = float(parts[2])
            elif parts[0] == "done":
                self.final = [float(p) for p in parts[1:]]

    def finish(self) -> tuple[int, int, int, float]:
        time.sleep(0.5)  # the last messages on their way
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        self._thread.join(10)
        readings, unique, replay, t_replay = self.final
        return int(readings), int(unique), int(replay), t_replay


# -- set-up --------------------------------------------------------------------------------


def start_mosquitto(workdir: Path, port: int) -> subprocess.Popen[bytes]:
    conf = workdir / "mosquitto.conf"
    conf.write_text("\n".join([
        f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence false",
        "max_queued_messages 0",  # the subscriber may lag: queue, do not drop
        "user root" if os.geteuid() == 0 else "", f"log_dest file {workdir / 'mosquitto.log'}", ""]))
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("mosquitto did not start")


def write_site(path: Path, port: int, buffer: Path, devices: int) -> Path:
    lines = ["site:", f"  id: {SITE}", "mqtt:", "  host: 127.0.0.1", f"  port: {port}",
             "buffer:", f"  path: {buffer}", "  max_mb: 4096", "  min_free_mb: 64",
             "agent:", f"  state_dir: {path.parent}",
             "links:", "  - {id: lan, type: tcp, host: 127.0.0.1, port: 502}", "devices:"]
    lines += [f"  - {{id: inv{i:03d}, link: lan, unit: {i}, profile: huawei-sun2000, interval: 10s}}"
              for i in range(1, devices + 1)]
    path.write_text("\n".join(lines) + "\n")
    return path


_POINTS: list[tuple[str, int | None]] = []


def huawei_values(rng: random.Random, cycle: int) -> dict[str, Value]:
    """Plausible values for every published point of huawei-sun2000, at the map's resolution."""
    if not _POINTS:
        for p in ProfileLibrary.default().get("huawei-sun2000").points:
            if p.publish:
                integer = p.type.name_ in ("bits", "u16") and p.scale == 1.0
                _POINTS.append((p.key, None if integer else max(0, -int(f"{p.scale:e}".split("e")[1]))))
    return {key: rng.randrange(0, 600) if digits is None else round(rng.uniform(0, 900) + cycle * 0.001, digits)
            for key, digits in _POINTS}


def fill(buf: Buffer, devices: int, cycles: int) -> float:
    rng = random.Random(7)
    pool = [huawei_values(rng, 0) for _ in range(997)]  # distinct readings, cheaper than 864k draws
    t0 = time.monotonic()
    start_ms = int(time.time() * 1000) - cycles * 10_000
    batch: list[Reading] = []
    for cycle in range(cycles):
        ts = start_ms + cycle * 10_000
        for d in range(1, devices + 1):
            values = dict(pool[(cycle * devices + d) % len(pool)], energy_total=round(1e5 + cycle * 0.37 + d, 2))
            batch.append(Reading(f"inv{d:03d}", ts + d * 40, values, []))
        if len(batch) >= 2000:
            buf.append(batch)
            batch = []
    buf.append(batch)
    return time.monotonic() - t0


# -- the two phases ------------------------------------------------------------------------


def drain(cfg_path: Path, buf: Buffer, backlog: int, port: int) -> dict[str, Any]:
    cfg = load_site(cfg_path)
    sub = SubscriberProc(port)
    pub = Publisher(cfg.uplink(), buf)
    inserted: dict[int, float] = {}
    stop_live = threading.Event()

    def live() -> None:  # one new reading per second, as polling goes on during the drain
        rng = random.Random(1)
        while not stop_live.wait(1.0):
            seq = buf.append([Reading("inv001", int(time.time() * 1000), huawei_values(rng, 0), [])])[0]
            inserted[seq] = time.time()

    t0 = time.time()
    pub.start()
    feeder = threading.Thread(target=live, daemon=True)
    feeder.start()
    while pub.stats.replayed_rows < backlog and time.time() - t0 < 600:
        time.sleep(0.01)
    t_acked = time.time()
    stop_live.set()
    feeder.join()
    while buf.stats().unsent and time.time() - t_acked < 30:
        time.sleep(0.05)
    pub.stop(5.0)
    readings, unique, replay, t_replay = sub.finish()
    latencies = [sub.live[s] - t for s, t in inserted.items() if s in sub.live]
    return {"t_acked": t_acked - t0, "t_received": t_replay - t0, "messages": pub.stats.acked_messages,
            "readings": readings, "unique": unique, "replay": replay, "live_sent": len(inserted),
            "live_got": len(latencies), "latencies": latencies}


def raw(buf: Buffer, cfg_path: Path, backlog: int, port: int) -> dict[str, Any]:
    cfg = load_site(cfg_path)
    builder = MessageBuilder(Topics(cfg.mqtt.topic_prefix, SITE), SITE, cfg.mqtt.batch_max)
    window = max(500, min(20_000, cfg.mqtt.batch_max * len(cfg.devices)))  # Publisher.fetch_rows
    messages: list[tuple[str, bytes]] = []
    after = 0
    while after < backlog:
        rows = buf.range(after + 1, backlog, limit=window)
        messages += [(m.topic, m.payload) for m in builder.build(rows, BACKLOG)]
        after = rows[-1].seq
    sub = SubscriberProc(port)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-raw", protocol=mqtt.MQTTv311)
    client.max_inflight_messages_set(cfg.mqtt.inflight + 10)
    client.max_queued_messages_set(0)
    acked = [0]
    client.on_publish = lambda *a: acked.__setitem__(0, acked[0] + 1)
    client.connect("127.0.0.1", port)
    while not client.is_connected():
        client.loop(0.05)
    t0 = time.time()
    sent = 0
    while acked[0] < len(messages):
        while sent < len(messages) and sent - acked[0] < cfg.mqtt.inflight:
            client.publish(messages[sent][0], messages[sent][1], qos=1)
            sent += 1
        client.loop(0.02)
    t_acked = time.time() - t0
    client.disconnect()
    readings, unique, replay, t_replay = sub.finish()
    return {"t_acked": t_acked, "t_received": t_replay - t0, "messages": len(messages),
            "bytes": sum(len(p) for _, p in messages), "readings": readings}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--cycles", type=int, default=8640, help="polls per device (8640 = one day at 10 s)")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed)")
    ap.add_argument("--subscriber", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.subscriber is not None:
        subscriber(args.subscriber)
        return 0
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="pvgate-drain-"))
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    broker = start_mosquitto(work, port)
    try:
        return run(work, port, args.devices, args.cycles)
    finally:
        broker.terminate()
        broker.wait(10)
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


def run(work: Path, port: int, devices: int, cycles: int) -> int:
    backlog = devices * cycles
    buffer_path = work / "buffer.sqlite"
    site = write_site(work / "site.yaml", port, buffer_path, devices)
    cfg = load_site(site)
    buf = Buffer(buffer_path, cfg.buffer.max_mb, cfg.buffer.keep_sent_days, cfg.buffer.min_free_mb)
    t_fill = fill(buf, devices, cycles)
    size = buf.size_bytes()
    print(f"backlog  {backlog:,} readings ({devices} inverters x {cycles} polls), {size / 1e6:.0f} MB buffer, "
          f"filled in {t_fill:.1f} s ({backlog / t_fill:,.0f} readings/s)")
    d = drain(site, buf, backlog, port)
    r = raw(buf, site, backlog, port)
    buf.close()
    ok = d["unique"] == backlog + d["live_got"] and d["replay"] >= backlog
    lat = d["latencies"]
    print(f"messages {r['messages']:,} ({backlog / r['messages']:.0f} readings, {r['bytes'] / r['messages'] / 1024:.0f} KiB "
          f"per message on average), in-flight window {cfg.mqtt.inflight}")
    print(f"drain    {d['t_acked']:.1f} s until every backlog reading was acknowledged, "
          f"{d['t_received']:.1f} s until the subscriber had them: {backlog / d['t_acked']:,.0f} readings/s "
          f"({d['messages'] / d['t_acked']:,.0f} messages/s)")
    print(f"raw paho {r['t_acked']:.1f} s for the same messages (QoS 1, same window, no buffer): "
          f"{backlog / r['t_acked']:,.0f} readings/s ({r['messages'] / r['t_acked']:,.0f} messages/s)")
    print(f"ratio    drain rate / raw paho rate = {r['t_acked'] / d['t_acked']:.2f}")
    print(f"live     {d['live_got']}/{d['live_sent']} readings inserted once a second during the drain arrived; "
          f"latency max {max(lat, default=float('nan')):.2f} s, median {statistics.median(lat) if lat else float('nan'):.2f} s "
          f"(target < 20 s = 2 poll intervals)")
    print(f"complete {'yes' if ok else 'NO'}: the subscriber saw {d['unique']:,} distinct seqs "
          f"({d['readings'] - d['unique']:,} duplicates)")
    target = d["t_acked"] < 60 and lat and max(lat) < 20 and d["live_got"] == d["live_sent"]
    print(f"target   full day < 60 s and live < 20 s: {'met' if target else 'NOT met'}")
    return 0 if ok and target else 1


if __name__ == "__main__":
    sys.exit(main())
