"""site.location and agent.clock_sync in the site file: read, and every mistake located."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load_site
from drivers.errors import ConfigError

SITE = """site:
  id: s1
  timezone: Asia/Shanghai
{location}
mqtt: {{host: 127.0.0.1}}
agent: {{state_dir: {state}, clock_sync: {sync}}}
links:
  - {{id: bus1, type: tcp, host: 127.0.0.1, port: 1502}}
devices:
  - {{id: inv01, link: bus1, unit: 1, profile: huawei-sun2000}}
"""


def write(tmp_path: Path, location: str = "", sync: str = "kernel") -> Path:
    site = tmp_path / "site.yaml"
    site.write_text(SITE.format(location=location, state=tmp_path, sync=sync))
    return site


def test_location_and_clock_sync_are_read(tmp_path: Path) -> None:
    cfg = load_site(write(tmp_path, "  location: {lat: 36.84, lon: 112.85}", "assume"))
    assert (cfg.site.lat, cfg.site.lon) == (36.84, 112.85)
    assert cfg.agent.clock_sync == "assume"
    plain = load_site(write(tmp_path))
    assert (plain.site.lat, plain.site.lon, plain.agent.clock_sync) == (None, None, "kernel")


@pytest.mark.parametrize(("location", "sync", "line", "where", "says"), [
    ("  location: {lat: 136.8, lon: 112.85}", "kernel", 4, "site.location.lat", "-90..90"),
    ("  location: {lat: 36.8}", "kernel", 4, "site.location", "lon"),
    ("  location: {lat: 36.8, lon: 112.8, alt: 900}", "kernel", 4, "site.location", "alt"),
    ("  location: here", "kernel", 4, "site.location", "mapping"),
    ("", "ntp", 6, "agent.clock_sync", "kernel"),
])
def test_mistakes_name_the_line(tmp_path: Path, location: str, sync: str, line: int, where: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_site(write(tmp_path, location, sync))
    problems = [p for p in err.value.problems if where in str(p)]
    assert problems and problems[0].line == line and says in str(problems[0]), err.value.problems
