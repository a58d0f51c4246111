"""Sections cpu, profile, idle, disk and startup of the suite (fanout and gateway: bench/fleet.py).

Each section starts its own simulators and agents (the broker and the subscriber are the suite's),
measures over a steady window, stops what it started and returns Figures.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.figures import Figure
from bench.bare import plan_of
from bench.harness import (ROOT, Agent, Harness, Window, cpu_seconds, free_port, io_write_bytes, percentile,
                           proc_status)

TEN = "bench-10v"


@dataclass
class Options:
    quick: bool = False
    window: float | None = None  # overrides every window (the test uses tiny ones)
    buffer_mb: float | None = None  # the start-up section's buffer
    cpu_share: float = 0.2  # the gateway section's limit, a share of one core

    def secs(self, full: float, quick: float) -> float:
        return self.window if self.window is not None else (quick if self.quick else full)


@dataclass
class Steady:
    """An agent's steady window: CPU, disk writes and memory from /proc, readings from the subscriber."""

    agent: Agent
    pid: int
    t0: float
    t1: float
    cpu_s: float
    write_bytes: int | None
    rss_kb: int
    threads: int
    window: Window
    others: dict[str, float] = field(default_factory=dict)  # CPU seconds of other pids, same window

    @property
    def seconds(self) -> float:
        return self.t1 - self.t0

    @property
    def values(self) -> int:
        return sum(a.values for a in self.window.readings)


def steady(h: Harness, site: Path, name: str, devices: int, seconds: float, *,
           prefix: list[str] | None = None, python_args: list[str] | None = None,
           others: Callable[[], dict[str, int]] | None = None,
           hooks: tuple[Callable[[int], None], Callable[[], None]] | None = None, warm: float = 2.0) -> Steady:
    """Start the agent, wait until every device's readings flow, measure `seconds`, stop it."""
    assert h.sub is not None
    h.sub.clear()
    agent = h.agent(site, name, prefix, python_args)
    try:
        pid = h.agent_pid(agent)
        h.wait_flowing(agent, devices)
        time.sleep(warm)
        pids = others() if others else {}
        before = {k: cpu_seconds(p) for k, p in pids.items()}
        io0, c0, t0 = io_write_bytes(pid), cpu_seconds(pid), time.time()
        if hooks:
            hooks[0](pid)
        time.sleep(seconds)
        if hooks:
            hooks[1]()
        c1, io1, t1 = cpu_seconds(pid), io_write_bytes(pid), time.time()
        after = {k: cpu_seconds(p) - before[k] for k, p in pids.items()}
        st = proc_status(pid)
        time.sleep(1.5)  # the window's last readings are on their way
    finally:
        h.stop(agent.proc)
    written = None if io0 is None or io1 is None else io1 - io0
    return Steady(agent, pid, t0, t1, c1 - c0, written, st.get("VmRSS", 0), st.get("Threads", 0),
                  Window.of(h.sub, t0, t1), after)


# -- the 20 x 10 values workload -------------------------------------------------------------------


def ten_value_ports(h: Harness, name: str, n: int) -> tuple[subprocess.Popen[bytes], list[int]]:
    """A simulator serving n devices of 10 values, each behind its own Modbus TCP port."""
    for attempt in range(3):
        # free_port's ports come from the ephemeral range, where the clients of the running
        # agents take theirs too: one may be gone before the simulator binds it. Fresh ports then.
        ports = [free_port() for _ in range(n)]
        try:
            return h.simulator(name, [(f"tcp://127.0.0.1:{p}", [(1, TEN)]) for p in ports]), ports
        except RuntimeError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def tcp_endpoints(ports: list[int]) -> list[dict[str, object]]:
    """bench/bare.py's links for ten_value_ports."""
    return [{"kind": "tcp", "host": "127.0.0.1", "port": p} for p in ports]


