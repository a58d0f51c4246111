"""agent.clock.sun: NOAA sunrise/sunset against published tables, polar cases, is_night."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from agent.clock.sun import is_night, next_sunrise, sun_times

BEIJING = (39.9042, 116.4074)
TZ = ZoneInfo("Asia/Shanghai")
LONGYEARBYEN = (78.2232, 15.6267)


def _local(d: date, hhmm: str) -> datetime:
    h, m, *s = (int(x) for x in hhmm.split(":"))
    return datetime(d.year, d.month, d.day, h, m, s[0] if s else 0, tzinfo=TZ)


# Published values for Beijing (39.90 N, 116.41 E, Asia/Shanghai):
# - 2026-07-01: sunrise 04:49:23, sunset 19:46:55 (vercalendario.info, "Sunrise and sunset in
#   Beijing, July 2026", https://www.vercalendario.info/en/sun/china-month-july-2026.html);
# - 1 June / 1 December / 1 January: 04:49-19:37, 07:17-16:51, 07:37-17:00 (whattime.city,
#   "Sunrise and sunset in Beijing", table of the 1st of each month, https://whattime.city/beijing/sun).
@pytest.mark.parametrize(("day", "rise", "set_"), [
    (date(2026, 7, 1), "04:49:23", "19:46:55"),
    (date(2026, 6, 1), "04:49", "19:37"),
    (date(2026, 12, 1), "07:17", "16:51"),
    (date(2027, 1, 1), "07:37", "17:00"),
])
def test_beijing_within_two_minutes_of_published_tables(day: date, rise: str, set_: str) -> None:
    got = sun_times(day, *BEIJING, "Asia/Shanghai")
    assert got.sunrise is not None and got.sunset is not None
    assert got.sunrise.tzinfo is timezone.utc
    assert abs(got.sunrise - _local(day, rise)) <= timedelta(minutes=2)
    assert abs(got.sunset - _local(day, set_)) <= timedelta(minutes=2)


def test_solstices_are_the_longest_and_shortest_days() -> None:
    summer = sun_times(date(2026, 6, 21), *BEIJING, TZ)
    winter = sun_times(date(2026, 12, 21), *BEIJING, TZ)
    assert summer.sunrise and summer.sunset and winter.sunrise and winter.sunset
    assert timedelta(hours=14, minutes=50) < summer.sunset - summer.sunrise < timedelta(hours=15, minutes=10)
    assert timedelta(hours=9, minutes=10) < winter.sunset - winter.sunrise < timedelta(hours=9, minutes=30)


def test_polar_day_and_polar_night() -> None:
    day = sun_times(date(2026, 6, 21), *LONGYEARBYEN, "Arctic/Longyearbyen")
    local = ZoneInfo("Arctic/Longyearbyen")
    assert day.sunrise == datetime(2026, 6, 21, tzinfo=local).astimezone(timezone.utc)
    assert day.sunset == datetime(2026, 6, 22, tzinfo=local).astimezone(timezone.utc)
    assert sun_times(date(2026, 12, 21), *LONGYEARBYEN, "Arctic/Longyearbyen") == (None, None)
    noon_dec = datetime(2026, 12, 21, 12, tzinfo=local).timestamp()
    midnight_jun = datetime(2026, 6, 21, 0, 30, tzinfo=local).timestamp()
    assert is_night(noon_dec, *LONGYEARBYEN)
    assert not is_night(midnight_jun, *LONGYEARBYEN)
    assert next_sunrise(noon_dec, *LONGYEARBYEN) is None


def test_is_night_with_margins() -> None:
    d = date(2026, 12, 1)
    st = sun_times(d, *BEIJING, TZ)
    assert st.sunrise and st.sunset
    rise, set_ = st.sunrise.timestamp(), st.sunset.timestamp()
    assert is_night(_local(d, "00:00").timestamp(), *BEIJING)
    assert not is_night(_local(d, "12:00").timestamp(), *BEIJING)
    assert is_night(rise - 60, *BEIJING) and not is_night(rise + 60, *BEIJING)
    assert is_night(set_ + 60, *BEIJING) and not is_night(set_ - 60, *BEIJING)
    assert is_night(rise + 1800, *BEIJING, margin_s=2700)  # within 45 min after sunrise
    assert is_night(set_ - 1800, *BEIJING, margin_s=2700)
    assert not is_night(rise + 3600, *BEIJING, margin_s=2700)
    assert is_night(_local(d, "12:00").timestamp(), *BEIJING, margin_s=6 * 3600)  # margins swallow the day


def test_next_sunrise() -> None:
    d = date(2026, 12, 1)
    today = sun_times(d, *BEIJING, TZ).sunrise
    tomorrow = sun_times(d + timedelta(days=1), *BEIJING, TZ).sunrise
    assert today and tomorrow
    assert next_sunrise(_local(d, "01:00").timestamp(), *BEIJING) == pytest.approx(today.timestamp())
    assert next_sunrise(_local(d, "12:00").timestamp(), *BEIJING) == pytest.approx(tomorrow.timestamp())
    assert next_sunrise(_local(d, "23:00").timestamp(), *BEIJING) == pytest.approx(tomorrow.timestamp())


def test_west_and_south() -> None:
    # Far west in China's single zone: Kashgar's sun rises late on the local clock, same local day.
    st = sun_times(date(2026, 12, 1), 39.47, 75.99, "Asia/Shanghai")
    assert st.sunrise and st.sunset
    assert st.sunrise.astimezone(TZ).date() == date(2026, 12, 1)
    assert 9 <= st.sunrise.astimezone(TZ).hour <= 10
    # Southern hemisphere: December days are long in Sydney.
    sy = sun_times(date(2026, 12, 21), -33.87, 151.21, "Australia/Sydney")
    assert sy.sunrise and sy.sunset and sy.sunset - sy.sunrise > timedelta(hours=14)
