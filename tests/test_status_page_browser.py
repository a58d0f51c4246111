"""The status page in a real browser: headless Chromium opens the page of an agent polling the
simulator (a station named 故城村, three inverters and a meter answering, one inverter silent)
and its script has to fill in every device, the silent one as offline, and a plot with data.
Screenshots in Chinese, in English and at phone size are kept as test artifacts, in
${PVGATE_ARTIFACTS:-test-artifacts}/status-page/ (docs/status-page.md)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.broker import Broker, require_mosquitto
from support.chain import SimDev, readings, start_agent, start_sim, write_site
from support.collector import Collector, publish
from support.ports import free_port
from support.procs import Proc, ProcRegistry, find_tool, in_ci
from test_status_page import get, page_section

ROOT = Path(__file__).resolve().parents[1]
SITE_ID = "gucheng"
SITE_NAME = "故城村"
ANSWERING = [SimDev("inv01", 1, "huawei-sun2000", 60.0), SimDev("inv02", 2, "sungrow-sg", 40.0),
             SimDev("inv03", 3, "growatt-tl3x", 30.0), SimDev("meter", 11, "chint-dtsu666")]
SILENT = SimDev("inv04", 4, "huawei-sun2000")  # configured, but nobody answers at unit 4
LABELS = {"inv01": "一号逆变器", "inv04": "四号逆变器", "meter": "关口电表"}
DEVICES = [*ANSWERING, SILENT]


def chromium() -> str:
    found = find_tool("chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser")
    if found is not None:
        return found
    if in_ci() or os.geteuid() == 0:
        pytest.fail("chromium not found: `./dev test` installs it (apt-get install chromium)", pytrace=False)
    pytest.skip("chromium not found and not root to install it: "
                "sudo apt-get install chromium (or run ./dev test as root)")


def artifacts() -> Path:
    out = Path(os.environ.get("PVGATE_ARTIFACTS") or ROOT / "test-artifacts") / "status-page"
    out.mkdir(parents=True, exist_ok=True)
    return out


@dataclass
class Station:
    agent: Proc
    col: Collector
    broker: Broker
    page: int
    browser: str
    profile: Path

    def run_browser(self, *args: str, timeout: float = 90.0) -> str:
        cmd = [self.browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-extensions", "--disable-dev-shm-usage", "--hide-scrollbars",
               f"--user-data-dir={self.profile}", "--virtual-time-budget=8000", *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                             env={**os.environ, "HOME": str(self.profile)})
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    def dom(self, lang: str) -> str:
        return self.run_browser("--window-size=1280,1400", "--dump-dom", self.url(lang))

    def screenshot(self, name: str, lang: str, size: str) -> Path:
        path = artifacts() / name
        path.unlink(missing_ok=True)
        self.run_browser(f"--window-size={size}", f"--screenshot={path}", self.url(lang))
        return path

    def url(self, lang: str) -> str:
        return f"http://127.0.0.1:{self.page}/?lang={lang}"


def wait_for_plot(page: int, timeout: float = 60.0) -> dict[str, object]:
    """Until today's power has a few points for the station (the page caches it for 10 s)."""
    deadline = time.monotonic() + timeout
    power: dict[str, object] = {}
    while time.monotonic() < deadline:
        power = json.loads(get(page, "/api/power")[2])
        station = power.get("station")
        if isinstance(station, list) and len(station) >= 3:
            return power
        time.sleep(2.0)
    raise AssertionError(f"no plot data within {timeout:.0f} s: {power}")


@pytest.fixture(scope="module")
def station(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Station]:
    browser = chromium()
    root = tmp_path_factory.mktemp("page")
    broker = Broker(root / "broker", binary=require_mosquitto())
    broker.start()
    registry = ProcRegistry(root / "procs")
    col = Collector(broker.host, broker.port, [f"pvgate/{SITE_ID}/#"])
    try:
        modbus, page = free_port(), free_port()
        _, clock = start_sim(registry.start, modbus, ANSWERING, speed=30, start="10:30")
        site = write_site(root / "site.yaml", site_id=SITE_ID, broker_port=broker.port, modbus_port=modbus,
                          devices=DEVICES, interval="1s", timeout="0.3s", extra=page_section(page))
        text = site.read_text(encoding="utf-8").replace("name: 测试电站 test station", f"name: {SITE_NAME}")
        for dev_id, label in LABELS.items():  # the station's own Chinese names for its devices
            text = text.replace(f"{{id: {dev_id}, ", f"{{id: {dev_id}, name: {label}, ")
        site.write_text(text, encoding="utf-8")
        col.start()
        agent = start_agent(registry.start, site, sim_clock=clock)  # simulated noon: silent means offline
        col.wait_for(lambda ms: {"inv01", "inv02", "inv03", "meter"} <= {r["device"] for r in readings(ms)},
                     timeout=30, topic_filter=f"pvgate/{SITE_ID}/data/#")
        yield Station(agent, col, broker, page, browser, root / "chromium")
    finally:
        col.stop()
        registry.cleanup()
        broker.stop()


