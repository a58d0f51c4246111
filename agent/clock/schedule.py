"""A small monotonic poll scheduler (replaces APScheduler's wall-time IntervalTrigger for polls).

Why not APScheduler: its IntervalTrigger computes run times on the wall clock. A gateway that
boots at 1970 and then gets its time from NTP or a 4G modem steps the wall clock by decades:
APScheduler then either pauses polling until the wall clock catches up with the old schedule
(step back) or works through the missed run times and fires a burst (step forward). Here each
job's due time lives on the monotonic clock, which never steps; the wall clock is used only to
*align* ticks to multiples of the interval (10 s -> :00, :10, ...), and only while it is trusted.

Rules:

- A job's next due time is one interval after its last due time, on the monotonic clock. While
  the wall clock is trusted it is moved to the nearest wall-clock multiple of the interval,
  using the current offset (wall - monotonic). So the gap between two ticks is always between
  0.5 and 1.5 intervals, and a wall-clock step of any size, either way, re-aligns at the next
  tick: no pause, no burst.
- If the event loop stalled and a job's next due time is already past, it is moved forward to
  the first future slot by arithmetic (O(1), however long the stall), and the slots jumped over
  are counted as overruns, one number per job.

API:

    first_due(now, interval_s, offset_s) -> float
    next_due(last_due, interval_s, now, offset_s) -> (due, skipped)   # pure, no asyncio

    sched = PollSchedule(wall=time.time, mono=time.monotonic, trusted=lambda: True,
                         on_overrun=None)          # on_overrun(job_id, skipped)
    sched.add(job_id, interval_s, callback, run_now=False)   # callback() is sync and quick
    sched.remove(job_id) -> bool
    sched.start()            # inside a running event loop; one task for all jobs
    sched.realign()          # after a clock step or trust change: recompute every due time now
    await sched.stop()
    sched.job(job_id) -> JobInfo;  sched.jobs() -> list[JobInfo];  sched.overruns -> int

Callbacks must not block: they are expected to queue work (``LinkWorker.request``). A callback
that raises is logged and its job goes on.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Callback = Callable[[], object]
OverrunHook = Callable[[str, int], None]


def _aligned(t: float, interval_s: float, offset_s: float | None) -> float:
    """The monotonic time nearest to t whose wall time is a whole multiple of the interval."""
    if offset_s is None:
        return t
    return round((t + offset_s) / interval_s) * interval_s - offset_s


def first_due(now: float, interval_s: float, offset_s: float | None) -> float:
    """First tick of a new job: the next wall multiple after now when trusted, else now + interval."""
    if interval_s <= 0:
        raise ValueError("interval_s must be > 0")
    if offset_s is None:
        return now + interval_s
    return math.floor((now + offset_s) / interval_s + 1.0) * interval_s - offset_s


def next_due(last_due: float, interval_s: float, now: float, offset_s: float | None) -> tuple[float, int]:
    """The tick after ``last_due`` (monotonic seconds) and how many slots were skipped.

    ``offset_s`` is wall - monotonic while the wall clock is trusted, else None (no alignment).
    The result is always after ``now``; slots that would be at or before ``now`` are skipped in
    one step and counted (the second value), never replayed.
    """
    if interval_s <= 0:
        raise ValueError("interval_s must be > 0")
    due = _aligned(last_due + interval_s, interval_s, offset_s)
    if due > now:
        return due, 0
    # The loop stalled for longer than the gap: jump to the first slot after now, in O(1).
    skipped = math.floor((now - due) / interval_s) + 1
    due += skipped * interval_s
    if due <= now:  # float rounding at a slot boundary: one more slot, never a past due time
        due += interval_s
        skipped += 1
    return due, skipped


@dataclass
class JobInfo:
    """One job's public state (a copy: changing it changes nothing)."""

    id: str
    interval_s: float
    next_due: float  # monotonic seconds
    ticks: int
    overruns: int


@dataclass
class _Job:
    id: str
    interval_s: float
    callback: Callback
    due: float
    generation: int
    ticks: int = 0
    overruns: int = 0


