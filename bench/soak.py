"""Soak: the agent under repeated disturbances for a long time, its footprint sampled throughout.

    python -m bench.soak --minutes 60                  # 200 devices on 20 links at 10 s
    python -m bench.soak --minutes 3 --devices 40 --interval 2s --cycle short --csv /tmp/soak.csv

Real parts, started here: a mosquitto on a free loopback port, pvgate-sim serving the devices on
one TCP listener per link (inverters at `--night standby`, so its accelerated sun (`--speed`)
moves power and energy counters without ever putting them to sleep), and `pvgate run`. Then,
cycle after cycle until the time is up:

1. broker outage: mosquitto is stopped and started again on the same port; readings pile up
   in the buffer and drain afterwards;
2. device faults through the simulator's control port: a few devices each get silent, slow,
   corrupt, exception, intermittent or busy, and one link's TCP connections are dropped; then
   every fault is cleared;
3. reload: the site file alternately gains a device and changes another's interval, and loses
   them again; SIGHUP;
4. clock step: an injected fault, the agent's PVGATE_TEST_CLOCK_FILE test hook
   (agent/service/timekeeping.py) steps its wall clock: +1 h, back, -10 min unsynchronised
   (readings flagged, then re-stamped), back;
5. quiet: broker up, no fault, the last disturbance some seconds past.

Every few seconds the agent is asked (`pvgate status`, the `process` object) for its RSS, open
descriptors, threads and asyncio tasks, with the buffer's unsent count; the buffer's size is
that of its SQLite file and WAL.

Judgement (see `judge`): only samples of the quiet phases count, where every cycle leaves the
agent in the same state. The first cycle whose quiet phase starts after the warm-up (25 % of the
run) is the baseline, the last cycle's quiet phase the end. For each figure the lowest value of
each window is compared: a leak raises the floor, while a transient (an in-flight status
connection, a reconnect, a garbage collection not yet run) does not. RSS may grow by less than
5 %, descriptors, threads and tasks not at all. Exit 1 when a limit is exceeded.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from agent.service.status import StatusUnavailable, query  # noqa: E402
from support.broker import Broker  # noqa: E402
from support.ports import free_port  # noqa: E402
from support.procs import Proc, ProcRegistry  # noqa: E402

FIGURES = ("rss_bytes", "fds", "threads", "tasks")
FAULTS = ("silent", "slow:0.8:0.5", "corrupt:0.5", "exception:4:0.5", "intermittent:0.5", "busy:0.5")
CLOCK_STEPS = ((3600.0, True), (0.0, True), (-600.0, False), (0.0, True))  # (offset s, synchronised)
PER_LINK = 10
INVERTERS_PER_LINK = 8  # and two meters


@dataclass(frozen=True)
class Cycle:
    """Seconds each phase of a cycle lasts."""

    outage: float = 20.0
    faults: float = 20.0
    recover: float = 15.0  # after the outage, after the faults, after reload and clock step
    reload: float = 8.0
    clock: float = 8.0
    quiet: float = 30.0

    @property
    def length(self) -> float:
        return self.outage + self.faults + 3 * self.recover + self.reload + self.clock + self.quiet


CYCLES = {"long": Cycle(), "short": Cycle(outage=6, faults=6, recover=5, reload=3, clock=3, quiet=10)}


@dataclass
class Sample:
    t: float  # seconds since the agent started
    cycle: int
    phase: str
    quiet: bool
    rss_bytes: int | None = None
    fds: int | None = None
    threads: int | None = None
    tasks: int | None = None
    unsent: int | None = None
    buffer_bytes: int | None = None
    mqtt: bool | None = None


@dataclass(frozen=True)
class Limits:
    rss_pct: float = 5.0
    fds: int = 0
    threads: int = 0
    tasks: int = 0


@dataclass
class Verdict:
    ok: bool
    rows: list[dict[str, Any]] = field(default_factory=list)
    baseline_cycle: int | None = None
    final_cycle: int | None = None
    problem: str = ""


# -- the judgement ---------------------------------------------------------------------------


def judge(samples: Sequence[Sample], warmup: float = 0.25, limits: Limits = Limits()) -> Verdict:
    """Compare the floor of each figure in the first quiet window after the warm-up with the
    floor in the last one (module docstring)."""
    if not samples:
        return Verdict(False, problem="no samples")
    warm_end = warmup * max(s.t for s in samples)
    starts: dict[int, float] = {}
    for s in samples:
        if s.quiet:
            starts[s.cycle] = min(starts.get(s.cycle, s.t), s.t)
    cycles = sorted(c for c, t in starts.items() if t >= warm_end)
    if len(cycles) < 2:
        return Verdict(False, problem=f"{len(cycles)} quiet window(s) after the warm-up: the run is too short "
                                      "to judge (at least 2 are needed)")
    first, last = cycles[0], cycles[-1]
    verdict = Verdict(True, baseline_cycle=first, final_cycle=last)
    allowed = {"rss_bytes": limits.rss_pct, "fds": limits.fds, "threads": limits.threads, "tasks": limits.tasks}
    for name in FIGURES:
        base = [v for s in samples if s.quiet and s.cycle == first and (v := getattr(s, name)) is not None]
        end = [v for s in samples if s.quiet and s.cycle == last and (v := getattr(s, name)) is not None]
        if not base or not end:
            verdict.ok = False
            verdict.rows.append({"figure": name, "ok": False, "note": "not sampled"})
            continue
        b, e = min(base), min(end)
        growth = (e - b) * 100.0 / b if name == "rss_bytes" else e - b
        ok = growth < allowed[name] if name == "rss_bytes" else growth <= allowed[name]
        verdict.ok &= ok
        post = [v for s in samples if s.quiet and s.cycle >= first and (v := getattr(s, name)) is not None]
        verdict.rows.append({"figure": name, "baseline": b, "end": e, "growth": growth, "limit": allowed[name],
                             "min": min(post), "max": max(post), "ok": ok})
    return verdict


def format_verdict(v: Verdict) -> str:
    if v.problem:
        return f"soak: cannot judge: {v.problem}"
    lines = [f"growth from the quiet phase of cycle {v.baseline_cycle} (after warm-up) to cycle {v.final_cycle} "
             "(lowest value of each window):",
             f"  {'figure':<10} {'baseline':>10} {'end':>10} {'growth':>9} {'limit':>7}  "
             f"{'range after warm-up':>20}  verdict"]
    for r in v.rows:
        if "baseline" not in r:
            lines.append(f"  {r['figure']:<10} {r['note']}  FAIL")
            continue
        mb = r["figure"] == "rss_bytes"

        def fmt(x: float, mb: bool = mb) -> str:
            return f"{x / 1048576:.1f} MB" if mb else f"{x:g}"

        growth = f"{r['growth']:+.2f} %" if mb else f"{r['growth']:+g}"
        limit = f"< {r['limit']:g} %" if mb else f"<= {r['limit']:g}"
        rng = f"{fmt(r['min'])}..{fmt(r['max'])}"
        lines.append(f"  {r['figure']:<10} {fmt(r['baseline']):>10} {fmt(r['end']):>10} {growth:>9} {limit:>7}  "
                     f"{rng:>20}  {'ok' if r['ok'] else 'FAIL'}")
    lines.append("soak: " + ("PASS" if v.ok else "FAIL: growth beyond the limits"))
    return "\n".join(lines)


# -- the station: simulator and site files ---------------------------------------------------


def layout(devices: int) -> list[list[tuple[int, str]]]:
    """(unit, profile) per link: ten devices a link, eight inverters and two meters."""
    links = []
    for first in range(0, devices, PER_LINK):
        n = min(PER_LINK, devices - first)
        links.append([(u, "huawei-sun2000" if u <= INVERTERS_PER_LINK else "chint-dtsu666") for u in range(1, n + 1)])
    return links


def write_sim(path: Path, ports: list[int], links: list[list[tuple[int, str]]], control: int, speed: float) -> None:
    lines = ["timezone: Asia/Shanghai", f"speed: {speed:g}", "start: '08:00'",
             f"control: tcp://127.0.0.1:{control}", "listeners:"]
    for i, (port, units) in enumerate(zip(ports, links)):
        lines += [f"  - listen: tcp://127.0.0.1:{port}", "    devices:"]
        # Unit 11 of the first link is served always and polled only in the cycles that add it.
        for unit, profile in units + ([(11, "chint-dtsu666")] if i == 0 else []):
            lines.append(f"      - {{unit: {unit}, profile: {profile}, rated_kw: 50, night: standby}}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_site(path: Path, work: Path, broker_port: int, ports: list[int], links: list[list[tuple[int, str]]],
               interval: float, variant: int) -> None:
    """variant 1: one device more and another at a longer interval (what a reload changes)."""
    lines = ["site: {id: soak, name: soak test station, timezone: Asia/Shanghai}",
             f"mqtt: {{host: 127.0.0.1, port: {broker_port}, topic_prefix: pvgate}}",
             f"buffer: {{path: {work / 'buffer.sqlite'}, commit_interval: 1s}}",
             f"agent: {{state_dir: {work}, health_interval: 30s}}", "links:"]
    lines += [f"  - {{id: lan{i:02d}, type: tcp, host: 127.0.0.1, port: {p}, timeout: 0.5s}}"
              for i, p in enumerate(ports)]
    lines.append("devices:")
    for i, units in enumerate(links):
        for unit, profile in units:
            every = interval * 2 if (variant and i == 1 and unit == 1) else interval
            lines.append(f"  - {{id: d{i:02d}u{unit:02d}, link: lan{i:02d}, unit: {unit}, profile: {profile}, "
                         f"interval: {every:g}s, backoff_max: 20s}}")
    if variant:
        lines.append(f"  - {{id: d00u11, link: lan00, unit: 11, profile: chint-dtsu666, interval: {interval:g}s}}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def control(port: int, *msgs: dict[str, Any]) -> list[dict[str, Any]]:
    """Send lines to the simulator's control port; its replies."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        f = sock.makefile("rwb")
        replies = []
        for msg in msgs:
            f.write(json.dumps(msg).encode() + b"\n")
            f.flush()
            replies.append(json.loads(f.readline()))
        return replies


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Options:
    minutes: float = 60.0
    devices: int = 200
    interval: float = 10.0
    speed: float = 10.0
    cycle: Cycle = CYCLES["long"]
    sample_s: float = 5.0
    warmup: float = 0.25
    limits: Limits = Limits()
    seed: int = 1


