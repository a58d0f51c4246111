"""Night mode: is a silent device asleep or really offline? (pure decisions, no I/O)

String inverters switch their Modbus interface off when the panels give no more power: after
sunset the whole bus of inverters goes quiet until dawn. That is not an outage and must not
page anyone. A meter, on the other hand, is powered by the grid and never sleeps: a silent meter
is always a fault, and so is an inverter that falls silent at noon.

Decision (:func:`classify_silence`), for a device that has just stopped answering:

1. only inverters sleep; meters and devices of unknown kind are ``offline``;
2. with the site's location: ``sleep`` between sunset - margin and sunrise + margin (margin
   45 min by default, see ``sun.is_night``); polar night is night, polar day is not;
3. without a location (``site.location`` is optional): the site time zone's fixed window, night
   before 06:00 + margin and from 18:00 - margin local time (a typical low-latitude day; the
   technician is told in docs/clock-and-night.md to set the location for accuracy);
4. an inverter that reported standby (its status text) or ~zero AC power in its last answer is
   asleep also within a wider dusk window (``idle_margin_s``, 3 h), because on an overcast
   winter evening inverters shut down long before the astronomical sunset;
5. anything else, e.g. silent at noon while it was producing, is ``offline``.

The kind of a device is inferred from its device map's point keys (:func:`device_kind`): an
inverter has DC/PV points or a daily yield counter; a meter has import/export energy counters
and none of those. Every shipped map is classified correctly this way, so no new map field is
needed; a SunSpec device is classified once its model chain was discovered.

While asleep a device is probed every :func:`sleep_probe_interval` (five minutes or its own
interval, whichever is longer) so a station that really wakes (or a fault that heals) is seen,
and normal polling resumes at :func:`resume_at`, sunrise minus the margin.

API:

    device_kind(point_keys) -> "inverter" | "meter" | "unknown"
    SiteLocation(timezone, lat=None, lon=None)
    LastSeen(ac_power=None, status_text=None)            # from the device's last good reading
    classify_silence(kind, site, ts, last=None, margin_s=2700, idle_margin_s=10800) -> Silence
    sleep_probe_interval(interval_s) -> float
    resume_at(ts, site, margin_s=2700) -> float
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

from agent.clock.sun import is_night, next_sunrise

DeviceKind = Literal["inverter", "meter", "unknown"]
Verdict = Literal["sleep", "offline"]

MARGIN_S = 45 * 60.0
IDLE_MARGIN_S = 3 * 3600.0
SLEEP_PROBE_MIN_S = 300.0
IDLE_POWER_KW = 0.05  # below this an inverter is not feeding: standby, whatever its status says
FALLBACK_SUNRISE_H = 6.0  # no location: the time zone's typical day
FALLBACK_SUNSET_H = 18.0

_INVERTER_KEYS = frozenset({"dc_power", "energy_today", "efficiency", "insulation_resistance", "peak_power_today"})
_PV_KEY = re.compile(r"^pv\d+_")
_METER_KEYS = frozenset({"energy_import", "energy_export"})
_IDLE_TEXTS = ("standby", "stand-by", "wait", "sleep", "idle", "no irradiation", "night", "initial",
               "shutdown", "off-grid: no light", "self-check")


def device_kind(point_keys: Iterable[str]) -> DeviceKind:
    """Inverter, meter or unknown, from a device map's point keys (canonical names)."""
    keys = set(point_keys)
    if keys & _INVERTER_KEYS or any(_PV_KEY.match(k) for k in keys):
        return "inverter"
    if keys & _METER_KEYS:
        return "meter"
    return "unknown"


@dataclass(frozen=True)
class SiteLocation:
    """Where the station is: its time zone (required) and its coordinates (optional)."""

    timezone: str
    lat: float | None = None
    lon: float | None = None

    @property
    def located(self) -> bool:
        return self.lat is not None and self.lon is not None


@dataclass(frozen=True)
class LastSeen:
    """What the device said in its last answer before it fell silent."""

    ac_power: float | None = None  # kW
    status_text: str | None = None  # the enum text of its status point, e.g. "Standby: no irradiation"

    @property
    def idle(self) -> bool:
        """Whether the device looked asleep already: standby status or no output."""
        if self.status_text is not None and self.status_text.strip().lower().startswith(_IDLE_TEXTS):
            return True
        return self.ac_power is not None and self.ac_power <= IDLE_POWER_KW


@dataclass(frozen=True)
class Silence:
    """The verdict on a silence and why (the reason goes into the event and the log)."""

    verdict: Verdict
    reason: str


def _fallback_night(ts: float, tz: str, margin_s: float) -> bool:
    local = datetime.fromtimestamp(ts, ZoneInfo(tz))
    hours = local.hour + local.minute / 60.0 + local.second / 3600.0
    return hours < FALLBACK_SUNRISE_H + margin_s / 3600.0 or hours >= FALLBACK_SUNSET_H - margin_s / 3600.0


def _night(ts: float, site: SiteLocation, margin_s: float) -> bool:
    if site.lat is not None and site.lon is not None:
        return is_night(ts, site.lat, site.lon, margin_s)
    return _fallback_night(ts, site.timezone, margin_s)


def classify_silence(kind: DeviceKind, site: SiteLocation, ts: float, last: LastSeen | None = None,
                     margin_s: float = MARGIN_S, idle_margin_s: float = IDLE_MARGIN_S) -> Silence:
    """``sleep`` or ``offline`` for a device silent at epoch second ``ts`` (see module docstring)."""
    if kind != "inverter":
        return Silence("offline", f"a {kind if kind != 'unknown' else 'device of unknown kind'} does not sleep")
    where = "sun at the site" if site.located else f"06:00-18:00 in {site.timezone} (no site location)"
    if _night(ts, site, margin_s):
        return Silence("sleep", f"night ({where}, margin {margin_s / 60:.0f} min)")
    if last is not None and last.idle and _night(ts, site, idle_margin_s):
        return Silence("sleep", f"idle before falling silent at dusk or dawn ({where})")
    return Silence("offline", f"silent in daylight ({where})")


def sleep_probe_interval(interval_s: float) -> float:
    """How often to probe a sleeping device: its interval, but not more often than every 5 min."""
    return max(SLEEP_PROBE_MIN_S, interval_s)


def resume_at(ts: float, site: SiteLocation, margin_s: float = MARGIN_S) -> float:
    """When to resume normal polling of a device asleep at ``ts``: next sunrise - margin.

    Never earlier than ``ts``. In a polar night (no sunrise within two days) the answer is a
    day later, when the caller asks again.
    """
    if site.lat is not None and site.lon is not None:
        # The sunrise that ends this night: within the margin after sunrise it is the one just
        # past (resume now), not tomorrow's.
        rise = next_sunrise(ts - margin_s, site.lat, site.lon)
        return max(ts, rise - margin_s) if rise is not None else ts + 86400.0
    local = datetime.fromtimestamp(ts, ZoneInfo(site.timezone))
    dawn = local.replace(hour=int(FALLBACK_SUNRISE_H), minute=0, second=0, microsecond=0)
    if dawn.timestamp() + margin_s <= ts:
        dawn = (dawn.replace(tzinfo=None) + timedelta(days=1)).replace(tzinfo=local.tzinfo)
    return max(ts, dawn.timestamp() - margin_s)


__all__ = ["DeviceKind", "LastSeen", "Silence", "SiteLocation", "Verdict", "classify_silence", "device_kind",
           "resume_at", "sleep_probe_interval"]
