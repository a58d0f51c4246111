"""What a simulated PV device measures at a given instant: a pure function of time.

Being pure (no state, no random numbers) is what lets a test compute exactly what the simulator
served at the moment of a poll. Power follows a clear-sky sun curve in the site's local time
(zero at night), the energy counters are the closed-form integral of that curve (so they never go
backwards), and voltages, frequency and temperature wander plausibly and deterministically.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

SUNRISE_H = 6.0
DAYLIGHT_H = 12.0
INVERTER_EFFICIENCY = 0.975
# Integral of sin over one daylight arc, in hours: kWh per kW of peak power per day.
DAILY_PEAK_HOURS = 2.0 * DAYLIGHT_H / math.pi


@dataclass(frozen=True)
class SimClock:
    """Maps real time to simulated time: sim = sim0 + (real - real0) * speed."""

    real0: float
    sim0: float
    speed: float = 1.0

    @classmethod
    def starting_now(cls, speed: float = 1.0, sim_start: float | None = None) -> SimClock:
        now = time.time()
        return cls(now, sim_start if sim_start is not None else now, speed)

    def sim(self, real: float | None = None) -> float:
        real = time.time() if real is None else real
        return self.sim0 + (real - self.real0) * self.speed


def _day_fraction(hours: float) -> float:
    """Sun curve for local clock hours: 0 at night, 1 at solar noon."""
    x = (hours - SUNRISE_H) / DAYLIGHT_H
    return math.sin(math.pi * x) if 0.0 < x < 1.0 else 0.0


def _arc_energy_h(hours: float) -> float:
    """Integral of the sun curve from local midnight to `hours`, in peak hours."""
    x = min(max((hours - SUNRISE_H) / DAYLIGHT_H, 0.0), 1.0)
    return DAYLIGHT_H / math.pi * (1.0 - math.cos(math.pi * x))


class Sun:
    def __init__(self, timezone: str = "Asia/Shanghai") -> None:
        self.tz = ZoneInfo(timezone)

    def local_hours(self, t: float) -> tuple[float, float]:
        """(hours since local midnight, epoch seconds of that midnight)."""
        dt = datetime.fromtimestamp(t, self.tz)
        midnight = dt.replace(hour=0, minute=0, second=0, microsecond=0)
        return (t - midnight.timestamp()) / 3600.0, midnight.timestamp()

    def fraction(self, t: float) -> float:
        return _day_fraction(self.local_hours(t)[0])

    def peak_hours_today(self, t: float) -> float:
        return _arc_energy_h(self.local_hours(t)[0])

    def peak_hours_total(self, t: float, since: float) -> float:
        """Peak hours from `since` to `t` (whole days counted in closed form)."""
        hours_t, midnight_t = self.local_hours(t)
        hours_s, midnight_s = self.local_hours(since)
        days = round((midnight_t - midnight_s) / 86400.0)
        return days * DAILY_PEAK_HOURS + _arc_energy_h(hours_t) - _arc_energy_h(hours_s)


def _wander(t: float, period_s: float, phase: float) -> float:
    return math.sin(2.0 * math.pi * t / period_s + phase)


COUNTER_EPOCH = 1_700_000_000.0  # 2023-11-14: the simulated plants were commissioned then


@dataclass(frozen=True)
class PvPlant:
    """One simulated inverter (or the meter of a plant) with its own size and history."""

    rated_kw: float = 50.0
    seed: int = 1
    strings: int = 4
    meter: bool = False
    base_load_kw: float = 0.8  # station's own consumption, seen by a meter at night
    sun: Sun = Sun()

    def state(self, t: float) -> dict[str, float | int]:
        """Canonical point values at simulated epoch second t."""
        f = self.sun.fraction(t)
        ph = self.seed * 0.7
        v = 230.0 + 2.5 * _wander(t, 900.0, ph) + 0.8 * _wander(t, 61.0, 2 * ph)
        dc_kw = self.rated_kw * f
        ac_kw = dc_kw * INVERTER_EFFICIENCY
        peak_total = self.sun.peak_hours_total(t, COUNTER_EPOCH)
        out: dict[str, float | int] = {
            "phase_a_voltage": v, "phase_b_voltage": v + 0.6, "phase_c_voltage": v - 0.4,
            "line_ab_voltage": v * math.sqrt(3), "line_bc_voltage": (v + 0.6) * math.sqrt(3),
            "line_ca_voltage": (v - 0.4) * math.sqrt(3),
            "grid_frequency": 50.0 + 0.03 * _wander(t, 127.0, ph),
            "power_factor": 0.99 if ac_kw > 0 else 1.0,
        }
        if self.meter:
            export_kw = max(ac_kw - self.base_load_kw, 0.0)
            import_kw = max(self.base_load_kw - ac_kw, 0.0)
            net = export_kw - import_kw
            out.update({
                "ac_power": net, "reactive_power": 0.05 * net,
                "energy_export": 1000.0 + self.rated_kw * INVERTER_EFFICIENCY * peak_total * 0.97,
                "energy_import": 200.0 + self.base_load_kw * (t - COUNTER_EPOCH) / 3600.0 * 0.4,
            })
            for i, p in enumerate(("a", "b", "c")):
                out[f"phase_{p}_power"] = net / 3.0
                out[f"phase_{p}_current"] = abs(net) * 1000.0 / (3.0 * float(out[f"phase_{p}_voltage"]))
            return out
        out.update({
            "ac_power": ac_kw, "dc_power": dc_kw, "reactive_power": 0.0, "apparent_power": ac_kw,
            "energy_total": 5000.0 * self.seed + self.rated_kw * INVERTER_EFFICIENCY * peak_total,
            "energy_today": self.rated_kw * INVERTER_EFFICIENCY * self.sun.peak_hours_today(t),
            "efficiency": 97.5 if ac_kw > 0 else 0.0,
            "internal_temperature": 22.0 + 23.0 * f + 1.5 * _wander(t, 1800.0, ph),
            "insulation_resistance": 3.0,
            "status": 0x0200 if f > 0 else 0xA000,
            "peak_power_today": self.rated_kw * INVERTER_EFFICIENCY * min(1.0, self.sun.peak_hours_today(t)),
            "running_hours": (t - COUNTER_EPOCH) / 3600.0 * 0.5,
        })
        for i, p in enumerate(("a", "b", "c")):
            out[f"phase_{p}_current"] = ac_kw * 1000.0 / (3.0 * float(out[f"phase_{p}_voltage"]))
        string_v = 620.0 + 40.0 * f if f > 0 else 0.0
        for n in range(1, self.strings + 1):
            out[f"pv{n}_voltage"] = string_v
            out[f"pv{n}_current"] = dc_kw * 1000.0 / (self.strings * string_v) if string_v else 0.0
        return out