@dataclass
class Result:
    samples: list[Sample]
    verdict: Verdict
    counts: dict[str, int]
    seconds: float


class Soak:
    """The broker, the simulator and the agent, disturbed cycle after cycle and sampled."""

    def __init__(self, opts: Options, work: Path, csv_path: Path | None = None) -> None:
        self.opts = opts
        self.work = work
        self.csv_path = csv_path
        self.registry = ProcRegistry(work)
        self.broker = Broker(work / "broker")
        self.links = layout(opts.devices)
        self.ports: list[int] = []
        self.control_port = 0
        self.agent: Proc | None = None
        self.phase, self.cycle = "start", 0
        self.samples: list[Sample] = []
        self.counts = {"cycles": 0, "outages": 0, "faults": 0, "drops": 0, "reloads": 0, "clock_steps": 0}
        self.rng = random.Random(opts.seed)
        self.t0 = time.monotonic()
        self._done = threading.Event()
        self._sampler = threading.Thread(target=self._sample_loop, name="soak-sampler", daemon=True)

    @property
    def site(self) -> Path:
        return self.work / "site.yaml"

    @property
    def clock_file(self) -> Path:
        return self.work / "clock.json"

    def start(self) -> None:
        self.broker.start()
        self.ports = [free_port() for _ in self.links]
        self.control_port = free_port()
        write_sim(self.work / "sim.yaml", self.ports, self.links, self.control_port, self.opts.speed)
        sim = self.registry.start([sys.executable, "-m", "simulator.cli", "-c", str(self.work / "sim.yaml")], "sim",
                                  cwd=ROOT)
        sim.wait_for_line(r'^\{"event": "ready"', timeout=30, stream="stdout")
        self._set_clock(0.0, True)
        write_site(self.site, self.work, self.broker.port, self.ports, self.links, self.opts.interval, 0)
        env = {"PVGATE_TEST_CLOCK_FILE": str(self.clock_file), "PVGATE_RUNTIME_DIR": str(self.work)}
        self.agent = self.registry.start([sys.executable, "-m", "agent.cli", "run", "-c", str(self.site)], "agent",
                                         env=env, cwd=ROOT)
        self.agent.wait_for_line(r"running: site", timeout=60, stream="stderr")
        self.t0 = time.monotonic()
        self._sampler.start()

    def stop(self) -> None:
        self._done.set()
        if self._sampler.is_alive():
            self._sampler.join(30)
        if self.agent is not None:
            self.agent.terminate(timeout=30)
        self.registry.cleanup()
        self.broker.stop()

    # -- disturbances ----------------------------------------------------------------------

    def hold(self, phase: str, seconds: float) -> None:
        self.phase = phase
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self.agent is None or not self.agent.running:
                raise RuntimeError(f"the agent exited (rc={self.agent and self.agent.returncode}) during "
                                   f"cycle {self.cycle} {phase}\n{self.agent.tail() if self.agent else ''}")
            time.sleep(min(0.5, max(0.0, end - time.monotonic())))

    def run_cycle(self, n: int) -> None:
        c = self.opts.cycle
        self.cycle = n
        self.phase = "outage"
        self.broker.stop()
        self.counts["outages"] += 1
        self.hold("outage", c.outage)
        self.broker.start()
        self.hold("recover", c.recover)
        faulted = self._faults_on()
        self.hold("faults", c.faults)
        control(self.control_port, *({"unit": u, "listener": i, "fault": "none"} for i, u in faulted))
        self.hold("recover", c.recover)
        self._reload(n)
        self.hold("reload", c.reload)
        self._set_clock(*CLOCK_STEPS[(n - 1) % len(CLOCK_STEPS)])
        self.counts["clock_steps"] += 1
        self.hold("clock", c.clock)
        self.hold("recover", c.recover)
        self.hold("quiet", c.quiet)
        self.counts["cycles"] += 1

    def _faults_on(self) -> list[tuple[int, int]]:
        every = [(i, u) for i, units in enumerate(self.links) for u, _ in units]
        chosen = self.rng.sample(every, max(2, len(every) // 20))
        msgs: list[dict[str, Any]] = [{"unit": u, "listener": i, "fault": FAULTS[k % len(FAULTS)]}
                                      for k, (i, u) in enumerate(chosen)]
        msgs.append({"cmd": "drop", "listener": self.rng.randrange(len(self.links))})
        for reply in control(self.control_port, *msgs):
            if not reply.get("ok"):
                raise RuntimeError(f"the simulator refused a fault: {reply}")
        self.counts["faults"] += len(chosen)
        self.counts["drops"] += 1
        return chosen

    def _reload(self, n: int) -> None:
        assert self.agent is not None
        write_site(self.site, self.work, self.broker.port, self.ports, self.links, self.opts.interval, n % 2)
        mark = self.agent.mark()
        self.agent.send_signal(signal.SIGHUP)
        self.agent.wait_for_line(r"reload \(SIGHUP\) (applied|rejected)", timeout=60, since=mark, stream="stderr")
        if self.agent.find_line(r"reload \(SIGHUP\) rejected", since=mark, stream="stderr"):
            raise RuntimeError(f"the agent rejected the soak's site file\n{self.agent.tail()}")
        self.counts["reloads"] += 1

    def _set_clock(self, offset_s: float, synced: bool) -> None:
        tmp = self.clock_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"offset_s": offset_s, "synced": synced}))
        os.replace(tmp, self.clock_file)

    # -- sampling --------------------------------------------------------------------------

    def _sample_loop(self) -> None:
        fields = list(Sample.__dataclass_fields__)
        out = open(self.csv_path, "w", newline="", encoding="utf-8") if self.csv_path else None  # noqa: SIM115
        try:
            writer = csv.DictWriter(out, fieldnames=fields) if out else None
            if writer is not None:
                writer.writeheader()
            while not self._done.wait(self.opts.sample_s):
                sample = self.sample()
                self.samples.append(sample)
                if writer is not None and out is not None:  # as it comes: a run cut short keeps its samples
                    writer.writerow(asdict(sample))
                    out.flush()
        finally:
            if out is not None:
                out.close()

    def sample(self) -> Sample:
        from agent.service import process

        before = (self.cycle, self.phase)
        s = Sample(round(time.monotonic() - self.t0, 1), self.cycle, self.phase, False)
        pid = self.agent.pid if self.agent is not None else None
        try:
            status = query(self.work / "pvgate.sock", {"cmd": "status", "values": False}, timeout_s=20).get("status", {})
            pr = status.get("process", {})
            s.rss_bytes, s.fds, s.threads, s.tasks = pr.get("rss_bytes"), pr.get("fds"), pr.get("threads"), pr.get("tasks")
            s.unsent = status.get("buffer", {}).get("unsent")
            s.mqtt = status.get("mqtt", {}).get("connected")
        except StatusUnavailable:  # from outside: all but the tasks
            s.rss_bytes, s.fds, s.threads = process.rss_bytes(pid), process.open_fds(pid), process.os_threads(pid)
        s.buffer_bytes = sum(p.stat().st_size for p in self.work.glob("buffer.sqlite*") if p.is_file())
        # Comparable only if the whole question was asked in the quiet phase of one cycle.
        s.quiet = before == (self.cycle, self.phase) == (s.cycle, "quiet")
        return s


