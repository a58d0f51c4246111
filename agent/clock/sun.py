"""Sunrise and sunset for a site, computed locally (no network, no extra package).

The formulas are NOAA Global Monitoring Laboratory's "General Solar Position Calculations"
(https://gml.noaa.gov/grad/solcalc/solareqns.PDF): the fractional year gives the equation of
time and the solar declination, and the hour angle of the sun at the official sunrise zenith
(90.833 degrees: refraction and the sun's radius) gives sunrise and sunset. Their error is about
a minute at mid latitudes, far inside the 45-minute margins night mode uses.

Why not a library: ``astral`` (the usual choice) had its last release in 2022, and the twenty
lines below are all night mode needs; a gateway gains nothing from one more dependency.

API:

    sun_times(day, lat, lon, tz="UTC") -> SunTimes(sunrise, sunset)   # aware UTC datetimes
    is_night(ts, lat, lon, margin_s=0.0) -> bool
    next_sunrise(ts, lat, lon) -> float | None                        # epoch seconds

Polar day: ``sunrise``/``sunset`` are the start and end of the local day (the sun is up all day).
Polar night: both are None (it never rises).
Longitude is positive east, latitude positive north, in degrees.
"""

from __future__ import annotations

import math
from datetime import date, datetime, time, timedelta, timezone
from typing import NamedTuple
from zoneinfo import ZoneInfo

ZENITH_DEG = 90.833  # official sunrise/sunset: upper limb on the horizon, with refraction
DAY_S = 86400.0


class SunTimes(NamedTuple):
    sunrise: datetime | None  # UTC; None in polar night
    sunset: datetime | None


def _solar(day_of_year: int, hour_utc: float) -> tuple[float, float]:
    """(equation of time in minutes, declination in radians) per NOAA's fractional-year series."""
    g = 2.0 * math.pi / 365.0 * (day_of_year - 1 + (hour_utc - 12.0) / 24.0)
    eqtime = 229.18 * (0.000075 + 0.001868 * math.cos(g) - 0.032077 * math.sin(g)
                       - 0.014615 * math.cos(2 * g) - 0.040849 * math.sin(2 * g))
    decl = (0.006918 - 0.399912 * math.cos(g) + 0.070257 * math.sin(g) - 0.006758 * math.cos(2 * g)
            + 0.000907 * math.sin(2 * g) - 0.002697 * math.cos(3 * g) + 0.00148 * math.sin(3 * g))
    return eqtime, decl


def _event_minutes(day: date, lat: float, lon: float, rising: bool) -> float | str:
    """Minutes after UTC midnight of ``day`` of sunrise (or sunset), or "day"/"night" at the poles.

    The solar terms are evaluated at the event itself (one refinement from solar noon), which
    keeps the error near a minute even in spring and autumn when the declination moves fastest.
    """
    doy = day.timetuple().tm_yday
    minutes = 720.0 - 4.0 * lon  # first guess: solar noon
    for _ in range(2):
        eqtime, decl = _solar(doy, minutes / 60.0)
        phi = math.radians(lat)
        cos_ha = (math.cos(math.radians(ZENITH_DEG)) / (math.cos(phi) * math.cos(decl))
                  - math.tan(phi) * math.tan(decl))
        if cos_ha < -1.0:
            return "day"
        if cos_ha > 1.0:
            return "night"
        ha = math.degrees(math.acos(cos_ha))
        minutes = 720.0 - 4.0 * (lon + ha if rising else lon - ha) - eqtime
    return minutes


def _solar_day(day: date, lat: float, lon: float) -> tuple[float | str, float | str]:
    return _event_minutes(day, lat, lon, True), _event_minutes(day, lat, lon, False)


def sun_times(day: date, lat: float, lon: float, tz: str | ZoneInfo = "UTC") -> SunTimes:
    """Sunrise and sunset (aware UTC datetimes) of the local calendar day ``day`` at the site.

    The day is taken as the solar day at the site's longitude, which is the local calendar day
    wherever the time zone is within twelve hours of the sun (everywhere people live).
    """
    zone = tz if isinstance(tz, ZoneInfo) else ZoneInfo(tz)
    rise, set_ = _solar_day(day, lat, lon)
    midnight = datetime.combine(day, time(0), timezone.utc)
    if isinstance(rise, float) and isinstance(set_, float):
        return SunTimes(midnight + timedelta(minutes=rise), midnight + timedelta(minutes=set_))
    if "day" in (rise, set_):
        start = datetime.combine(day, time(0), zone)
        return SunTimes(start.astimezone(timezone.utc),
                        (start + timedelta(days=1)).astimezone(timezone.utc))
    return SunTimes(None, None)


def _solar_date(ts: float, lon: float) -> date:
    """The date of the solar day (local mean solar time at ``lon``) that contains ``ts``."""
    return datetime.fromtimestamp(ts + lon * 240.0, timezone.utc).date()


def _day_bounds(day: date, lat: float, lon: float) -> tuple[float, float] | str:
    """(sunrise, sunset) epoch seconds of a solar day, or "day"/"night" at the poles."""
    rise, set_ = _solar_day(day, lat, lon)
    if isinstance(rise, float) and isinstance(set_, float):
        base = datetime.combine(day, time(0), timezone.utc).timestamp()
        return base + rise * 60.0, base + set_ * 60.0
    return "day" if "day" in (rise, set_) else "night"


def is_night(ts: float, lat: float, lon: float, margin_s: float = 0.0) -> bool:
    """Whether epoch second ``ts`` is between sunset - margin and the next sunrise + margin.

    A positive margin widens the night on both sides: an inverter shuts down a little before
    sunset and starts a little after sunrise, when the light is too weak to feed the grid.
    """
    bounds = _day_bounds(_solar_date(ts, lon), lat, lon)
    if bounds == "day":
        return False
    if bounds == "night":
        return True
    assert isinstance(bounds, tuple)
    sunrise, sunset = bounds
    if sunset - sunrise <= 2.0 * margin_s:
        return True  # the margins swallow a short winter day near the polar circle
    return ts < sunrise + margin_s or ts >= sunset - margin_s


def next_sunrise(ts: float, lat: float, lon: float, horizon_days: int = 2) -> float | None:
    """Epoch seconds of the first sunrise after ``ts`` within ``horizon_days`` solar days
    (None in a polar night or day that lasts longer: the caller re-asks later)."""
    day = _solar_date(ts, lon)
    for n in range(horizon_days + 1):
        bounds = _day_bounds(day + timedelta(days=n), lat, lon)
        if isinstance(bounds, tuple) and bounds[0] > ts:
            return bounds[0]
    return None


__all__ = ["SunTimes", "is_night", "next_sunrise", "sun_times"]
