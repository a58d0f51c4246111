"""Bus benchmark: one 9600-baud RS-485 link with 30 inverters and 1 meter, against the wire limit.

    python bench/bus.py                      # ~2.5 minutes
    python bench/bus.py --interval 10 --healthy-cycles 3 --silent-cycles 9
    python bench/bus.py --sparse             # devices refusing reads across their holes (bench/sparse.py)

pvgate-sim serves 30 huawei-sun2000 (units 1-30) and one chint-dtsu666 (unit 31) on one end of a
socat pty pair, emulating a 9600-baud 8N1 wire with a fixed device turnaround; pvgate's own
LinkWorker and LinkClient poll them from the other end, ticked every interval like the agent's
scheduler. Printed:

1. the measured full cycle (tick to the last device's reading, mean over the healthy cycles),
   the wire-limit minimum for the same reads (limits.md §1, agent/commission/budget.py, with the
   simulator's turnaround) and their ratio (target <= 1.15);
2. with 3 of the 30 inverters silent: the live devices' cycle (tick to the last live device's
   reading), per phase (first cycle, detection until offline, steady state with backoff
   probes), and its growth over the healthy cycle (target <= 10 %), with the bus time the dead
   devices cost.

Figures vary with the machine: compare ratios measured in one run (limits.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.commission.budget import device_cycle_seconds
from agent.poller import LinkWorker
from drivers.devicemap import ProfileLibrary
from drivers.model import Device, Event, Link, LinkType, Reading, SerialSettings

INVERTERS = 30
METER_UNIT = 31
SILENT_UNITS = (5, 15, 25)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def control(port: int, msg: dict[str, object]) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall((json.dumps(msg) + "\n").encode())
        reply = json.loads(s.makefile().readline())
    if not reply.get("ok"):
        raise RuntimeError(f"simulator control: {reply}")


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ctl = free_port()
        self.tick_times: list[float] = []
        self.asked: dict[str, int] = {}  # device -> tick of its pending poll
        self.done: dict[int, dict[str, float]] = {}  # tick -> device -> reading time
        self.offline_at: dict[str, float] = {}

    # -- processes -----------------------------------------------------------------------------

    def start(self) -> tuple[Path, Path]:
        socat = shutil.which("socat")
        if socat is None:
            sys.exit("bench/bus.py needs socat (apt-get install socat)")
        a, b = self.tmp / "pty-sim", self.tmp / "pty-agent"
        self._spawn([socat, "-d", "-d", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"], "socat")
        deadline = time.monotonic() + 10
        while not (a.exists() and b.exists()):
            if time.monotonic() > deadline:
                sys.exit("socat made no pty pair")
            time.sleep(0.02)
        listen = f"rtu://{a}?baudrate={self.args.baud}&parity=N&turnaround_ms={self.args.turnaround_ms:g}"
        cmd = [sys.executable, "-m", "simulator.cli", "--listen", listen, "--control", f"tcp://127.0.0.1:{self.ctl}",
               "--start", "12:00"]
        cmd += self.sim_devices()
        sim = self._spawn(cmd, "sim", stdout=subprocess.PIPE)
        assert sim.stdout is not None
        line = sim.stdout.readline().decode()
        if '"ready"' not in line:
            sys.exit(f"pvgate-sim did not start: {line!r}; see {self.tmp}/sim.err")
        return a, b

    def sim_devices(self) -> list[str]:
        args = [arg for u in range(1, INVERTERS + 1) for arg in ("--device", f"{u}:huawei-sun2000")]
        return [*args, "--device", f"{METER_UNIT}:chint-dtsu666"]

    def _spawn(self, cmd: list[str], name: str, stdout: int | None = None) -> subprocess.Popen[bytes]:
        err = open(self.tmp / f"{name}.err", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(cmd, stdout=stdout or subprocess.DEVNULL, stderr=err, cwd=ROOT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)

    # -- polling -------------------------------------------------------------------------------

    def sink(self, item: Reading | Event) -> None:
        now = time.monotonic()
        if isinstance(item, Reading):
            tick = self.asked.get(item.device)
            if tick is not None:
                self.done.setdefault(tick, {})[item.device] = now
        elif item.event == "offline":
            self.offline_at[item.device] = now

    async def run(self, agent_end: Path) -> None:
        a = self.args
        link = Link("bus1", LinkType.RTU, serial=SerialSettings(str(agent_end), a.baud, "N", 1),
                    timeout=a.timeout, retries=a.retries, inter_frame_s=a.inter_frame)
        lib = ProfileLibrary.default()
        inv, meter = lib.get("huawei-sun2000"), lib.get("chint-dtsu666")
        devices = [Device(f"inv{u:02d}", "bus1", u, inv, a.interval) for u in range(1, INVERTERS + 1)]
        devices.append(Device("meter", "bus1", METER_UNIT, meter, a.interval))
        self.devices = devices
        self.link = link
        worker = LinkWorker(link, devices, self.sink, identity_sink=lambda _d, _v: None)
        task = asyncio.create_task(worker.run())
        # Warm-up: one poll of everything, which also reads every nameplate once (like the agent).
        for d in devices:
            worker.request(d.id)
        while any(s.queued for s in worker.states.values()):
            await asyncio.sleep(0.05)
        self.done.clear()
        healthy_ticks = a.healthy_cycles
        total = healthy_ticks + a.silent_cycles
        t0 = time.monotonic() + 0.5
        dead_before = probe_before = 0.0
        try:
            for k in range(total):
                await asyncio.sleep(max(0.0, t0 + k * a.interval - time.monotonic()))
                if k == healthy_ticks:
                    for u in SILENT_UNITS:
                        control(self.ctl, {"unit": u, "fault": "silent"})
                    dead_before = self._dead_bus_s(worker)
                    probe_before = worker.probe_s
                self.tick_times.append(time.monotonic())
                for d in devices:
                    if worker.request(d.id):
                        self.asked[d.id] = k
            await asyncio.sleep(max(0.0, t0 + total * a.interval - time.monotonic()))
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.worker = worker
        self.dead_bus_s = self._dead_bus_s(worker) - dead_before
        self.probe_bus_s = worker.probe_s - probe_before
        self.healthy_ticks = healthy_ticks

    @staticmethod
    def _dead_bus_s(worker: LinkWorker) -> float:
        return sum(s.bus_s for s in worker.states.values() if s.device.unit in SILENT_UNITS)

    # -- figures -------------------------------------------------------------------------------

    def cycle(self, k: int, ids: list[str]) -> float | None:
        got = self.done.get(k, {})
        if not all(i in got for i in ids):
            return None
        return max(got[i] for i in ids) - self.tick_times[k]

    def report(self) -> int:
        a = self.args
        ta = a.turnaround_ms / 1000.0
        all_ids = [d.id for d in self.devices]
        live = [d for d in self.devices if d.unit not in SILENT_UNITS]
        live_ids = [d.id for d in live]
        wire_all = sum(device_cycle_seconds(d, self.link, ta) for d in self.devices)
        wire_live = sum(device_cycle_seconds(d, self.link, ta) for d in live)
        reads = sum(len(s.blocks) for s in self.worker.states.values())

        healthy = [self.cycle(k, all_ids) for k in range(self.healthy_ticks)]
        healthy_ok = [c for c in healthy if c is not None]
        h_mean = statistics.mean(healthy_ok) if healthy_ok else float("nan")
        ratio = h_mean / wire_all

        silent_ks = list(range(self.healthy_ticks, len(self.tick_times)))
        live_cycles = {k: self.cycle(k, live_ids) for k in silent_ks}
        offline_done = max(self.offline_at.values(), default=float("inf"))
        first = live_cycles[silent_ks[0]]
        detect = [c for k, c in live_cycles.items() if c is not None and self.tick_times[k] <= offline_done]
        steady = [c for k, c in live_cycles.items() if c is not None and self.tick_times[k] > offline_done]
        measured = [c for c in live_cycles.values() if c is not None]
        missed = sum(1 for c in live_cycles.values() if c is None)
        s_mean = statistics.mean(measured) if measured else float("nan")
        st_mean = statistics.mean(steady) if steady else float("nan")
        growth = s_mean / h_mean - 1
        growth_steady = st_mean / h_mean - 1

        def fmt(xs: list[float]) -> str:
            return ", ".join(f"{x:.2f}" for x in xs)

        print(f"bus benchmark: {INVERTERS} x huawei-sun2000 + 1 x chint-dtsu666 on one {a.baud}-baud 8N1 link "
              f"(socat pty, simulated wire), turnaround {a.turnaround_ms:g} ms, interval {a.interval:g} s")
        print(f"  link: timeout {a.timeout:g} s + wire time, retries {a.retries}, quiet gap {a.inter_frame:g} s; "
              f"{reads} reads per full cycle")
        print("healthy bus")
        print(f"  measured full cycle     {h_mean:6.2f} s   (mean of {len(healthy_ok)} cycles: {fmt(healthy_ok)})")
        print(f"  wire-limit minimum      {wire_all:6.2f} s   (limits.md §1 with {a.turnaround_ms:g} ms turnaround)")
        print(f"  ratio                   {ratio:6.3f}     (target <= 1.15)  "
              f"overhead {(h_mean - wire_all) / reads * 1000:.1f} ms per transaction")
        print(f"3 of {INVERTERS} inverters silent (units {', '.join(map(str, SILENT_UNITS))}); "
              f"live devices: {len(live)}, their wire minimum {wire_live:.2f} s")
        print(f"  live cycle, first after the fault     {first if first is not None else float('nan'):6.2f} s")
        print(f"  live cycle, until all 3 were offline  {fmt(detect)}")
        print(f"  live cycle, steady (probing, backoff) {fmt(steady)}")
        print(f"  live cycle mean, all {len(measured)} cycles     {s_mean:6.2f} s   growth {growth:+.1%} over the healthy "
              f"cycle (target <= +10%); steady state {st_mean:.2f} s, growth {growth_steady:+.1%}")
        print(f"  live polls missed: {missed} cycles incomplete; overruns "
              f"{sum(s.overruns for s in self.worker.states.values() if s.device.id in live_ids)}; "
              f"failed polls of live devices {sum(s.failed_polls for s in self.worker.states.values() if s.device.id in live_ids)}")
        print(f"  dead devices: offline after {max(self.offline_at.values(), default=0) - self.tick_times[self.healthy_ticks]:.1f} s; "
              f"they took {self.dead_bus_s:.2f} s of bus time in {len(silent_ks)} cycles "
              f"({self.probe_bus_s:.2f} s of it probes once offline); "
              f"timeouts {self.worker.client.stats.timeouts}, late frames {self.worker.client.stats.late_frames}")
        ok = ratio <= 1.15 and growth <= 0.10 and growth_steady <= 0.10 and missed == 0
        print(f"result: {'PASS' if ok else 'MISS'} (ratio {ratio:.3f} <= 1.15; live-cycle growth {growth:+.1%} over "
              f"all silent cycles, {growth_steady:+.1%} steady, <= +10%; no live poll missed)")
        return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--baud", type=int, default=9600)
    p.add_argument("--turnaround-ms", type=float, default=20.0, help="the simulated devices' turnaround")
    p.add_argument("--interval", type=float, default=10.0, help="poll interval of every device (s)")
    p.add_argument("--healthy-cycles", type=int, default=3)
    p.add_argument("--silent-cycles", type=int, default=9)
    p.add_argument("--timeout", type=float, default=0.5)
    p.add_argument("--retries", type=int, default=1)
    p.add_argument("--inter-frame", type=float, default=0.05, help="quiet gap after a timeout (s)")
    p.add_argument("--sparse", action="store_true",
                   help="devices served from vendor register images that refuse reads across holes")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    tmp = Path(tempfile.mkdtemp(prefix="pvgate-bench-"))
    if args.sparse:
        from bench.sparse import SparseBench  # noqa: PLC0415 - bench/sparse.py imports this module

        bench: Bench = SparseBench(args, tmp)
    else:
        bench = Bench(args, tmp)
    try:
        _, agent_end = bench.start()
        asyncio.run(bench.run(agent_end))
        return bench.report()
    finally:
        bench.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