def tcp_workload(h: Harness, name: str, n: int = 20, interval: float = 1.0) -> tuple[Path, list[int]]:
    """n devices of 10 values, each behind its own Modbus TCP port (a LAN of small inverters)."""
    _, ports = ten_value_ports(h, f"{name}-sim", n)
    links = [f"{{id: lan{i:02d}, type: tcp, host: 127.0.0.1, port: {p}}}" for i, p in enumerate(ports, 1)]
    devices = [(f"dev{i:02d}", f"lan{i:02d}", 1, TEN, interval) for i in range(1, n + 1)]
    return h.site_file(name, links, devices), ports


class Bare:
    """bench/bare.py in its own process, reading what `pvgate plan` says the agent reads; with
    chain=True the bare chain (stored, published at QoS 1, marked sent) to the suite's broker."""

    def __init__(self, h: Harness, site: Path, endpoints: list[dict[str, object]], chain: bool = False) -> None:
        plan = plan_of(site)
        for link, ep in zip(plan, endpoints):
            ep["devices"] = [{"unit": d["unit"], "interval": d["interval"], "blocks": d["blocks"]}
                             for d in link["devices"]]
        self.reads = sum(len(d["blocks"]) for lk in plan for d in lk["devices"])
        name = f"{site.parent.name}-{'chain' if chain else 'bare'}"
        path = h.tmp / f"{name}.json"
        path.write_text(json.dumps(endpoints), encoding="utf-8")
        extra = ["--chain", str(h.broker.port), str(h.tmp / f"{name}.sqlite")] if chain and h.broker else []
        self.proc = h.spawn([sys.executable, str(ROOT / "bench" / "bare.py"), str(path), *extra], name,
                            stdout=subprocess.PIPE)
        self.polls = self.sent = 0
        self._marks: list[tuple[int, int, int | None]] = []  # (polls, sent, write_bytes) at each mark
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(b"polls "):
                self.polls = int(line.split()[1])
            elif line.startswith(b"chain "):  # chain rows N sent M
                self.sent = int(line.split()[4])

    def mark(self, _pid: int = 0) -> None:
        """The window's start, then its end: what the program had done by then."""
        self._marks.append((self.polls, self.sent, io_write_bytes(self.proc.pid)))

    def in_window(self) -> int:
        return self._marks[1][0] - self._marks[0][0] if len(self._marks) >= 2 else 0

    def sent_in_window(self) -> int:
        return self._marks[1][1] - self._marks[0][1] if len(self._marks) >= 2 else 0

    def written_in_window(self) -> int | None:
        """Bytes the program wrote to disk in the window (/proc/<pid>/io), None if unreadable."""
        if len(self._marks) < 2:
            return None
        w0, w1 = self._marks[0][2], self._marks[1][2]
        return w1 - w0 if w0 is not None and w1 is not None else None