def run(opts: Options, work: Path, progress: bool = True, csv_path: Path | None = None) -> Result:
    soak = Soak(opts, work, csv_path)
    n_cycles = n_cycles_of(opts)
    try:
        soak.start()
        soak.hold("settle", opts.cycle.recover)
        for n in range(1, n_cycles + 1):
            soak.run_cycle(n)
            if progress:
                last = soak.samples[-1] if soak.samples else Sample(0, 0, "", False)
                print(f"cycle {n}/{n_cycles} t={last.t:.0f}s rss={(last.rss_bytes or 0) / 1048576:.1f}MB "
                      f"fds={last.fds} threads={last.threads} tasks={last.tasks} unsent={last.unsent} "
                      f"buffer={(last.buffer_bytes or 0) / 1048576:.1f}MB", flush=True)
    finally:
        seconds = time.monotonic() - soak.t0
        soak.stop()
    samples = list(soak.samples)
    return Result(samples, judge(samples, opts.warmup, opts.limits), dict(soak.counts), seconds)


# -- the command -----------------------------------------------------------------------------


def summary(result: Result, opts: Options) -> str:
    s = result.samples
    quiet = [x for x in s if x.quiet]
    rss = [x.rss_bytes for x in s if x.rss_bytes]
    buf = [x.buffer_bytes for x in s if x.buffer_bytes is not None]
    unsent = [x.unsent for x in s if x.unsent is not None]
    c = result.counts
    lines = [f"soak: {opts.devices} devices on {len(layout(opts.devices))} links every {opts.interval:g} s, "
             f"simulator at {opts.speed:g}x, {result.seconds / 60:.1f} min, {len(s)} samples ({len(quiet)} quiet)",
             f"  {c['cycles']} cycles: {c['outages']} broker outages, {c['faults']} device faults and {c['drops']} "
             f"link drops, {c['reloads']} reloads, {c['clock_steps']} clock steps (injected: test hook)"]
    if rss:
        lines.append(f"  RSS first sample {rss[0] / 1048576:.1f} MB, last {rss[-1] / 1048576:.1f} MB, "
                     f"peak {max(rss) / 1048576:.1f} MB")
    if buf:
        lines.append(f"  buffer (SQLite + WAL) {buf[0] / 1048576:.1f} MB -> {buf[-1] / 1048576:.1f} MB; unsent at most "
                     f"{max(unsent, default=0)}, in the last quiet phase "
                     f"{min((x.unsent for x in quiet[-3:] if x.unsent is not None), default=None)}")
    return "\n".join(lines)


