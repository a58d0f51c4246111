"""agent.clock.night: asleep or offline, probing while asleep, and when to resume."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from agent.clock.night import (
    LastSeen,
    SiteLocation,
    classify_silence,
    device_kind,
    resume_at,
    sleep_probe_interval,
)
from agent.clock.sun import sun_times
from drivers.devicemap import ProfileLibrary

TZ = "Asia/Shanghai"
SITE = SiteLocation(TZ, 39.9042, 116.4074)  # Beijing
NOWHERE = SiteLocation(TZ)  # no location in the site file
POLAR = SiteLocation("Arctic/Longyearbyen", 78.2232, 15.6267)
DAY = date(2026, 12, 1)
PRODUCING = LastSeen(ac_power=20.0, status_text="On-grid")
IDLE = LastSeen(ac_power=0.0, status_text="Standby: no irradiation")


def _t(hhmm: str, d: date = DAY, tz: str = TZ) -> float:
    h, m = (int(x) for x in hhmm.split(":"))
    return datetime(d.year, d.month, d.day, h, m, tzinfo=ZoneInfo(tz)).timestamp()


def _sun() -> tuple[float, float]:
    st = sun_times(DAY, 39.9042, 116.4074, TZ)
    assert st.sunrise and st.sunset
    return st.sunrise.timestamp(), st.sunset.timestamp()


def test_kind_of_every_shipped_map() -> None:
    lib = ProfileLibrary.default()
    kinds = {i: device_kind(p.key for p in lib.get(i).points) for i in lib.ids()}
    assert kinds == {"acrel-adl3000": "meter", "chint-dtsu666": "meter", "chint-dtsu666-4000": "meter",
                     "chint-dtsu666-h": "meter", "eastron-sdm630": "meter", "goodwe-dt": "inverter",
                     "growatt-min": "inverter", "growatt-tl3x": "inverter", "huawei-sun2000": "inverter",
                     "solis-3p": "inverter", "sungrow-sg": "inverter", "sungrow-sg-ktlm": "inverter",
                     "sunspec": "unknown"}  # SunSpec: known once its model chain is discovered
    assert device_kind(["ac_power", "pv1_voltage"]) == "inverter"


def test_dusk() -> None:
    _, sunset = _sun()
    assert classify_silence("inverter", SITE, sunset + 600, PRODUCING).verdict == "sleep"
    assert classify_silence("inverter", SITE, sunset - 1800, PRODUCING).verdict == "sleep"  # within 45 min
    assert classify_silence("inverter", SITE, sunset - 3 * 3600 + 600, PRODUCING).verdict == "offline"
    # An overcast evening: it reported standby just before falling silent two hours before sunset.
    assert classify_silence("inverter", SITE, sunset - 2 * 3600, IDLE).verdict == "sleep"
    assert classify_silence("inverter", SITE, sunset - 2 * 3600, LastSeen(ac_power=0.01)).verdict == "sleep"


def test_dawn() -> None:
    sunrise, _ = _sun()
    assert classify_silence("inverter", SITE, sunrise - 1800).verdict == "sleep"
    assert classify_silence("inverter", SITE, sunrise + 1800).verdict == "sleep"
    assert classify_silence("inverter", SITE, sunrise + 2 * 3600, PRODUCING).verdict == "offline"


def test_noon_silence_is_a_fault_even_after_standby() -> None:
    noon = _t("12:30")
    for last in (None, PRODUCING, IDLE):
        got = classify_silence("inverter", SITE, noon, last)
        assert got.verdict == "offline" and "daylight" in got.reason


def test_meters_never_sleep() -> None:
    for kind in ("meter", "unknown"):
        got = classify_silence(kind, SITE, _t("00:00"), IDLE)  # type: ignore[arg-type]
        assert got.verdict == "offline" and "does not sleep" in got.reason


def test_without_location_the_time_zone_window_is_used() -> None:
    assert classify_silence("inverter", NOWHERE, _t("03:00")).verdict == "sleep"
    assert classify_silence("inverter", NOWHERE, _t("06:40")).verdict == "sleep"  # 06:00 + 45 min
    assert classify_silence("inverter", NOWHERE, _t("07:00")).verdict == "offline"
    assert classify_silence("inverter", NOWHERE, _t("12:00"), IDLE).verdict == "offline"
    assert classify_silence("inverter", NOWHERE, _t("17:20")).verdict == "sleep"  # 18:00 - 45 min
    got = classify_silence("inverter", NOWHERE, _t("22:00"))
    assert got.verdict == "sleep" and "no site location" in got.reason


def test_polar_night_and_day() -> None:
    assert classify_silence("inverter", POLAR, _t("12:00", date(2026, 12, 21), POLAR.timezone)).verdict == "sleep"
    assert classify_silence("inverter", POLAR, _t("00:30", date(2026, 6, 21), POLAR.timezone)).verdict == "offline"


def test_idle_status_texts() -> None:
    assert LastSeen(status_text="Standby: no irradiation").idle
    assert LastSeen(status_text="wait").idle
    assert not LastSeen(status_text="On-grid").idle
    assert not LastSeen(ac_power=12.0).idle
    assert not LastSeen().idle


def test_sleep_probe_interval() -> None:
    assert sleep_probe_interval(10.0) == 300.0
    assert sleep_probe_interval(600.0) == 600.0


def test_resume_at_sunrise_minus_margin() -> None:
    sunrise, _ = _sun()
    assert resume_at(_t("01:00"), SITE) == pytest.approx(sunrise - 2700)
    tomorrow = sun_times(DAY + timedelta(days=1), 39.9042, 116.4074, TZ).sunrise
    assert tomorrow is not None
    assert resume_at(_t("20:00"), SITE) == pytest.approx(tomorrow.timestamp() - 2700)
    assert resume_at(sunrise - 600, SITE) == sunrise - 600  # already inside the margin: now


def test_resume_without_location_and_in_polar_night() -> None:
    assert resume_at(_t("03:00"), NOWHERE) == _t("05:15")
    assert resume_at(_t("23:00"), NOWHERE) == _t("05:15", DAY + timedelta(days=1))
    assert resume_at(_t("05:30"), NOWHERE) == _t("05:30")
    polar_noon = _t("12:00", date(2026, 12, 21), POLAR.timezone)
    assert resume_at(polar_noon, POLAR) == polar_noon + 86400.0


def test_resume_is_now_in_the_morning_margin_not_tomorrow() -> None:
    """Found over the chain: at 06:30, 25 min after sunrise, a sleeping inverter must be polled
    normally again, not at tomorrow's dawn."""
    from datetime import datetime
    from zoneinfo import ZoneInfo

    site = SiteLocation("Asia/Shanghai", 30.0, 120.0)
    tz = ZoneInfo("Asia/Shanghai")
    morning = datetime(2026, 3, 21, 6, 30, tzinfo=tz).timestamp()
    assert resume_at(morning, site) == morning
    evening = datetime(2026, 3, 20, 19, 40, tzinfo=tz).timestamp()
    resume = datetime.fromtimestamp(resume_at(evening, site), tz)
    assert (resume.day, resume.hour) == (21, 5)  # 45 min before the next sunrise (about 06:05)
