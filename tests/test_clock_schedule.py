"""agent.clock.schedule: polls on the monotonic clock, aligned to the wall clock while it is trusted.

The pure functions are driven through wall-clock steps (boot at 1970 then NTP, back 10 minutes,
forward 10 years, +8 h, odd fractions) while the monotonic clock runs on; a few tests run the
real asyncio scheduler with 0.2 s intervals and a fake wall clock that steps."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

import pytest

from agent.clock.schedule import PollSchedule, first_due, next_due

NOW_WALL = 1_796_300_000.0  # 2026-12-03, a trusted wall time
TEN_YEARS = 10 * 365.25 * 86400.0


def _is_multiple(wall: float, interval: float, tol: float = 1e-6) -> bool:
    return abs(wall / interval - round(wall / interval)) * interval <= tol


# --- pure functions ------------------------------------------------------------------------------


def test_first_due_is_the_next_wall_multiple_when_trusted() -> None:
    assert first_due(100.3, 10.0, 1000.0) == pytest.approx(110.0)  # wall 1100.3 -> 1110
    assert first_due(100.0, 10.0, 1000.0) == pytest.approx(110.0)  # exactly on a slot: the next one
    assert first_due(100.3, 10.0, None) == pytest.approx(110.3)  # untrusted: one interval from now


def test_next_due_without_step_is_one_interval_later() -> None:
    assert next_due(110.0, 10.0, 110.01, 1000.0) == (pytest.approx(120.0), 0)
    assert next_due(110.3, 10.0, 110.31, None) == (pytest.approx(120.3), 0)


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_interval_must_be_positive(bad: float) -> None:
    with pytest.raises(ValueError):
        next_due(0.0, bad, 0.0, None)
    with pytest.raises(ValueError):
        first_due(0.0, bad, None)


Offset = Callable[[float], "float | None"]


def _simulate(interval: float, offset_at: Offset, ticks: int, start: float = 50.0) -> list[tuple[float, float | None]]:
    """Fire ticks exactly at their due time; (monotonic time, wall time or None) of each tick."""
    due = first_due(start, interval, offset_at(start))
    out = []
    for _ in range(ticks):
        off = offset_at(due)
        out.append((due, None if off is None else due + off))
        due, skipped = next_due(due, interval, due + 1e-3, offset_at(due + 1e-3))
        assert skipped == 0
    return out


STEPS = {
    "boot-1970-then-ntp": (lambda m: None if m < 200.0 else NOW_WALL),  # untrusted, then trusted "now"
    "back-10-min": (lambda m: NOW_WALL if m < 200.0 else NOW_WALL - 600.0),
    "forward-10-years": (lambda m: NOW_WALL if m < 200.0 else NOW_WALL + TEN_YEARS),
    "plus-8-h": (lambda m: NOW_WALL if m < 200.0 else NOW_WALL + 8 * 3600.0),
    "odd-fraction": (lambda m: NOW_WALL + 0.37 if m < 200.0 else NOW_WALL + 3.3),
    "back-3.3-s": (lambda m: NOW_WALL if m < 200.0 else NOW_WALL - 3.3),
}


@pytest.mark.parametrize("interval", [1.0, 10.0, 60.0])
@pytest.mark.parametrize("name", sorted(STEPS))
def test_a_step_re_aligns_at_the_next_tick_without_pause_or_burst(name: str, interval: float) -> None:
    offset_at = STEPS[name]
    ticks = _simulate(interval, offset_at, ticks=int(400 / interval) + 5)
    monos = [m for m, _ in ticks]
    gaps = [b - a for a, b in zip(monos, monos[1:])]
    # Within one interval of the interval, never a duplicate tick, never a pause.
    assert all(0.5 * interval - 1e-6 <= g <= 1.5 * interval + 1e-6 for g in gaps), (name, min(gaps), max(gaps))
    after = [(m, w) for m, w in ticks if m > 200.0 + interval]  # from the first tick computed after the step
    assert after and all(w is not None and _is_multiple(w, interval, 1e-3) for _, w in after), name
    before = [(m, w) for m, w in ticks if m < 200.0]
    if offset_at(0.0) is not None:
        assert all(w is not None and _is_multiple(w, interval, 1e-3) for _, w in before)


def test_untrusted_clock_keeps_the_monotonic_rhythm() -> None:
    ticks = _simulate(10.0, lambda m: None, ticks=20, start=3.7)
    assert [round(m, 6) for m, _ in ticks] == [round(13.7 + 10.0 * i, 6) for i in range(20)]


def test_a_stall_skips_forward_and_counts_in_constant_time() -> None:
    # The loop was blocked for 35 s on a 10 s job due at 10: ticks 20 and 30 are lost, 40 is next.
    assert next_due(10.0, 10.0, 35.0, None) == (pytest.approx(40.0), 2)
    assert next_due(10.0, 10.0, 35.0, 0.0) == (pytest.approx(40.0), 2)
    # Ten years of monotonic stall on a 0.2 s job: 1.6e9 slots, computed, not iterated.
    t0 = time.perf_counter()
    due, skipped = next_due(0.0, 0.2, TEN_YEARS, None)
    assert time.perf_counter() - t0 < 0.01
    assert TEN_YEARS < due <= TEN_YEARS + 0.2
    assert skipped == math.floor((TEN_YEARS - 0.2) / 0.2) + 1


def test_a_ten_year_wall_step_costs_constant_work_and_no_overrun() -> None:
    t0 = time.perf_counter()
    due, skipped = next_due(100.0, 0.2, 100.001, NOW_WALL + TEN_YEARS)
    assert time.perf_counter() - t0 < 0.01
    assert skipped == 0 and 100.1 <= due <= 100.3
    assert _is_multiple(due + NOW_WALL + TEN_YEARS, 0.2, 1e-3)


# --- the asyncio scheduler -----------------------------------------------------------------------


class FakeWall:
    """A wall clock that follows the real monotonic clock plus an offset the test can step."""

    def __init__(self, offset: float, trusted: bool = True) -> None:
        self.offset = offset
        self.trusted = trusted

    def __call__(self) -> float:
        return time.monotonic() + self.offset


def _gaps(ts: list[float]) -> list[float]:
    return [b - a for a, b in zip(ts, ts[1:])]


def test_scheduler_keeps_its_interval_through_wall_steps() -> None:
    interval = 0.2
    wall = FakeWall(NOW_WALL - time.monotonic())
    ticks: dict[str, list[tuple[float, float]]] = {"a": [], "b": []}

    async def body() -> PollSchedule:
        sched = PollSchedule(wall=wall, mono=time.monotonic, trusted=lambda: wall.trusted)
        for name in ticks:
            sched.add(name, interval, lambda n=name: ticks[n].append((time.monotonic(), wall())))
        sched.start()
        for step in (-600.0, TEN_YEARS, 8 * 3600.0, 0.07):
            await asyncio.sleep(0.5)
            wall.offset += step
        await asyncio.sleep(0.5)
        await sched.stop()
        return sched

    sched = asyncio.run(body())
    for name, got in ticks.items():
        monos = [m for m, _ in got]
        assert 10 <= len(monos) <= 15, (name, len(monos))  # 2.5 s at 0.2 s: no pause, no burst
        assert all(0.08 <= g <= 0.4 for g in _gaps(monos)), (name, _gaps(monos))
        # The tick pending at a step fires at its old time; the one after is on a wall multiple again.
        last_wall = got[-1][1]
        assert abs(last_wall / interval - round(last_wall / interval)) * interval < 0.05, last_wall
    assert sched.overruns == 0
    assert not sched.running


def test_scheduler_counts_a_stalled_loop_as_overruns_without_a_burst() -> None:
    interval = 0.2
    ticks: list[float] = []
    overruns: list[tuple[str, int]] = []

    def slow() -> None:
        ticks.append(time.monotonic())
        if len(ticks) == 2:
            time.sleep(0.7)  # blocks the event loop: about three slots are lost

    async def body() -> PollSchedule:
        sched = PollSchedule(wall=FakeWall(0.0, trusted=False), on_overrun=lambda j, n: overruns.append((j, n)))
        sched.add("slow", interval, slow)
        sched.start()
        await asyncio.sleep(1.6)
        await sched.stop()
        return sched

    sched = asyncio.run(body())
    assert sched.overruns >= 2 and sched.job("slow").overruns == sched.overruns
    assert overruns and overruns[0][0] == "slow" and sum(n for _, n in overruns) == sched.overruns
    assert all(g >= 0.08 for g in _gaps(ticks)), _gaps(ticks)  # no catch-up burst after the stall


def test_add_remove_run_now_and_a_failing_callback() -> None:
    calls: list[str] = []

    def boom() -> None:
        calls.append("boom")
        raise RuntimeError("a bug in one job")

    async def body() -> PollSchedule:
        # An untrusted wall clock: ticks are not aligned to :00/:30, so "slow" is 30 s away from
        # the start whatever the time of day (aligned, a run across :30 saw it fire)
        sched = PollSchedule(wall=FakeWall(0.0, trusted=False))
        sched.add("slow", 30.0, lambda: calls.append("slow"))  # the task sleeps up to 30 s for it
        sched.start()
        await asyncio.sleep(0.05)
        sched.add("now", 0.2, lambda: calls.append("now"), run_now=True)  # wakes the sleeping task
        sched.add("boom", 0.2, boom, run_now=True)
        await asyncio.sleep(0.05)
        assert calls.count("now") == 1 and calls.count("boom") == 1
        await asyncio.sleep(0.3)
        assert sched.remove("now") and not sched.remove("never-added")
        n = calls.count("now")
        await asyncio.sleep(0.45)
        assert calls.count("now") == n  # removed: no more ticks
        assert calls.count("boom") >= 3  # its exceptions did not stop it
        await sched.stop()
        await sched.stop()  # idempotent
        return sched

    sched = asyncio.run(body())
    assert "slow" not in calls
    assert [j.id for j in sched.jobs()] == ["boom", "slow"]
    with pytest.raises(ValueError):
        sched.add("x", 0.0, lambda: None)


def test_realign_moves_pending_ticks_onto_wall_multiples() -> None:
    mono = [100.0]
    wall = FakeWall(0.0)
    sched = PollSchedule(wall=lambda: mono[0] + wall.offset, mono=lambda: mono[0], trusted=lambda: wall.trusted)
    wall.offset = 1000.0
    sched.add("a", 10.0, lambda: None)
    assert sched.job("a").next_due == pytest.approx(110.0)
    wall.offset += 3.3  # a step: wall 1103.3 at mono 100
    sched.realign()
    assert _is_multiple(sched.job("a").next_due + wall.offset, 10.0)
    assert 100.0 < sched.job("a").next_due <= 115.0
    wall.trusted = False
    before = sched.job("a").next_due
    sched.realign()
    assert sched.job("a").next_due == before  # untrusted: nothing to align to


def test_stop_right_after_removing_every_job_ends_the_task() -> None:
    """remove() sets the wake event and stop() cancels in the same turn: on Python 3.11 a
    wait_for-based loop swallowed that cancel and never ended (the agent hung on SIGTERM)."""

    async def main() -> None:
        for _ in range(100):
            sched = PollSchedule()
            sched.add("a", 1.0, lambda: None)
            sched.start()
            await asyncio.sleep(0.001)
            for job in sched.jobs():
                sched.remove(job.id)
            await asyncio.wait_for(sched.stop(), 2.0)
            assert not sched.running

    asyncio.run(main())