def write_json(result: Result, path: Path) -> None:
    path.write_text(json.dumps({"counts": result.counts, "seconds": result.seconds, "verdict": asdict(result.verdict),
                                "samples": [asdict(x) for x in result.samples]}, indent=1))


def load_csv(path: Path) -> list[Sample]:
    """Samples written by --csv (of a run finished or cut short)."""
    def num(text: str) -> int | None:
        return None if text == "" else int(float(text))

    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            out.append(Sample(float(row["t"]), int(row["cycle"]), row["phase"], row["quiet"] == "True",
                              num(row["rss_bytes"]), num(row["fds"]), num(row["threads"]), num(row["tasks"]),
                              num(row["unsent"]), num(row["buffer_bytes"]),
                              None if row["mqtt"] == "" else row["mqtt"] == "True"))
    return out


def _seconds(text: str) -> float:
    try:
        value = float(text[:-1] if text.endswith("s") else text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds such as 10s or 2.5, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=60.0, help="how long (default 60)")
    p.add_argument("--devices", type=_count, default=200, help="simulated devices, ten per link (default 200)")
    p.add_argument("--interval", type=_seconds, default=10.0, help="poll interval of every device (default 10s)")
    p.add_argument("--speed", type=float, default=10.0, help="the simulator's clock speed (default 10)")
    p.add_argument("--cycle", choices=sorted(CYCLES), default="long",
                   help=f"phase lengths: long = {CYCLES['long'].length:g} s a cycle, "
                        f"short = {CYCLES['short'].length:g} s (default long)")
    p.add_argument("--sample", type=float, default=5.0, help="seconds between samples (default 5)")
    p.add_argument("--warmup", type=float, default=0.25, help="fraction of the run not judged (default 0.25)")
    p.add_argument("--rss-limit", type=float, default=5.0, help="RSS growth allowed, percent (default 5)")
    p.add_argument("--csv", type=Path, help="write the samples here, one line as each is taken")
    p.add_argument("--json", type=Path, help="write samples, counts and verdict here")
    p.add_argument("--judge", type=Path, metavar="CSV", help="judge the samples of an earlier run (--csv) and exit")
    p.add_argument("--workdir", type=Path, help="keep logs, site file and buffer here (default: a temp dir, removed)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    opts = Options(args.minutes, args.devices, args.interval, args.speed, CYCLES[args.cycle], args.sample, args.warmup,
                   Limits(rss_pct=args.rss_limit))
    if args.judge is not None:
        try:
            samples = load_csv(args.judge)
        except (OSError, KeyError, ValueError) as err:
            print(f"soak: cannot read samples from {args.judge}: {err}", file=sys.stderr)
            return 66
        verdict = judge(samples, args.warmup, opts.limits)
        print(format_verdict(verdict))
        return 0 if verdict.ok else 1
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    print(f"soak: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {n_cycles_of(opts)} cycles of "
          f"{opts.cycle.length:g} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="pvgate-soak-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = run(opts, work, csv_path=args.csv)
    if args.json is not None:
        write_json(result, args.json)
    print(summary(result, opts))
    print(format_verdict(result.verdict), flush=True)
    return 0 if result.verdict.ok else 1


def n_cycles_of(opts: Options) -> int:
    return max(1, int(opts.minutes * 60 // opts.cycle.length))


if __name__ == "__main__":
    sys.exit(main())
