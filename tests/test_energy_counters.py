"""Counter series to daily yields (agent/energy/counters.py): each case keeps the day's yield
equal to the counter's difference within its resolution, and the flags say what happened."""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from agent.energy.counters import CounterSpec, Sample, daily, step_energy

TZ = ZoneInfo("Asia/Shanghai")
RES = 0.1
SPEC = CounterSpec(resolution=RES, wrap=2**32 * RES, max_kw=60.0)


def ms(day: int, hour: float) -> int:
    return int((datetime(2026, 12, day, tzinfo=TZ) + timedelta(hours=hour)).timestamp() * 1000)


def day_of(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, TZ).date().isoformat()


def day_start(day: str) -> int:
    return int(datetime.fromisoformat(day).replace(tzinfo=TZ).timestamp() * 1000)


def ramp(day: int, start_h: float, end_h: float, counter0: float, kw: float, step_h: float = 0.25) -> list[Sample]:
    out, h, c = [], start_h, counter0
    while h <= end_h + 1e-9:
        out.append(Sample(ms(day, h), round(c, 1)))
        h += step_h
        c += kw * step_h
    return out


def test_a_plain_day_is_the_counter_difference() -> None:
    s = ramp(3, 6, 18, 1000.0, 40.0)
    d = daily(s, SPEC, day_of, day_start)["2026-12-03"]
    assert d.energy_kwh == pytest.approx(s[-1].value - s[0].value, abs=RES)
    assert d.flags == [] and d.counter_start == s[0].value and d.counter_end == s[-1].value


def test_a_counter_cleared_at_noon_counts_from_zero() -> None:
    before = ramp(3, 6, 12, 1000.0, 40.0)
    after = [Sample(ms(3, 12.25), 0.0 + 5.0)] + ramp(3, 12.5, 18, 15.0, 40.0)[:]
    d = daily(before + after, SPEC, day_of, day_start)["2026-12-03"]
    expected = (before[-1].value - before[0].value) + 5.0 + (after[-1].value - after[0].value)
    assert d.energy_kwh == pytest.approx(expected, abs=RES)
    assert d.flags == ["reset"]


def test_a_rollover_of_a_u32_register() -> None:
    top = 2**32 * RES
    s = [Sample(ms(3, 10), round(top - 2.0, 1)), Sample(ms(3, 10.25), round(top - 0.5, 1)),
         Sample(ms(3, 10.5), 3.5), Sample(ms(3, 10.75), 11.0)]
    d = daily(s, SPEC, day_of, day_start)["2026-12-03"]
    assert d.energy_kwh == pytest.approx(2.0 + 11.0, abs=RES)
    assert d.flags == ["rollover"]


def test_a_gap_of_hours_across_midnight_goes_to_the_next_day_flagged() -> None:
    evening = ramp(3, 15, 17, 1000.0, 30.0)  # the gateway goes dark at 17:00 ...
    morning = ramp(4, 9, 12, evening[-1].value + 20.0, 30.0)  # ... and is back at 09:00: 20 kWh made meanwhile
    days = daily(evening + morning, SPEC, day_of, day_start)
    assert days["2026-12-03"].energy_kwh == pytest.approx(evening[-1].value - evening[0].value, abs=RES)
    d4 = days["2026-12-04"]
    assert d4.counter_start == evening[-1].value  # the day starts where the last reading left off
    assert d4.energy_kwh == pytest.approx(morning[-1].value - evening[-1].value, abs=RES)
    assert d4.flags == ["gap", "gap_midnight"] and d4.gap_s == pytest.approx(16 * 3600)
    assert days["2026-12-03"].flags == []


def test_a_replaced_inverter_is_not_counted_for_the_swap_and_counted_after() -> None:
    old = ramp(3, 8, 11, 52000.0, 40.0)
    new = ramp(3, 11.5, 16, 3100.0, 40.0)  # a used spare: its counter starts far below, far above zero
    d = daily(old + new, SPEC, day_of, day_start)["2026-12-03"]
    assert d.energy_kwh == pytest.approx((old[-1].value - old[0].value) + (new[-1].value - new[0].value), abs=RES)
    assert d.flags == ["gap", "replaced"]  # the swap took 30 min: a gap too
    bigger = ramp(3, 11.5, 16, 99000.0, 40.0)  # or far above: a jump no inverter makes in 30 min
    d = daily(old + bigger, SPEC, day_of, day_start)["2026-12-03"]
    assert d.energy_kwh == pytest.approx((old[-1].value - old[0].value) + (bigger[-1].value - bigger[0].value), abs=RES)
    assert d.flags == ["gap", "replaced"]  # the swap took 30 min: a gap too


def test_a_backward_clock_step_keeps_the_counter_difference() -> None:
    s = ramp(3, 10, 12, 1000.0, 40.0)
    # at 12:00 the clock steps back one hour: the next readings carry 11:15, 11:30, ...
    stepped = [Sample(ms(3, 11.0 + 0.25 * i), s[-1].value + 10.0 * i, ("clock:corrected",) if i == 1 else ())
               for i in range(1, 5)]
    d = daily(s + stepped, SPEC, day_of, day_start)["2026-12-03"]
    assert d.energy_kwh == pytest.approx(stepped[-1].value - s[0].value, abs=RES)
    assert "clock_backward" in d.flags and "clock_corrected" in d.flags


def test_untrusted_clock_readings_are_counted_and_flagged() -> None:
    s = ramp(3, 10, 11, 1000.0, 40.0)
    s[2] = s[2]._replace(flags=("clock:unsynced",))
    d = daily(s, SPEC, day_of, day_start)["2026-12-03"]
    assert d.energy_kwh == pytest.approx(s[-1].value - s[0].value, abs=RES)
    assert d.flags == ["clock_untrusted"]


def test_steps_within_the_resolution_never_go_negative() -> None:
    a, b = Sample(ms(3, 10), 100.1), Sample(ms(3, 10.01), 100.06)
    assert step_energy(a, b, SPEC).energy_kwh == 0.0
    assert step_energy(a, b, SPEC).flags == ()


def test_the_days_telescope_to_the_whole_series() -> None:
    s = ramp(3, 6, 18, 10.0, 30.0) + ramp(4, 6, 18, 400.0, 30.0) + ramp(5, 6, 18, 800.0, 30.0)
    days = daily(s, SPEC, day_of, day_start)
    assert sum(d.energy_kwh for d in days.values()) == pytest.approx(s[-1].value - s[0].value, abs=RES)
