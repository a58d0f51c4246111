"""agent.clock.trust: sync probe, the release floor, step detection and re-stamping."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.clock import trust
from agent.clock.trust import RELEASE_FLOOR_MS, STA_UNSYNC, TIME_ERROR, ClockWatch, is_trusted, probe_sync, restamp_ms

NOW = 1_796_300_000.0  # 2026-12-03T10:13:20Z


class Clocks:
    """A monotonic clock the test advances and a wall clock that can step."""

    def __init__(self, wall0: float, synced: bool | None = True) -> None:
        self.mono_t = 1000.0
        self.offset = wall0 - self.mono_t
        self.synced = synced

    def mono(self) -> float:
        return self.mono_t

    def wall(self) -> float:
        return self.mono_t + self.offset

    def probe(self) -> bool | None:
        return self.synced

    def watch(self, **kw: object) -> ClockWatch:
        return ClockWatch(wall=self.wall, mono=self.mono, probe=self.probe, **kw)  # type: ignore[arg-type]


def test_release_floor_is_the_release_date() -> None:
    assert RELEASE_FLOOR_MS == 1_796_083_200_000  # 2026-12-01T00:00:00Z


def test_is_trusted() -> None:
    assert is_trusted(NOW * 1000, True)
    assert not is_trusted(NOW * 1000, False)
    assert not is_trusted(5_000, True)  # 1970: never, whatever the kernel says
    assert not is_trusted(RELEASE_FLOOR_MS - 1, True)
    assert is_trusted(NOW * 1000, None, unknown_trusted=True)
    assert not is_trusted(NOW * 1000, None, unknown_trusted=False)


def test_restamp_from_the_monotonic_clock() -> None:
    assert restamp_ms(100.25, NOW - 100.0) == round((NOW + 0.25) * 1000)


def test_the_real_probe_answers_without_raising() -> None:
    assert probe_sync() in (True, False, None)


@pytest.mark.parametrize(("result", "want"), [
    ((0, 0), True), ((TIME_ERROR, 0), False), ((0, STA_UNSYNC), False), ((1, 0x2001), True)])
def test_probe_reads_the_kernel_status(monkeypatch: pytest.MonkeyPatch, result: tuple[int, int], want: bool) -> None:
    monkeypatch.setattr(trust, "_adjtimex", lambda: result)
    assert probe_sync() is want


def test_probe_falls_back_to_the_timesyncd_marker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(trust, "_adjtimex", lambda: None)
    marker = tmp_path / "synchronized"
    assert probe_sync(str(marker)) is None
    marker.touch()
    assert probe_sync(str(marker)) is True


def test_slew_and_jitter_are_not_steps() -> None:
    c = Clocks(NOW)
    watch = c.watch()
    for _ in range(10):
        c.mono_t += 1.0
        c.offset += 0.0005  # NTP slews at most 0.5 ms/s
        assert watch.check() is None
    c.mono_t += 1.0
    c.offset += 1.9  # under the 2 s tolerance
    assert watch.check() is None
    assert watch.steps == 0 and watch.trusted


@pytest.mark.parametrize("step_s", [-600.0, 600.0, 8 * 3600.0, 10 * 365.25 * 86400.0, -2.5])
def test_a_step_is_reported_once_with_its_signed_size(step_s: float) -> None:
    c = Clocks(NOW)
    watch = c.watch()
    c.mono_t += 1.0
    before = c.wall()
    c.offset += step_s
    step = watch.check()
    assert step is not None
    assert step.step_ms == round(step_s * 1000)
    assert step.wall_before_ms == round(before * 1000)
    assert step.wall_after_ms == round(c.wall() * 1000)
    assert step.trusted_before and step.trusted_now
    assert step.details()["step_ms"] == step.step_ms and step.details()["trusted"] is True
    c.mono_t += 1.0
    assert watch.check() is None  # the new offset is the reference from now on
    assert watch.steps == 1 and watch.last_step == step


def test_boot_at_1970_then_ntp() -> None:
    c = Clocks(12.0, synced=False)
    watch = c.watch()
    assert not watch.trusted and watch.trusted_offset() is None and watch.restamp(1000.0) is None
    c.mono_t += 30.0
    reading_mono = c.mono_t  # a poll while the clock still says 1970
    c.mono_t += 1.0
    c.offset = NOW - c.mono_t
    c.synced = True
    step = watch.check()
    assert step is not None and not step.trusted_before and step.trusted_now
    assert step.step_ms > 1_700_000_000_000
    corrected = watch.restamp(reading_mono)
    assert corrected == round((NOW - 1.0) * 1000)  # re-stamped from the monotonic clock


def test_sync_state_changes_without_a_step() -> None:
    c = Clocks(NOW, synced=None)
    watch = c.watch(unknown_trusted=False)
    assert not watch.trusted
    c.synced = True
    c.mono_t += 1.0
    assert watch.check() is None and watch.trusted


def test_a_broken_probe_means_unknown() -> None:
    def broken() -> bool | None:
        raise OSError("no adjtimex here")

    watch = ClockWatch(wall=lambda: NOW, mono=lambda: 5.0, probe=broken, unknown_trusted=True)
    assert watch.synced is None and watch.trusted
    with pytest.raises(ValueError):
        ClockWatch(tolerance_s=0)
