"""Time the station can trust, and a night that is not an outage.

Owns: everything about time that the rest of the agent should not have to think about (below).
May import: the stdlib and drivers/ only, never another agent package.

- ``schedule``: :class:`PollSchedule`, polls timed on the monotonic clock and aligned to
  wall-clock multiples of their interval only while the wall clock is trusted. A wall-clock
  step in either direction re-aligns at the next tick: no pause, no burst, no list of missed
  ticks; ticks the event loop could not serve are counted as overruns, in O(1).
- ``trust``: is the system clock synchronised (kernel ``adjtimex``), never trusted below the
  release date; :class:`ClockWatch` detects wall-clock steps (a ``ClockStep`` record for the
  ``clock_step`` event) and re-stamps readings from the monotonic clock.
- ``sun``: sunrise and sunset for a site, computed locally (NOAA solar-position formulas).
- ``night``: the pure decision whether a silent device is asleep (``sleep``) or ``offline``,
  how often to probe it while it sleeps, and when to resume normal polling.

Wiring (done by the runtime, not here), in short:

1. Build one :class:`ClockWatch` at start; call ``watch.check()`` once a second. When it returns a
   :class:`ClockStep`, publish ``clock_step`` on ``events/_site`` and call
   ``schedule.realign()``.
2. Build one :class:`PollSchedule` with ``trusted=lambda: watch.trusted``, add one job per
   device (``schedule.add("poll-" + id, interval_s, callback)``), ``start()`` it inside the event
   loop, ``await stop()`` on shutdown or before a reload rebuilds the jobs.
3. Stamp each reading with the wall time only when ``watch.trusted``; otherwise flag it
   ``clock:unsynced`` and keep its monotonic time, so that ``restamp_ms`` can correct it
   (``clock:corrected``) once the clock is trusted.
4. When a device falls silent, ask ``night.classify_silence``; on ``sleep`` publish the
   ``sleep`` event instead of ``offline`` and probe at ``night.sleep_probe_interval`` until
   ``night.resume_at``; the first answer afterwards is a ``wake`` event.

Import rule: this package imports only ``drivers/``, the standard library and third-party
libraries, never another agent package, so that it can be tested alone and the agent's other
packages can depend on it without cycles.
"""

from __future__ import annotations

from agent.clock.night import (
    DeviceKind,
    LastSeen,
    Silence,
    SiteLocation,
    classify_silence,
    device_kind,
    resume_at,
    sleep_probe_interval,
)
from agent.clock.schedule import JobInfo, PollSchedule, first_due, next_due
from agent.clock.sun import SunTimes, is_night, next_sunrise, sun_times
from agent.clock.trust import (
    RELEASE_FLOOR_MS,
    ClockStep,
    ClockWatch,
    is_trusted,
    probe_sync,
    restamp_ms,
)

__all__ = [
    "RELEASE_FLOOR_MS",
    "ClockStep",
    "ClockWatch",
    "DeviceKind",
    "JobInfo",
    "LastSeen",
    "PollSchedule",
    "Silence",
    "SiteLocation",
    "SunTimes",
    "classify_silence",
    "device_kind",
    "first_due",
    "is_night",
    "is_trusted",
    "next_due",
    "next_sunrise",
    "probe_sync",
    "restamp_ms",
    "resume_at",
    "sleep_probe_interval",
    "sun_times",
]