class PollSchedule:
    """Runs callbacks at their interval, timed on the monotonic clock (see the module docstring)."""

    def __init__(self, *, wall: Clock = time.time, mono: Clock = time.monotonic,
                 trusted: Callable[[], bool] = lambda: True, on_overrun: OverrunHook | None = None) -> None:
        self._wall = wall
        self._mono = mono
        self._trusted = trusted
        self._on_overrun = on_overrun
        self._jobs: dict[str, _Job] = {}
        self._heap: list[tuple[float, int, str]] = []  # (due, generation, job id); stale entries skipped
        self._generation = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.overruns = 0

    # -- jobs --------------------------------------------------------------------------------

    def offset(self) -> float | None:
        """wall - monotonic now, or None while the wall clock is not trusted."""
        if not self._trusted():
            return None
        return self._wall() - self._mono()

    def add(self, job_id: str, interval_s: float, callback: Callback, run_now: bool = False) -> None:
        """Add (or replace) a job. ``run_now``: the first tick is right away, then aligned."""
        if interval_s <= 0:
            raise ValueError(f"job {job_id}: interval must be > 0")
        now = self._mono()
        due = now if run_now else first_due(now, interval_s, self.offset())
        self._generation += 1
        self._jobs[job_id] = _Job(job_id, float(interval_s), callback, due, self._generation)
        heapq.heappush(self._heap, (due, self._generation, job_id))
        self._poke()

    def remove(self, job_id: str) -> bool:
        """Forget a job; False when there was none. Its heap entry is dropped lazily."""
        found = self._jobs.pop(job_id, None) is not None
        self._poke()
        return found

    def job(self, job_id: str) -> JobInfo:
        j = self._jobs[job_id]
        return JobInfo(j.id, j.interval_s, j.due, j.ticks, j.overruns)

    def jobs(self) -> list[JobInfo]:
        return [self.job(i) for i in sorted(self._jobs)]

    def realign(self) -> None:
        """Recompute every job's next due time from now (after a clock step or a trust change).

        Not needed for correctness (each tick re-aligns by itself) but it moves the *pending*
        tick too, so the first tick after a step is already on a wall multiple.
        """
        now = self._mono()
        offset = self.offset()
        for job in self._jobs.values():
            due = _aligned(job.due, job.interval_s, offset)
            if due <= now:
                due = first_due(now, job.interval_s, offset) if offset is not None else now
            job.due = due
            self._generation += 1
            job.generation = self._generation
            heapq.heappush(self._heap, (due, job.generation, job.id))
        self._poke()

    # -- running -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the scheduler's single task (needs a running event loop)."""
        if self._task is not None and not self._task.done():
            return
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="poll-schedule")

    async def stop(self) -> None:
        """Cancel the task and wait for it; jobs are kept (start() again resumes them)."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _earliest(self) -> float | None:
        """Due time of the earliest live job, dropping stale heap entries."""
        while self._heap:
            due, gen, job_id = self._heap[0]
            job = self._jobs.get(job_id)
            if job is not None and job.generation == gen:
                return due
            heapq.heappop(self._heap)
        return None

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            self._wake.clear()
            due = self._earliest()
            now = self._mono()
            if due is None or due > now:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that arrives
                # as the event is set (stop() right after remove()), and the task never ends.
                try:
                    async with asyncio.timeout(None if due is None else due - now):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                continue
            _, _, job_id = heapq.heappop(self._heap)
            self._fire(self._jobs[job_id])

    def _fire(self, job: _Job) -> None:
        job.ticks += 1
        try:
            job.callback()
        except Exception:  # one bad callback must not stop every other job's polls
            log.exception("scheduled job %s failed", job.id)
        if self._jobs.get(job.id) is not job:
            return  # removed or replaced by its own callback
        due, skipped = next_due(job.due, job.interval_s, self._mono(), self.offset())
        if skipped:
            job.overruns += skipped
            self.overruns += skipped
            if self._on_overrun is not None:
                self._on_overrun(job.id, skipped)
        job.due = due
        self._generation += 1
        job.generation = self._generation
        heapq.heappush(self._heap, (due, job.generation, job.id))


__all__ = ["JobInfo", "PollSchedule", "first_due", "next_due"]
