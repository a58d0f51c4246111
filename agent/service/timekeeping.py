"""Time the agent can trust: the clock watch, poll stamps, clock steps, re-stamping, and the night policy.

- Every poll is stamped with the wall clock; while the clock is not trusted (not synchronised,
  or before the release date) the reading carries `clock:unsynced`.
- Once a second the wall clock is compared with the monotonic clock. A step publishes
  `clock_step` on `events/_site`. A step that brings the clock into trust re-stamps the unsent
  readings taken on the untrusted clock: each stretch of untrusted time had one wall-monotonic
  offset, so its readings move by (trusted offset - that offset) and are flagged
  `clock:corrected`. Readings already sent are covered by the event: the center adds `step_ms`
  to the `clock:unsynced` readings with seq in `unsynced_first_seq`..`seq_before`.
- Night: an inverter that falls silent between dusk and dawn at the site is asleep.

Test hooks (injected faults, named as such; each logs a TEST HOOK warning when armed):
``PVGATE_TEST_CLOCK_FILE=<path>``: a JSON file ``{"offset_s": S, "synced": true|false}``
re-read every second; Python's wall time (`time.time`) is moved by S and the kernel's sync state
replaced, the monotonic clock untouched: how NTP or a 4G modem steps a gateway's clock.
``PVGATE_TEST_SUN_CLOCK=REAL0,SIM0,SPEED``: the night policy's sense of the time of day follows
an accelerated simulator clock (SIM0 + (now - REAL0) × SPEED), so a test sees a night in minutes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.clock.night import LastSeen, SiteLocation, classify_silence, device_kind, resume_at, sleep_probe_interval
from agent.clock.trust import RELEASE_FLOOR_MS, ClockStep, ClockWatch, probe_sync
from agent.config import SiteConfig
from agent.store.buffer import Buffer
from drivers.model import Device, Event, Reading, Value

log = logging.getLogger(__name__)
CLOCK_FILE_ENV = "PVGATE_TEST_CLOCK_FILE"
SUN_CLOCK_ENV = "PVGATE_TEST_SUN_CLOCK"
UNSYNCED = "clock:unsynced"
_real_time = time.time


@dataclass
class _Stretch:
    """Readings taken while the clock was not trusted: seqs after `after_seq`, under one offset."""

    after_seq: int
    offset_s: float


class ClockFileHook:
    """The test hook that steps Python's wall time (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset_s = 0.0
        self.synced: bool | None = None
        self.read()
        time.time = lambda: _real_time() + self.offset_s
        log.warning("device=_site TEST HOOK %s armed: wall time and sync state come from %s", CLOCK_FILE_ENV, path)

    def read(self) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return  # being rewritten: keep the last values
        self.offset_s = float(data.get("offset_s", 0.0))
        synced = data.get("synced")
        self.synced = synced if isinstance(synced, bool) else None


class SunClock:
    """The time of day that decides night (the wall clock; a simulator's clock under the test hook)."""

    def __init__(self, spec: str | None = None) -> None:
        self.real0, self.sim0, self.speed = 0.0, 0.0, 1.0
        if spec:
            self.real0, self.sim0, self.speed = (float(x) for x in spec.split(","))
            log.warning("device=_site TEST HOOK %s armed: night follows a clock at %gx", SUN_CLOCK_ENV, self.speed)

    def now(self) -> float:
        if self.speed == 1.0 and self.sim0 == 0.0:
            return time.time()
        return self.sim0 + (time.time() - self.real0) * self.speed

    def seconds_until(self, t: float) -> float:
        """Real seconds until this clock reads t."""
        return (t - self.now()) / self.speed


