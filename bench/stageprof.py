"""The agent under cProfile, every thread, timed in CPU time; and its profile grouped by stage.

    python bench/stageprof.py OUT.pstats run -c site.yaml     # what the suite runs (cwd = repo root)

cProfile only sees the thread that enabled it, and the agent has several (event loop, buffer
writer, publisher, paho's callbacks run in the publisher's): here every thread started gets its
own profiler (threading.Thread.run is wrapped before the agent is imported), and they are merged
at exit. The timer is the thread's CPU clock (time.thread_time), so time spent blocked in select,
epoll or a lock wait counts as nothing: a stage's share is a share of CPU. The agent's heavy
imports happen before profiling starts. Deterministic profiling inflates call-heavy Python code
(each call costs the profiler's hook): read the shares, not absolute times.

Stages (breakdown()): by the module of each function's own code; C functions (sqlite3, the json
encoder, socket calls) go to their callers' stage; two call contexts are followed through the
call graph: PUBACK bookkeeping (paho's PUBACK handling, on_publish, and what settles acks: marking
rows sent) and the publisher's reads of the buffer.
"""

from __future__ import annotations

import cProfile
import pstats
import re
import sys
import threading
import time
from typing import Any

STAGES = ("poll", "decode", "buffer insert", "JSON", "publish", "PUBACK bookkeeping",
          "buffer read (publisher)", "event loop", "other")
STARTUP = "start-up"  # reading the site file and device maps: once, not per reading
PUBACK = re.compile(r"(?i)puback|on_publish|acked|settle|mark_sent")
Key = tuple[str, int, str]


GENERIC = ("~", "<string>", "/enum.py", "/functools.py", "/queue.py", "/threading.py", "/typing.py", "/abc.py",
           "/copy.py", "/dataclasses.py", "/contextlib.py", "/weakref.py", "/_weakrefset.py", "/collections/",
           "/re/", "/struct.py", "/socket.py")


def base_stage(key: Key) -> str | None:
    """The stage of a function's own code, or None for C and generic library code (its callers say)."""
    path = key[0].replace("\\", "/")
    if path == "~" or any(g in path for g in GENERIC):
        return None
    rules = (("/yaml/", STARTUP), ("/agent/config/", STARTUP), ("/drivers/yamlsrc", STARTUP),
             ("/drivers/devicemap", STARTUP), ("/argparse.py", STARTUP), ("/gettext.py", STARTUP),
             ("/json/", "JSON"), ("/pymodbus/", "poll"), ("/drivers/link", "poll"), ("/drivers/plan", "poll"),
             ("/agent/poller/", "poll"), ("/agent/clock/", "poll"), ("/serial/", "poll"),
             ("/drivers/", "decode"), ("/agent/store/", "buffer"), ("/sqlite3/", "buffer"),
             ("/paho/", "publish"), ("/agent/uplink/", "publish"), ("/ssl.py", "publish"),
             ("/asyncio/", "event loop"), ("/selectors.py", "event loop"))
    for part, stage in rules:
        if part in path:
            return stage
    return "other"


def _by_callers(stats: dict[Key, Any], key: Key, memo: dict[Key, list[tuple[str, float]]],
                visiting: frozenset[Key] = frozenset()) -> list[tuple[str, float]]:
    """(stage, share) for a function without a stage of its own: its callers' stages, weighted by the
    time each caller spent in it; callers already on the path (recursion, hash <-> __hash__) are left out."""
    stage = base_stage(key)
    if stage is not None:
        return [(stage, 1.0)]
    if key in memo:
        return memo[key]
    callers = {c: e for c, e in (stats[key][4] if key in stats else {}).items() if c not in visiting and c != key}
    total = sum(e[2] + e[3] for e in callers.values())
    if not total:
        return [("other", 1.0)]
    mix: dict[str, float] = {}
    for c, e in callers.items():
        for s, share in _by_callers(stats, c, memo, visiting | {key}):
            mix[s] = mix.get(s, 0.0) + (e[2] + e[3]) / total * share
    if not visiting:  # a result found on a path that skipped callers is that path's only
        memo[key] = list(mix.items())
    return list(mix.items())


def _context(stats: dict[Key, Any], root: Any) -> dict[Key, float]:
    """Share of each function's time spent under a root (root(key) -> bool), through its callers."""
    share = {k: 1.0 if root(k) else 0.0 for k in stats}
    for _ in range(30):  # call graphs have cycles: iterate to a fixed point
        changed = False
        for k, (_cc, _nc, _tt, _ct, callers) in stats.items():
            if root(k) or not callers:
                continue
            total = sum(edge[3] for edge in callers.values()) or sum(edge[1] for edge in callers.values())
            if not total:
                continue
            weight = 3 if any(edge[3] for edge in callers.values()) else 1
            new = sum(edge[weight] * share.get(c, 0.0) for c, edge in callers.items()) / total
            if abs(new - share[k]) > 1e-6:
                share[k], changed = new, True
        if not changed:
            break
    return share


def breakdown(path: str) -> dict[str, float]:
    """CPU seconds per stage in the profile at `path`."""
    stats: dict[Key, Any] = pstats.Stats(path).stats  # type: ignore[attr-defined]
    puback = _context(stats, lambda k: bool(PUBACK.search(k[2])) and base_stage(k) in ("publish", "buffer"))
    uplink = _context(stats, lambda k: base_stage(k) == "publish")
    out = dict.fromkeys((*STAGES, STARTUP), 0.0)
    memo: dict[Key, list[tuple[str, float]]] = {}
    for k, (_cc, _nc, tt, _ct, callers) in stats.items():
        if tt <= 0:
            continue
        parts = [(stage, tt * share) for stage, share in _by_callers(stats, k, memo)]
        p = puback.get(k, 0.0)
        for stage, t in parts:
            out["PUBACK bookkeeping"] += t * p
            rest = t * (1.0 - p)
            if stage == "buffer":
                q = min(1.0, max(0.0, (uplink.get(k, 0.0) - p) / (1.0 - p))) if p < 1.0 else 0.0
                out["buffer read (publisher)"] += rest * q
                out["buffer insert"] += rest * (1.0 - q)
            else:
                out[stage] += rest
    return out


def run(out: str, argv: list[str]) -> int:
    import agent.cli  # noqa: F401 - imported before profiling: start-up imports are not the steady state
    import agent.service.runtime  # noqa: F401
    import paho.mqtt.client  # noqa: F401
    import pymodbus.client  # noqa: F401

    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()
    original = threading.Thread.run

    def profiled_run(self: threading.Thread) -> None:
        prof = cProfile.Profile(time.thread_time)
        try:
            prof.enable()
        except ValueError:  # Python 3.12+: one profiler sees every thread already
            original(self)
            return
        with lock:
            profiles.append(prof)
        try:
            original(self)
        finally:
            prof.disable()

    threading.Thread.run = profiled_run  # type: ignore[method-assign]
    main = cProfile.Profile(time.thread_time)
    profiles.append(main)
    main.enable()
    code = 1
    try:
        code = agent.cli.main(argv)
    finally:
        main.disable()
        merged: pstats.Stats | None = None
        with lock:
            for prof in profiles:
                prof.create_stats()
                if merged is None:
                    merged = pstats.Stats(prof)
                else:
                    merged.add(prof)
        if merged is not None:
            merged.dump_stats(out)
    return code


if __name__ == "__main__":
    sys.exit(run(sys.argv[1], sys.argv[2:]))
