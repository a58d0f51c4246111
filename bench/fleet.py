"""Sections fanout and gateway: many Huawei inverters over many Modbus TCP links.

fanout: 200 devices over 20 links (10 per link), once at 10 s and once at 1 s.
gateway: 100 devices over 10 links at 10 s with the agent limited to 20 % of one core
(bench/throttle.py), a stand-in for an ARM gateway.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from bench.figures import Figure
from bench.harness import Harness, free_port, percentile
from bench.sections import Options, Steady, steady
from bench.throttle import limit

PROFILE = "huawei-sun2000"


def fleet(h: Harness, name: str, links: int, per_link: int,
          interval: float) -> tuple[Path, list[str], subprocess.Popen[bytes]]:
    """The simulator and the site file for links x per_link inverters; (site path, device ids, sim)."""
    ports = [free_port() for _ in range(links)]
    sim = h.simulator(f"{name}-sim", [(f"tcp://127.0.0.1:{p}", [(u, PROFILE) for u in range(1, per_link + 1)])
                                      for p in ports])
    link_lines = [f"{{id: lan{i:02d}, type: tcp, host: 127.0.0.1, port: {p}}}" for i, p in enumerate(ports, 1)]
    devices = [(f"l{i:02d}u{u:02d}", f"lan{i:02d}", u, PROFILE, interval)
               for i in range(1, links + 1) for u in range(1, per_link + 1)]
    site = h.site_file(name, link_lines, devices)
    return site, [d[0] for d in devices], sim


def figures_of(section: str, label: str, run: Steady, ids: list[str], interval: float,
               cpu_target: float | None, latency_target: bool) -> list[Figure]:
    win = run.window
    on_time = win.devices_on_time(ids, interval)
    share = 100.0 * run.cpu_s / run.seconds
    lat, jit = win.latencies(), win.jitters(interval)
    n = len(ids)
    return [
        Figure(section, f"{label}: devices meeting their interval", on_time, f"of {n}", 0, (">=", n),
               note=f"{len(win.readings)} readings in {run.seconds:.0f} s"),
        Figure(section, f"{label}: CPU, share of one core", share, "%", 2,
               None if cpu_target is None else ("<", cpu_target),
               note=f"{1e6 * run.cpu_s / max(1, len(win.readings)):.0f} µs per reading, "
                    f"RSS {run.rss_kb / 1024:.0f} MB, {run.threads} threads"),
        Figure(section, f"{label}: poll-start jitter p50", percentile(jit, 50), "s", 3,
               note="a poll's start after its aligned tick"),
        Figure(section, f"{label}: poll-start jitter p99", percentile(jit, 99), "s", 3),
        Figure(section, f"{label}: latency poll -> subscriber p50", percentile(lat, 50), "s", 3,
               ("<=", 0.3) if latency_target else None),
        Figure(section, f"{label}: latency poll -> subscriber p99", percentile(lat, 99), "s", 3),
    ]


def section_fanout(h: Harness, opt: Options) -> list[Figure]:
    out = []
    for interval, window in ((10.0, opt.secs(60, 20)), (1.0, opt.secs(30, 10))):
        site, ids, sim = fleet(h, f"fanout-{interval:g}s", 20, 10, interval)
        run = steady(h, site, f"agent-fanout-{interval:g}s", len(ids), max(window, 2 * interval),
                     warm=interval if interval > 1 else 2.0)
        h.stop(sim)
        out += figures_of("fanout", f"200 devices / 20 links at {interval:g} s", run, ids, interval,
                          3.0 if interval == 10.0 else None, True)
    return out


def section_gateway(h: Harness, opt: Options) -> list[Figure]:
    share = opt.cpu_share
    lim = limit(share)
    label = f"100 devices / 10 links at 10 s, {share:.0%} of one core"
    if not lim.applied:
        return [Figure("gateway", f"{label}: devices meeting their interval", None, "of 100", 0, (">=", 100),
                       note=f"no CPU limit could be applied here: {lim.reason}")]
    try:
        site, ids, sim = fleet(h, "gateway", 10, 10, 10.0)
        run = steady(h, site, "agent-gateway", len(ids), opt.secs(60, 20), prefix=lim.prefix, warm=10.0)
        h.stop(sim)
    finally:
        throttled = lim.throttled()
        lim.close()
    figs = figures_of("gateway", label, run, ids, 10.0, None, False)
    figs[1].note += f"; limit: {lim.how}" + (f", {throttled}" if throttled else "")
    return figs