class Timekeeper:
    """Owns the clock watch; stamps polls; turns steps into events and re-stamped readings."""

    def __init__(self, cfg: SiteConfig, buffer: Buffer, put: Callable[[Reading | Event], None],
                 flush: Callable[[float], object]) -> None:
        self.buffer = buffer
        self.put = put
        self.flush = flush
        path = os.environ.get(CLOCK_FILE_ENV)
        self.hook = ClockFileHook(Path(path)) if path else None
        assume = cfg.agent.clock_sync == "assume"
        self.watch = ClockWatch(wall=lambda: time.time(), probe=self._probe if not assume else lambda: True)
        self.location = SiteLocation(cfg.site.timezone, cfg.site.lat, cfg.site.lon)
        self.sun = SunClock(os.environ.get(SUN_CLOCK_ENV))
        self.steps = 0
        self.restamped = 0
        self._stretches: list[_Stretch] = []
        self._pending: list[ClockStep] = []  # steps seen by stamp(), announced by run()
        self.device_offsets_ms: dict[str, int] = {}  # device clock - gateway clock, per device
        if not self.watch.trusted:
            self._stretches.append(_Stretch(buffer.last_seq(), self.watch.offset_s))
            log.warning("device=_site the system clock is not synchronised: readings are flagged %s until it is",
                        UNSYNCED)

    def configure(self, cfg: SiteConfig) -> None:
        """The site's location may change with a reload; the clock watch stays."""
        self.location = SiteLocation(cfg.site.timezone, cfg.site.lat, cfg.site.lon)

    def _probe(self) -> bool | None:
        return self.hook.synced if self.hook is not None else probe_sync()

    @property
    def trusted(self) -> bool:
        return self.watch.trusted

    def stamp(self) -> tuple[int, tuple[str, ...]]:
        """A poll's timestamp (UTC ms) and its clock flags. A step not yet seen by the once-a-second
        check is seen here first, so no reading is stamped on the new clock under the old trust
        (it would then be re-stamped a second time)."""
        wall = time.time()
        if abs(wall - time.monotonic() - self.watch.offset_s) > self.watch.tolerance_s:
            step = self.watch.check()
            if step is not None:
                self._pending.append(step)
        ts = int(wall * 1000)
        return ts, () if self.watch.trusted and ts >= RELEASE_FLOOR_MS else (UNSYNCED,)

    def witness(self, device_id: str, device_time_s: float) -> None:
        """A device's own clock, read now: its offset from the gateway's (1 s resolution)."""
        offset = round(device_time_s * 1000 - time.time() * 1000)
        self.device_offsets_ms[device_id] = offset
        if abs(offset) > 300_000:
            log.warning("device=%s its clock is %+.0f s from the gateway's (a wrong clock on one of them, or a "
                        "device clock kept in local time)", device_id, offset / 1000)

    def snapshot(self) -> dict[str, object]:
        return {"trusted": self.watch.trusted, "synchronised": self.watch.synced, "steps": self.steps,
                "last_step_ms": self.watch.last_step.step_ms if self.watch.last_step else None,
                "restamped_rows": self.restamped, "device_offsets_ms": dict(self.device_offsets_ms)}

    # -- the once-a-second check ---------------------------------------------------------------

    async def run(self, on_step: Callable[[], None]) -> None:
        """Check the clock every second until cancelled; on_step re-aligns the poll schedule."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            if self.hook is not None:
                self.hook.read()
            was_trusted = self.watch.trusted
            step = self.watch.check()
            if step is not None:
                self._pending.append(step)
            elif was_trusted and not self.watch.trusted and not self._pending:
                offset = self.watch.offset_s
                last = await loop.run_in_executor(None, self.buffer.last_seq)  # the buffer's lock: off the loop
                self._stretches.append(_Stretch(last, offset))
            while self._pending:
                await loop.run_in_executor(None, self._stepped, self._pending.pop(0))
                on_step()

    def _stepped(self, step: ClockStep) -> None:
        """Runs off the event loop: flush, re-stamp if the clock came into trust, announce."""
        self.steps += 1
        for device_id in list(self.device_offsets_ms):  # measured against the clock before the step
            self.device_offsets_ms[device_id] -= step.step_ms
        self.flush(5.0)  # readings polled before the step get their seqs first
        last = self.buffer.last_seq()
        first = self._stretches[0].after_seq + 1 if self._stretches else None
        restamped = 0
        if step.trusted_now:
            restamped = self._restamp(last)
        elif step.trusted_before or self._stretches:
            self._stretches.append(_Stretch(last, self.watch.offset_s))
        self.restamped += restamped
        details: dict[str, Value] = {**step.details(), "seq_before": last, "restamped": restamped}
        if self.device_offsets_ms:  # the devices' clocks, as witnesses of which clock was right
            details["device_offsets_ms"] = ",".join(f"{d}:{o}" for d, o in sorted(self.device_offsets_ms.items()))
        if first is not None and first <= last:
            details["unsynced_first_seq"] = first
        self.put(Event("_site", int(time.time() * 1000), "clock_step", details))
        log.warning("device=_site wall clock stepped by %+d ms (trusted now: %s); %d unsent readings re-stamped",
                    step.step_ms, step.trusted_now, restamped)

    def _restamp(self, last_seq: int) -> int:
        """Move each untrusted stretch's unsent readings onto the trusted clock."""
        done = 0
        bounds = [s.after_seq for s in self._stretches[1:]] + [last_seq]
        for stretch, upto in zip(self._stretches, bounds):
            delta_ms = round((self.watch.offset_s - stretch.offset_s) * 1000)
            done += self.buffer.restamp(stretch.after_seq + 1, upto, delta_ms, UNSYNCED, "clock:corrected")
        self._stretches.clear()
        return done

    # -- night ------------------------------------------------------------------------------------

    def asleep(self, device: Device, last_values: Mapping[str, Value]) -> tuple[bool, str]:
        kind = device_kind(p.key for p in device.profile.points)
        verdict = classify_silence(kind, self.location, self.sun.now(), _last_seen(device, last_values))
        return verdict.verdict == "sleep", verdict.reason

    def sleep_probe_s(self, device: Device) -> float:
        now = self.sun.now()
        until_dawn = self.sun.seconds_until(resume_at(now, self.location))
        if until_dawn <= 0:
            return device.interval_s  # dawn: normal polling
        return max(device.interval_s, min(sleep_probe_interval(device.interval_s), until_dawn))


def _last_seen(device: Device, values: Mapping[str, Value]) -> LastSeen:
    power = values.get("ac_power")
    text = None
    for point in device.profile.points:
        if point.enum and "status" in point.key and point.key in values:
            raw = values[point.key]
            text = dict(point.enum).get(raw, str(raw)) if isinstance(raw, int) else str(raw)
            break
    return LastSeen(float(power) if isinstance(power, (int, float)) and not isinstance(power, bool) else None, text)
