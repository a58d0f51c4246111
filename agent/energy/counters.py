"""A device's energy counter series, turned into energy per interval and per local day (pure).

Input: the samples of one counter in poll order (the order the readings entered the buffer, i.e.
seq order: the true order even when the wall clock stepped back), each ``(ts_ms, value, flags)``.
Every step between two consecutive samples is one interval; its energy is the counter's
difference, attributed to the local day of the step's *end*. So the days' yields telescope: the
sum over days is the counter difference over the whole series, nothing counted twice, nothing
lost across a midnight that passed while the station was offline (the next day gets it, flagged).

What a step can be, and what is counted (energy is never invented):

- ``d >= 0`` and plausible: counted. Longer than ``gap_s``: counted and flagged ``gap``
  (``gap_midnight`` when it spans the day's start).
- ``d < 0`` with the old value in the top half of the counter's range and the new one in the
  bottom half: a rollover; ``d + wrap`` counted, flagged ``rollover``.
- ``d < 0`` otherwise, and the new value no more than the device could have made since the
  last poll (``max_kw`` × elapsed time): the counter was cleared and counted up from zero
  again; the new value counted, flagged ``reset``.
- anything else (a drop to a value too high to be a fresh count, a jump up faster than the
  device can produce): another counter is being read, e.g. a replaced inverter; nothing counted
  for that step, flagged ``replaced``. Energy continues from the new counter.
- a sample flagged ``clock:unsynced`` / ``clock:corrected``: its step is counted and flagged
  ``clock_untrusted`` / ``clock_corrected``; a timestamp going backwards: ``clock_backward``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

GAP_MIN_S = 900.0  # a step this long (or 3 intervals) is a gap: counted, flagged
MAX_KW_SLACK = 1.25  # a device may run a little above its rating
UNSYNCED, CORRECTED = "clock:unsynced", "clock:corrected"


class Sample(NamedTuple):
    ts_ms: int
    value: float
    flags: tuple[str, ...] = ()
    seq: int = 0


@dataclass(frozen=True)
class CounterSpec:
    """What the accounting needs to know of a counter."""

    resolution: float = 0.01  # kWh: the smallest step the counter shows
    wrap: float | None = None  # kWh: where an integer register rolls over (None: never)
    max_kw: float | None = None  # the most the device can produce; None: no jump is implausible
    gap_s: float = GAP_MIN_S


@dataclass
class DayEnergy:
    """One local day's share of a counter series."""

    energy_kwh: float = 0.0
    counter_start: float | None = None  # the last value before the day's first step
    counter_end: float | None = None
    first_ts_ms: int | None = None
    last_ts_ms: int | None = None
    first_seq: int | None = None
    last_seq: int | None = None
    samples: int = 0
    flags: list[str] = field(default_factory=list)
    gap_s: float = 0.0  # time spent in steps flagged gap

    def flag(self, name: str) -> None:
        if name not in self.flags:
            self.flags.append(name)


class Step(NamedTuple):
    energy_kwh: float
    flags: tuple[str, ...]


def step_energy(a: Sample, b: Sample, spec: CounterSpec) -> Step:
    """The energy of one step a -> b and what happened in it."""
    flags: list[str] = []
    dt_s = (b.ts_ms - a.ts_ms) / 1000.0
    if dt_s < 0:
        flags.append("clock_backward")
    if UNSYNCED in b.flags or UNSYNCED in a.flags:
        flags.append("clock_untrusted")
    if CORRECTED in b.flags:
        flags.append("clock_corrected")
    if dt_s > spec.gap_s:
        flags.append("gap")
    # a backward or untrusted clock says nothing about the time that passed: no rate is judged
    limit = _limit(spec, dt_s) if dt_s > 0 and "clock_untrusted" not in flags else None
    d = b.value - a.value
    if d >= -spec.resolution / 2:
        if limit is not None and d > limit:
            return Step(0.0, (*flags, "replaced"))
        return Step(max(d, 0.0), tuple(flags))
    if spec.wrap is not None and a.value > spec.wrap / 2 > b.value:
        wrapped = d + spec.wrap
        if limit is None or wrapped <= limit:
            return Step(wrapped, (*flags, "rollover"))
    if limit is not None and b.value <= limit:
        return Step(b.value, (*flags, "reset"))
    return Step(0.0, (*flags, "replaced"))


def _limit(spec: CounterSpec, dt_s: float) -> float | None:
    if spec.max_kw is None:
        return None
    return spec.max_kw * MAX_KW_SLACK * dt_s / 3600.0 + 2 * spec.resolution


def daily(samples: Iterable[Sample], spec: CounterSpec, day_of: Callable[[int], str],
          day_start_ms: Callable[[str], int] | None = None) -> dict[str, DayEnergy]:
    """Energy per local day (``day_of(ts_ms)`` names it, e.g. '2026-12-03') from samples in
    poll order. ``day_start_ms(day)``, when given, marks gaps that span a day's start."""
    days: dict[str, DayEnergy] = {}
    prev: Sample | None = None
    for s in samples:
        day = days.setdefault(day_of(s.ts_ms), DayEnergy())
        day.samples += 1
        day.last_ts_ms, day.last_seq, day.counter_end = s.ts_ms, s.seq, s.value
        if day.first_ts_ms is None:
            day.first_ts_ms, day.first_seq = s.ts_ms, s.seq
        if prev is None:
            day.counter_start = s.value
        else:
            if day.counter_start is None:
                day.counter_start = prev.value  # the day begins where the last one left off
            step = step_energy(prev, s, spec)
            day.energy_kwh += step.energy_kwh
            for name in step.flags:
                day.flag(name)
            if "gap" in step.flags:
                day.gap_s += (s.ts_ms - prev.ts_ms) / 1000.0
                start = day_start_ms(day_of(s.ts_ms)) if day_start_ms is not None else None
                if start is not None and prev.ts_ms < start <= s.ts_ms:
                    day.flag("gap_midnight")
        prev = s
    for day in days.values():
        day.energy_kwh = round(day.energy_kwh, 6)
    return days


def intervals(samples: Sequence[Sample], spec: CounterSpec) -> list[tuple[Sample, Sample, Step]]:
    """Energy per interval: every step of the series with its energy and flags."""
    return [(a, b, step_energy(a, b, spec)) for a, b in zip(samples, samples[1:])]


def total(samples: Sequence[Sample], spec: CounterSpec) -> float:
    """Energy over the whole series (the sum of its days)."""
    return sum(step_energy(a, b, spec).energy_kwh for a, b in zip(samples, samples[1:]))