def rows(dom: str) -> dict[str, str]:
    return dict(re.findall(r'<tr data-device="([^"]+)">(.*?)</tr>', dom, re.S))


def test_site_name_in_the_yaml_the_mqtt_payload_and_the_page(station: Station) -> None:
    publish(station.broker.host, station.broker.port, f"pvgate/{SITE_ID}/cmd/status", json.dumps({"id": "n1"}))
    reply_topic = f"pvgate/{SITE_ID}/reply/status"
    msgs = station.col.wait_for(lambda ms: bool(ms), 20, topic_filter=reply_topic, desc="status reply")
    assert msgs[0].payload.decode("utf-8")  # valid UTF-8 on the wire
    assert msgs[0].json()["result"]["name"] == SITE_NAME
    status = json.loads(get(station.page, "/api/status")[2].decode("utf-8"))
    assert status["name"] == SITE_NAME and status["site"] == SITE_ID
    # The page's <h1> is filled in by its script, from that same snapshot.
    assert f'<h1 id="site-name">{SITE_NAME}</h1>' in station.dom("zh-CN")
    # The devices' Chinese names: in the retained meta message, the snapshot and the page's table.
    metas = station.col.wait_for(lambda ms: {"inv01", "meter"} <= {m.json()["device"] for m in ms}, 20,
                                 topic_filter=f"pvgate/{SITE_ID}/meta/#", desc="meta messages")
    labels = {m.json()["device"]: m.json().get("label") for m in metas}
    assert labels["inv01"] == "一号逆变器" and labels["meter"] == "关口电表" and labels.get("inv02") is None
    assert status["devices"]["inv04"]["name"] == "四号逆变器"
    got = rows(station.dom("zh-CN"))
    assert "一号逆变器" in got["inv01"] and "四号逆变器" in got["inv04"] and "关口电表" in got["meter"]


@pytest.mark.slow
def test_every_device_the_silent_one_offline_and_a_plot_in_chinese(station: Station) -> None:
    power = wait_for_plot(station.page)
    dom = station.dom("zh-CN")
    assert '<html lang="zh-CN">' in dom and "今日功率曲线" in dom
    got = rows(dom)
    assert set(got) == {d.id for d in DEVICES}, sorted(got)
    assert 'data-state="offline"' in got["inv04"] and "离线" in got["inv04"]
    for dev in ("inv01", "inv02", "inv03", "meter"):
        assert 'data-state="online"' in got[dev] and "在线" in got[dev], (dev, got[dev])
        assert "kW" in got[dev]
    station_line = re.search(r'<polyline points="([^"]+)"[^>]*data-series="_station"', dom)
    assert station_line is not None, "no station line in the plot"
    points = station_line.group(1).split()
    assert len(points) >= 3 and len({p.split(",")[1] for p in points}) >= 2  # a line, not a dot
    for dev in power["inverters"]:  # type: ignore[attr-defined]
        if dev != "inv04":
            assert f'data-series="{dev}"' in dom, dev
    assert "4 / 5" in dom  # devices online
    shot = station.screenshot("status-page-zh-CN.png", "zh-CN", "1280,1400")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_the_same_in_english_and_on_a_phone(station: Station) -> None:
    wait_for_plot(station.page)
    dom = station.dom("en")
    assert '<html lang="en">' in dom and "Today's power" in dom
    got = rows(dom)
    assert set(got) == {d.id for d in DEVICES}
    assert 'data-state="offline"' in got["inv04"] and ">offline<" in got["inv04"]
    assert SITE_NAME in dom
    shot = station.screenshot("status-page-en.png", "en", "1280,1400")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    phone = station.screenshot("status-page-phone-zh-CN.png", "zh-CN", "390,1800")
    assert phone.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and phone.stat().st_size > 10_000