def _cpu_pair(h: Harness, opt: Options, kind: str) -> list[Figure]:
    n = 20
    if kind == "tcp":
        site, _ = tcp_workload(h, "cpu-tcp", n)
        sims, endpoints = [], []
        for who in ("bare", "chain"):  # each floor against its own simulator, as the agent
            sim, ports = ten_value_ports(h, f"cpu-tcp-{who}-sim", n)
            sims.append(sim)
            endpoints.append(tcp_endpoints(ports))
    else:
        pair, pair_bare, pair_chain = h.pty_pair("agent"), h.pty_pair("bare"), h.pty_pair("chain")
        if pair is None or pair_bare is None or pair_chain is None:
            return [Figure("cpu", "RTU over pty", None, note="socat is not installed")]
        units = [(u, TEN) for u in range(1, n + 1)]
        url = "rtu://{}?baudrate=115200&parity=N&turnaround_ms=0"
        h.simulator("cpu-rtu-sim", [(url.format(pair[0]), units)])
        sims = [h.simulator(f"cpu-rtu-{who}-sim", [(url.format(pp[0]), units)])
                for who, pp in (("bare", pair_bare), ("chain", pair_chain))]
        site = h.site_file("cpu-rtu", [f"{{id: bus1, type: rtu, port: {pair[1]}, baudrate: 115200, parity: N}}"],
                           [(f"dev{u:02d}", "bus1", u, TEN, 1.0) for u in range(1, n + 1)])
        endpoints = [[{"kind": "rtu", "port": str(pp[1]), "baudrate": 115200}] for pp in (pair_bare, pair_chain)]
    bare, chain = Bare(h, site, endpoints[0]), Bare(h, site, endpoints[1], chain=True)

    def marks(_pid: int = 0) -> None:
        bare.mark()
        chain.mark()

    run = steady(h, site, f"agent-cpu-{kind}", n, opt.secs(60, 10),
                 others=lambda: {"bare": bare.proc.pid, "chain": chain.proc.pid}, hooks=(marks, marks))
    bare_st, chain_st = proc_status(bare.proc.pid), proc_status(chain.proc.pid)
    for proc in (bare.proc, chain.proc, *sims):
        h.stop(proc)
    got, values = len(run.window.readings), run.values
    polls, chain_polls = bare.in_window(), chain.in_window()

    def per_k(cpu: float, vals: int) -> float | None:  # CPU-ms per 1,000 values
        return cpu * 1000.0 / (vals / 1000.0) if vals else None

    agent_k = per_k(run.cpu_s, values)
    bare_k = per_k(run.others["bare"], polls * 10)
    # A floor that fell behind (reads not acknowledged in the window) would flatter nothing but
    # itself: no figure then, rather than a cheap one.
    chain_kept_up = chain.sent_in_window() >= 0.9 * chain_polls
    chain_k = per_k(run.others["chain"], chain_polls * 10) if chain_kept_up else None
    s, label = "cpu", kind.upper() if kind == "tcp" else "RTU over pty"
    reqs = (polls * bare.reads / n) / run.seconds if polls else 0.0
    lat = run.window.latencies()
    figs = [
        Figure(s, f"{label}: pvgate CPU per 1,000 values", agent_k, "CPU-ms",
               note=f"{n} devices x 10 values at 1 s, {got} readings in {run.seconds:.0f} s, "
                    f"RSS {run.rss_kb / 1024:.0f} MB, {run.threads} threads"),
        Figure(s, f"{label}: bare pymodbus client, same reads", bare_k, "CPU-ms",
               note=f"{polls} polls, {reqs:.0f} requests/s, RSS {bare_st.get('VmRSS', 0) / 1024:.0f} MB, "
                    f"{bare_st.get('Threads', 0)} thread(s)"),
        Figure(s, f"{label}: pvgate / bare client", agent_k / bare_k if agent_k and bare_k else None, "x", 2,
               ("<=", 1.5)),
        Figure(s, f"{label}: bare chain (reads, SQLite row, QoS 1 message, marked sent)", chain_k, "CPU-ms",
               note=f"{chain_polls} polls, {chain.sent_in_window()} acknowledged, "
                    f"RSS {chain_st.get('VmRSS', 0) / 1024:.0f} MB, {chain_st.get('Threads', 0)} thread(s)"
                    + ("" if chain_kept_up else "; fewer than 90 % acknowledged: not a floor")),
        Figure(s, f"{label}: bare chain / bare client", chain_k / bare_k if chain_k and bare_k else None, "x", 2,
               note="what the contract costs: one durable row and one acknowledged message per read"),
        Figure(s, f"{label}: pvgate / bare chain", agent_k / chain_k if agent_k and chain_k else None, "x", 2,
               ("<=", 1.5), note="what pvgate adds to the contract's least"),
    ]
    if kind == "tcp":
        figs.append(Figure(s, "TCP: latency poll -> subscriber p50", percentile(lat, 50), "s", 3, ("<=", 0.3)))
        figs.append(Figure(s, "TCP: latency poll -> subscriber p99", percentile(lat, 99), "s", 3))
    return figs


def section_cpu(h: Harness, opt: Options) -> list[Figure]:
    return _cpu_pair(h, opt, "tcp") + _cpu_pair(h, opt, "rtu")


