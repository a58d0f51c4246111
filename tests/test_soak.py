"""Soak: the agent's footprint does not grow through broker outages, device faults, reloads and clock steps.

The short soak runs bench/soak.py's own code (real mosquitto, pvgate-sim, the agent as a process;
clock steps are an injected fault, the PVGATE_TEST_CLOCK_FILE test hook) with 40 devices at 2 s
for four minutes. The hour-long one is `python -m bench.soak --minutes 60` (docs/performance.md).
The judgement is checked on synthetic series first, so it is known that it can fail.
"""

from __future__ import annotations

import asyncio
import csv
import sys
import threading
from dataclasses import asdict
from pathlib import Path

import pytest

from agent.service import process
from support.broker import require_mosquitto

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.soak import CYCLES, Limits, Options, Sample, format_verdict, judge, load_csv, run  # noqa: E402

MB = 1048576


def series(cycles: int = 6, per_cycle: int = 5, rss: float = 40 * MB, rss_step: float = 0.0, fds: int = 20,
           fds_step: float = 0.0, threads: int = 9, tasks: int = 30, tasks_step: float = 0.0) -> list[Sample]:
    """Samples of a run: per cycle a disturbed part and a quiet window; figures grow by *_step a cycle."""
    out: list[Sample] = []
    t = 0.0
    for c in range(1, cycles + 1):
        for k in range(2 * per_cycle):
            quiet = k >= per_cycle
            t += 2.0
            out.append(Sample(t, c, "quiet" if quiet else "faults", quiet, int(rss + rss_step * c),
                              int(fds + fds_step * c) + (0 if quiet else 3), threads, int(tasks + tasks_step * c)))
    return out


def test_a_flat_series_passes() -> None:
    verdict = judge(series())
    assert verdict.ok, format_verdict(verdict)
    assert (verdict.baseline_cycle, verdict.final_cycle) == (2, 6)  # cycle 1 is in the warm-up (25 %)


@pytest.mark.parametrize("grow, figure", [
    ({"rss_step": 0.02 * 40 * MB}, "rss_bytes"),  # 2 % a cycle: 8 % from cycle 2 to cycle 6
    ({"fds_step": 1}, "fds"),  # one descriptor a cycle
    ({"fds_step": 0.2}, "fds"),  # a single descriptor more, over the judged part
    ({"tasks_step": 1}, "tasks"),
])
def test_growth_fails(grow: dict[str, float], figure: str) -> None:
    verdict = judge(series(**grow))
    assert not verdict.ok
    assert [r["figure"] for r in verdict.rows if not r["ok"]] == [figure], format_verdict(verdict)
    assert "FAIL" in format_verdict(verdict)


def test_rss_growth_below_the_limit_passes_and_a_thread_more_fails() -> None:
    assert judge(series(rss_step=0.01 * 40 * MB)).ok  # 4 % over the judged part
    samples = series()
    samples[-1].threads = samples[-2].threads = samples[-3].threads = samples[-4].threads = samples[-5].threads = 10
    assert not judge(samples).ok


def test_a_transient_in_a_quiet_window_is_not_growth() -> None:
    samples = series()
    samples[-1].tasks = 31  # e.g. a reload's task still finishing while sampled
    samples[-1].rss_bytes = 50 * MB
    assert judge(samples).ok


def test_a_run_too_short_to_judge_fails() -> None:
    verdict = judge(series(cycles=1))
    assert not verdict.ok and "too short" in verdict.problem
    assert not judge([]).ok
    assert not judge(series(), limits=Limits(rss_pct=-1)).ok  # the limit is applied


def test_samples_written_as_csv_are_judged_the_same(tmp_path: Path) -> None:
    samples = series(fds_step=1)
    samples[0].tasks = samples[0].mqtt = None
    path = tmp_path / "samples.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(Sample.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(asdict(s) for s in samples)
    assert load_csv(path) == samples
    assert judge(load_csv(path)) == judge(samples)


def test_process_figures_follow_what_the_process_opens() -> None:
    async def inside() -> tuple[dict[str, object], dict[str, object]]:
        before = process.snapshot()
        waiters = [asyncio.create_task(asyncio.sleep(1)) for _ in range(3)]
        after = process.snapshot()
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        return before, after

    before, after = asyncio.run(inside())
    assert after["tasks"] == before["tasks"] + 3  # type: ignore[operator]
    assert process.snapshot()["tasks"] is None  # no loop, no tasks to count
    fds = process.open_fds()
    with open(__file__, encoding="utf-8"):
        assert process.open_fds() == fds + 1  # type: ignore[operator]
    stop = threading.Event()
    threads = process.os_threads()
    helper = threading.Thread(target=stop.wait)
    helper.start()
    try:
        assert process.os_threads() == threads + 1  # type: ignore[operator]
    finally:
        stop.set()
        helper.join()
    rss = process.rss_bytes()
    assert rss is not None and 5 * MB < rss < 4096 * MB
    assert process.rss_bytes(999_999_999) is None  # no such process


@pytest.mark.slow
def test_short_soak_does_not_grow(tmp_path: Path) -> None:
    require_mosquitto()
    # Half the run is warm-up: in its first minutes the agent's RSS rises while the buffer grows from
    # empty (SQLite's page caches, the allocator's pools fill up); the hour-long run is past that
    # within its first quarter.
    opts = Options(minutes=3.6, devices=40, interval=2.0, speed=10.0, cycle=CYCLES["short"], sample_s=2.0,
                   warmup=0.5)
    result = run(opts, tmp_path, progress=False)
    table = format_verdict(result.verdict)
    print(table)
    assert result.counts["cycles"] == 5 and result.counts["outages"] == 5, result.counts
    assert result.counts["reloads"] == 5 and result.counts["clock_steps"] == 5, result.counts
    assert (result.verdict.baseline_cycle, result.verdict.final_cycle) == (3, 5), table
    quiet = [s for s in result.samples if s.quiet]
    assert all(s.tasks and s.mqtt for s in quiet), "every quiet sample came from the agent, connected"
    assert quiet[-1].unsent is not None and quiet[-1].unsent < 2 * opts.devices, "the buffer drained"
    assert result.verdict.ok, table
