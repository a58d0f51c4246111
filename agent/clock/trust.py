"""Clock trust: is the wall clock synchronised, did it step, and re-stamping from the monotonic clock.

A village gateway often boots with no RTC battery (1970) or a stale RTC, and gets its time
later from NTP, a 4G modem or a technician. Readings taken before that must not be published as
if their time were known, and a step must be told to the center (``clock_step``).

- :func:`probe_sync` asks the kernel (``adjtimex`` with modes=0, read-only, no privilege): the
  clock is synchronised unless the call returns ``TIME_ERROR`` or the status has
  ``STA_UNSYNC``. chrony, ntpd and systemd-timesyncd all clear ``STA_UNSYNC`` once they have
  disciplined the clock, so the kernel answer covers them all without running their tools.
  Where ``adjtimex`` is unavailable (not Linux, seccomp), the marker file that
  systemd-timesyncd writes (``/run/systemd/timesync/synchronized``) is looked at; with neither,
  the answer is None (unknown) and the caller's setting decides.
- :data:`RELEASE_FLOOR_MS`: a wall time before this release's date is never trusted, whatever
  the kernel says (an RTC reset to its epoch is "synchronised" to nothing).
- :class:`ClockWatch`, called about once a second, compares the wall-monotonic offset with the
  previous call; a change beyond the tolerance (default 2 s) is a step and comes back as a
  :class:`ClockStep` (signed ``step_ms``, wall before/after, trust before/now).
- :func:`restamp_ms`: the corrected wall time of a reading from its monotonic time and the
  current trusted offset (``clock:corrected``).

API:

    probe_sync() -> bool | None
    is_trusted(wall_ms, synced, unknown_trusted=True) -> bool
    restamp_ms(mono_t, offset_s) -> int
    watch = ClockWatch(wall=time.time, mono=time.monotonic, probe=probe_sync,
                       tolerance_s=2.0, unknown_trusted=True)
    watch.check() -> ClockStep | None;  watch.trusted;  watch.offset_s;  watch.trusted_offset()
    watch.restamp(mono_t) -> int | None
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

# 2026-12-01T00:00:00Z, this release's date: no correct clock can be earlier.
RELEASE_FLOOR_MS = 1_796_083_200_000
STA_UNSYNC = 0x0040  # <linux/timex.h>: clock not synchronised
TIME_ERROR = 5  # adjtimex() return value: clock not synchronised
TIMESYNCD_MARKER = "/run/systemd/timesync/synchronized"

SyncProbe = Callable[[], "bool | None"]
Clock = Callable[[], float]


class _Timex(ctypes.Structure):
    """struct timex from <sys/timex.h>, up to ``status``, padded for the fields after it."""

    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        # The kernel writes the whole struct (about 200 bytes on 64-bit): room to spare.
        ("_rest", ctypes.c_byte * 512),
    ]


_libc: ctypes.CDLL | None = None


def _adjtimex() -> tuple[int, int] | None:
    """(return value, status) of a read-only adjtimex call, or None when it cannot be made."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        func = _libc.adjtimex
    except (OSError, AttributeError):
        return None
    tx = _Timex()  # zeroed: modes=0 reads without changing anything
    ret = int(func(ctypes.byref(tx)))
    if ret < 0:
        return None
    return ret, int(tx.status)


def probe_sync(marker: str = TIMESYNCD_MARKER) -> bool | None:
    """True when the kernel clock is synchronised, False when not, None when it cannot be told."""
    result = _adjtimex()
    if result is not None:
        ret, status = result
        return not (ret == TIME_ERROR or status & STA_UNSYNC)
    if os.path.exists(marker):
        return True
    return None


def is_trusted(wall_ms: float, synced: bool | None, unknown_trusted: bool = True) -> bool:
    """Whether a wall time may be published as is: above the floor, and synchronised (or unknown
    and the site accepts unknown, e.g. a gateway with a good RTC and no time daemon)."""
    if wall_ms < RELEASE_FLOOR_MS:
        return False
    if synced is None:
        return unknown_trusted
    return synced


def restamp_ms(mono_t: float, offset_s: float) -> int:
    """Wall time (UTC epoch ms) of monotonic instant ``mono_t`` under offset wall - monotonic."""
    return round((mono_t + offset_s) * 1000.0)


@dataclass(frozen=True)
class ClockStep:
    """A wall-clock step, for the ``clock_step`` event on ``events/_site``."""

    step_ms: int  # signed: positive when the wall clock jumped forward
    wall_before_ms: int  # the wall time just before the step, extrapolated on the monotonic clock
    wall_after_ms: int  # the wall time read after the step
    mono: float  # monotonic time at which the step was seen
    trusted_before: bool
    trusted_now: bool

    def details(self) -> dict[str, int | bool]:
        """The event's details, as the MQTT contract names them."""
        return {"step_ms": self.step_ms, "wall_before_ms": self.wall_before_ms,
                "wall_after_ms": self.wall_after_ms, "trusted": self.trusted_now,
                "trusted_before": self.trusted_before}


class ClockWatch:
    """Detects wall-clock steps and tracks whether the wall clock is trusted (call ``check()``)."""

    def __init__(self, *, wall: Clock = time.time, mono: Clock = time.monotonic,
                 probe: SyncProbe = probe_sync, tolerance_s: float = 2.0, unknown_trusted: bool = True) -> None:
        if tolerance_s <= 0:
            raise ValueError("tolerance_s must be > 0")
        self._wall = wall
        self._mono = mono
        self._probe = probe
        self.tolerance_s = tolerance_s
        self.unknown_trusted = unknown_trusted
        self.steps = 0
        self.last_step: ClockStep | None = None
        self.offset_s = wall() - mono()
        self.synced = self._safe_probe()
        self.trusted = is_trusted(self.offset_s * 1000.0 + mono() * 1000.0, self.synced, unknown_trusted)

    def _safe_probe(self) -> bool | None:
        try:
            return self._probe()
        except Exception:  # a broken probe is "unknown", never a crash of the service
            return None

    def check(self) -> ClockStep | None:
        """Read both clocks and the sync state; a :class:`ClockStep` when the wall clock stepped.

        Slewing (NTP's gradual correction, at most 0.5 ms/s) never reaches the tolerance between
        two calls a second apart, so only real steps are reported.
        """
        mono = self._mono()
        wall = self._wall()
        offset = wall - mono
        delta = offset - self.offset_s
        trusted_before = self.trusted
        self.synced = self._safe_probe()
        self.trusted = is_trusted(wall * 1000.0, self.synced, self.unknown_trusted)
        self.offset_s = offset
        if abs(delta) <= self.tolerance_s:
            return None
        step = ClockStep(step_ms=round(delta * 1000.0), wall_before_ms=round((wall - delta) * 1000.0),
                         wall_after_ms=round(wall * 1000.0), mono=mono,
                         trusted_before=trusted_before, trusted_now=self.trusted)
        self.steps += 1
        self.last_step = step
        return step

    def trusted_offset(self) -> float | None:
        """wall - monotonic as of the last check, or None while the wall clock is not trusted."""
        return self.offset_s if self.trusted else None

    def restamp(self, mono_t: float) -> int | None:
        """Corrected wall time (ms) of a reading taken at monotonic ``mono_t``; None while untrusted."""
        offset = self.trusted_offset()
        return None if offset is None else restamp_ms(mono_t, offset)


__all__ = ["RELEASE_FLOOR_MS", "ClockStep", "ClockWatch", "is_trusted", "probe_sync", "restamp_ms"]