def section_profile(h: Harness, opt: Options) -> list[Figure]:
    from bench.stageprof import STAGES, STARTUP, breakdown

    site, _ = tcp_workload(h, "profile", 20)
    out = site.parent / "agent.pstats"
    run = steady(h, site, "agent-profile", 20, opt.secs(60, 10),
                 python_args=[str(ROOT / "bench" / "stageprof.py"), str(out)])
    if not out.exists():
        return [Figure("profile", "stage breakdown", None, note="the profiled agent wrote no profile")]
    stages = breakdown(str(out))
    startup = stages.pop(STARTUP)
    total = sum(stages.values()) or 1.0  # shares of the running agent's work, start-up apart
    readings = max(1, len(run.window.readings))
    note = (f"20 x 10 values at 1 s, cProfile with thread CPU time, {total:.2f} CPU-s profiled "
            f"after start-up ({startup:.2f} CPU-s reading the site file and device maps)")
    figs = [Figure("profile", f"stage: {name}", 100.0 * stages[name] / total, "%", 1,
                   note=note if i == 0 else "") for i, name in enumerate(STAGES)]
    figs.append(Figure("profile", "profiled CPU per reading (with profiler overhead)",
                       1e3 * run.cpu_s / readings, "ms", 2))
    return figs


def section_idle(h: Harness, opt: Options) -> list[Figure]:
    """One device read once an hour, health every 60 s: between polls the agent only waits."""
    port = free_port()
    sim = h.simulator("idle-sim", [(f"tcp://127.0.0.1:{port}", [(1, TEN)])])
    site = h.site_file("idle", [f"{{id: lan, type: tcp, host: 127.0.0.1, port: {port}}}"],
                       [("dev01", "lan", 1, TEN, 3600.0)])
    agent = h.agent(site, "agent-idle")
    try:
        deadline = time.time() + 30
        while agent.ready_at is None and time.time() < deadline and agent.proc.poll() is None:
            time.sleep(0.1)
        time.sleep(opt.secs(5, 3))  # connected, first poll and meta done
        pid, seconds = h.agent_pid(agent), opt.secs(60, 10)
        c0 = cpu_seconds(pid)
        time.sleep(seconds)
        cpu = cpu_seconds(pid) - c0
        st = proc_status(pid)
    finally:
        h.stop(agent.proc)
        h.stop(sim)
    return [Figure("idle", "idle agent, share of one core", 100.0 * cpu / seconds, "%", 2, ("<", 0.1),
                   note=f"1 device read hourly, health every 60 s; {seconds:.0f} s window, resolution "
                        f"{100 * 0.01 / seconds:.2f} % (10 ms clock ticks); RSS {st.get('VmRSS', 0) / 1024:.0f} MB")]


class Strace:
    """fsync/fdatasync counts of a running pid (all threads) between start() and stop()."""

    def __init__(self, h: Harness) -> None:
        self.h, self.out = h, h.tmp / "strace.txt"
        self.proc: subprocess.Popen[bytes] | None = None
        self.calls: int | None = None

    def start(self, pid: int) -> None:
        strace = shutil.which("strace")
        if strace:
            self.proc = self.h.spawn([strace, "-f", "-c", "-e", "trace=fsync,fdatasync", "-o", str(self.out),
                                      "-p", str(pid)], "strace")
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(2)  # SIGINT: detach and write the summary
        self.proc.wait(10)
        text = self.out.read_text() if self.out.exists() else ""
        if self.proc.returncode not in (0, None) and "fsync" not in text and "total" not in text:
            return
        self.calls = fsync_calls(text)


def fsync_calls(summary: str) -> int:
    """fsync + fdatasync calls in `strace -c`'s summary (columns: % time, seconds, usecs/call, calls,
    errors (may be empty), syscall)."""
    row = r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(fsync|fdatasync)$"
    return sum(int(m[1]) for m in re.finditer(row, summary, re.M))


def section_disk(h: Harness, opt: Options) -> list[Figure]:
    site, _ = tcp_workload(h, "disk", 20)
    sim, ports = ten_value_ports(h, "disk-chain-sim", 20)
    chain = Bare(h, site, tcp_endpoints(ports), chain=True)
    trace = Strace(h)

    def start(pid: int) -> None:
        trace.start(pid)
        chain.mark()

    def stop() -> None:
        trace.stop()
        chain.mark()

    run = steady(h, site, "agent-disk", 20, opt.secs(60, 10), hooks=(start, stop))
    for proc in (chain.proc, sim):
        h.stop(proc)
    readings = len(run.window.readings)
    per = run.write_bytes / readings if run.write_bytes is not None and readings else None
    chain_bytes = chain.written_in_window()
    chain_per = chain_bytes / chain.in_window() if chain_bytes is not None and chain.in_window() else None
    fsyncs = None if trace.calls is None else trace.calls / run.seconds
    why = "" if shutil.which("strace") else "strace is not installed"
    if shutil.which("strace") and trace.calls is None:
        why = "strace could not attach (ptrace not allowed?)"
    return [Figure("disk", "bytes written per reading", per, "B", 0, ("<=", 150),
                   note=f"/proc/<pid>/io write_bytes {run.write_bytes or 0:,} B for {readings} readings "
                        f"(20 x 10 values at 1 s)"),
            Figure("disk", "bare chain: bytes written per reading", chain_per, "B", 0,
                   note=f"{chain_bytes or 0:,} B for {chain.in_window()} reads, same window: one SQLite commit "
                        f"a second (WAL, 4 KiB pages), a row per read"),
            Figure("disk", "fsync + fdatasync per second", fsyncs, "/s", 2, note=why or "strace -f -c, same window")]


def fill_buffer(path: Path, target_mb: float, devices: int) -> tuple[int, float]:
    """A buffer file of about target_mb of Huawei-sized readings of the last day, all of them sent
    (a station that has been running: kept for `keep_sent_days`). Returns (readings, seconds)."""
    from agent.store.buffer import Buffer  # only here: the file is written by the same code as the agent's
    from bench.drain import fill

    t0 = time.monotonic()
    logging.getLogger("agent").setLevel(logging.ERROR)  # the new epoch of the file being filled: no news
    buf = Buffer(path, max_mb=max(1024.0, target_mb * 1.2), min_free_mb=16)
    # About 1,000 bytes per Huawei reading in a buffer of 1 KiB pages (1,076 MB for 1,134,200 of
    # them). 900 MB then stays under the agent's max_mb of 1024: nothing is dropped while filling,
    # and the agent does not start over its cap (runs up to 2026-12-04 21:11 did).
    cycles = max(1, int(target_mb * 1024 * 1024 / 1000 / devices))
    fill(buf, devices, cycles)
    last = devices * cycles
    buf.mark_sent(range(1, last + 2))
    buf.close()
    return last, time.monotonic() - t0


def section_startup(h: Harness, opt: Options) -> list[Figure]:
    assert h.sub is not None
    target = opt.buffer_mb if opt.buffer_mb is not None else (20.0 if opt.quick else 900.0)
    port = free_port()
    sim = h.simulator("startup-sim", [(f"tcp://127.0.0.1:{port}", [(u, "huawei-sun2000") for u in range(1, 11)])])
    site = h.site_file("startup", [f"{{id: lan, type: tcp, host: 127.0.0.1, port: {port}}}"],
                       [(f"inv{u:03d}", "lan", u, "huawei-sun2000", 1.0) for u in range(1, 11)], buffer_mb=1024)
    buffer = site.parent / "buffer.sqlite"
    readings, fill_s = fill_buffer(buffer, target, 100)
    size_mb = sum(p.stat().st_size for p in buffer.parent.glob("buffer.sqlite*")) / 1024 / 1024
    h.sub.clear()
    agent = h.agent(site, "agent-startup")
    try:
        first = h.sub.first_after(agent.started, 60.0)
    finally:
        h.stop(agent.proc)
        h.stop(sim)
    ready = None if agent.ready_at is None else agent.ready_at - agent.started
    note = f"buffer {size_mb:,.0f} MB ({readings:,} readings, filled in {fill_s:.0f} s), 10 devices at 1 s"
    return [Figure("startup", "time to READY=1", ready, "s", 2, note=note),
            Figure("startup", "time to the first reading at the subscriber",
                   None if first is None else first.at - agent.started, "s", 2,
                   note="from the agent's start; includes waiting for the first 1 s tick")]
