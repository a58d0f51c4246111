"""The status page (agent/service/web.py): its HTTP answers on a real socket, the JSON endpoint
against `pvgate status`, today's power from a real buffer, starting, stopping and reloading
with the running agent, and polling that keeps its pace while the page is hammered."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import SiteConfig, load_site
from agent.service.web import MAX_HEAD_BYTES, StatusPageServer
from agent.service.webdata import accept_language, bucket_for, choose_language, power_today
from agent.store.buffer import Buffer
from agent.store.rows import KIND_DATA
from drivers.model import Reading
from support.broker import Broker
from support.chain import SimDev, start_agent, start_sim, write_site
from support.ports import free_port
from support.procs import Proc

INVS = [SimDev("inv01", 1, "huawei-sun2000"), SimDev("inv02", 2, "sungrow-sg"), SimDev("meter", 11, "chint-dtsu666")]


# -- helpers (the browser test uses them too) ----------------------------------------------------


def get(port: int, path: str, *, method: str = "GET", headers: dict[str, str] | None = None,
        timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def raw(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send bytes as they are and read the whole answer (for what http.client would not send)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def page_section(port: int, auth_file: Path | None = None) -> str:
    return f"\nstatus_page:\n  port: {port}\n" + (f"  auth_file: {auth_file}\n" if auth_file else "")


def listening_ports(pid: int) -> set[int]:
    """TCP ports a process listens on (from /proc: its socket inodes in the LISTEN state)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table, encoding="ascii") as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


# -- the server on its own, against a stand-in agent (unit) ------------------------------------


class StandIn:
    """The two things the page reads of an agent: its configuration and its status snapshot."""

    def __init__(self, cfg: SiteConfig) -> None:
        self.cfg = cfg
        self.snapshots = 0

    def status_snapshot(self, values: bool = True) -> dict[str, Any]:
        self.snapshots += 1
        return {"v": 1, "site": self.cfg.site.id, "name": self.cfg.site.name, "devices": {}, "links": {}}


def site_with_page(tmp_path: Path, port: int, extra: str = "", auth: str | None = None) -> SiteConfig:
    auth_file = None
    if auth is not None:
        auth_file = tmp_path / "page.auth"
        auth_file.write_text(auth + "\n", encoding="utf-8")
        os.chmod(auth_file, 0o600)
    path = write_site(tmp_path / "site.yaml", site_id="unit", broker_port=1883, modbus_port=1502, devices=INVS,
                      extra=page_section(port, auth_file) + extra)
    return load_site(str(path))


def serve(cfg: SiteConfig, body: Callable[[StatusPageServer, int], None]) -> StandIn:
    """Run the page on an event loop of its own while `body(server, port)` asks it things."""
    host = StandIn(cfg)

    async def main() -> None:
        server = StatusPageServer(host)
        await server.apply(cfg.status_page)
        assert server.listening
        try:
            assert cfg.status_page is not None
            await asyncio.to_thread(body, server, cfg.status_page.port)
        finally:
            await server.stop()

    asyncio.run(main())
    return host


def test_routes_methods_and_limits(tmp_path: Path) -> None:
    cfg = site_with_page(tmp_path, free_port())

    def body(server: StatusPageServer, port: int) -> None:
        status, headers, page = get(port, "/")
        assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
        assert "connect-src 'self'" in headers["content-security-policy"]
        text = page.decode().replace('"http://www.w3.org/2000/svg"', "")  # a namespace name, never fetched
        assert "http://" not in text and "https://" not in text and "//" + "cdn" not in text
        status, headers, data = get(port, "/api/status")
        assert status == 200 and headers["content-type"] == "application/json"
        got = json.loads(data)
        assert set(got.pop("process")) >= {"rss_bytes", "fds", "threads", "tasks"}  # as pvgate status adds it
        assert got == {"v": 1, "site": "unit", "name": "测试电站 test station", "devices": {}, "links": {}}
        assert get(port, "/api/power")[0] == 200
        head = get(port, "/", method="HEAD")
        assert head[0] == 200 and head[2] == b"" and int(head[1]["content-length"]) == len(page)
        assert get(port, "/nothing-here")[0] == 404
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            status, headers, _ = get(port, "/api/status", method=method)
            assert status == 405 and headers["allow"] == "GET, HEAD", method
        big = raw(port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (MAX_HEAD_BYTES + 100) + b"\r\n\r\n")
        assert big.startswith(b"HTTP/1.1 431 "), big[:80]
        many = raw(port, b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(60)) + b"\r\n")
        assert many.startswith(b"HTTP/1.1 431 "), many[:80]
        assert raw(port, b"HELLO\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        fields = "&".join(f"k{i}=v" for i in range(20)).encode()
        assert raw(port, b"GET /?" + fields + b" HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        assert server.requests >= 12

    serve(cfg, body)


def test_login_when_configured(tmp_path: Path) -> None:
    cfg = site_with_page(tmp_path, free_port(), auth="技术员:s3cret:x")

    def body(server: StatusPageServer, port: int) -> None:
        for path in ("/", "/api/status", "/api/power", "/nothing-here"):
            status, headers, _ = get(port, path)
            assert status == 401 and headers["www-authenticate"].startswith('Basic realm="pvgate"'), path
        assert get(port, "/api/status", headers=basic("技术员", "wrong"))[0] == 401
        assert get(port, "/api/status", headers=basic("tech", "s3cret:x"))[0] == 401
        assert get(port, "/api/status", headers={"Authorization": "Basic !!!"})[0] == 401
        assert get(port, "/api/status", headers=basic("技术员", "s3cret:x"))[0] == 200
        assert get(port, "/", headers=basic("技术员", "s3cret:x"))[0] == 200
        assert get(port, "/", method="POST", headers=basic("技术员", "s3cret:x"))[0] == 405

    serve(cfg, body)


def test_language_of_the_page(tmp_path: Path) -> None:
    cfg = site_with_page(tmp_path, free_port())

    def body(server: StatusPageServer, port: int) -> None:
        zh = get(port, "/?lang=zh-CN")[2].decode()
        assert '<html lang="zh-CN">' in zh and "今日功率曲线" in zh and '"state_offline": "离线"' in zh
        en = get(port, "/?lang=en")[2].decode()
        assert '<html lang="en">' in en and "Today&#x27;s power" in en and '"state_offline": "offline"' in en
        browser = get(port, "/", headers={"Accept-Language": "zh-CN,zh;q=0.9,en;q=0.8"})
        assert browser[1]["content-language"] == "zh-CN"

    serve(cfg, body)
    assert accept_language("fr, en;q=0.5, zh;q=0.8") == "zh-CN"
    assert accept_language("de") is None
    assert choose_language("en", "zh-CN", "zh", "zh-CN") == "en"  # ?lang= first
    assert choose_language(None, "en", "zh-CN", "zh-CN") == "en"  # then the site file
    assert choose_language(None, None, "zh-CN", "en") == "zh-CN"  # then the browser
    assert choose_language("xx", None, None, "zh-CN") == "zh-CN"  # then the agent's


def test_status_is_computed_once_however_many_ask(tmp_path: Path) -> None:
    cfg = site_with_page(tmp_path, free_port())

    def body(server: StatusPageServer, port: int) -> None:
        threads = [threading.Thread(target=get, args=(port, "/api/status")) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    host = serve(cfg, body)
    assert 1 <= host.snapshots <= 2  # one per second at most (STATUS_TTL_S)


def test_power_today_from_a_real_buffer(tmp_path: Path) -> None:
    cfg = site_with_page(tmp_path, free_port())
    now = int(time.time() * 1000)
    buf = Buffer(cfg.buffer.path)
    try:
        rows: list[Reading] = []
        for i in range(12):  # two minutes, every 10 s
            ts = now - 120_000 + i * 10_000
            rows += [Reading("inv01", ts, {"ac_power": 10.0 + i}), Reading("inv02", ts, {"ac_power": 20.0}),
                     Reading("meter", ts, {"ac_power": -30.0})]
        buf.append(rows)
    finally:
        buf.close()
    size = Path(cfg.buffer.path).stat().st_size
    got = power_today(cfg, now)
    assert got["inverters"] == ["inv01", "inv02"]  # the meter's power is not the station's production
    assert got["bucket_s"] == 10 and len(got["devices"]["inv01"]) == 12
    assert [kw for _, kw in got["devices"]["inv01"]] == [10.0 + i for i in range(12)]
    assert [kw for _, kw in got["station"]] == [30.0 + i for i in range(12)]
    assert Path(cfg.buffer.path).stat().st_size == size  # read-only
    assert bucket_for(86_400_000) == 300 and bucket_for(60_000) == 10 and bucket_for(2 * 3_600_000) == 30


# -- the real agent ------------------------------------------------------------------------------


def status_json(site: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "agent.cli", "status", "-c", str(site), "--json"],
                         capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def shape(data: Any) -> Any:
    """The keys of a snapshot, nested (values aside: they move between two asks)."""
    if isinstance(data, dict):
        return {k: shape(v) for k, v in data.items() if k not in ("values", "units", "last_reload")}
    return type(data).__name__ if data is not None else None


def test_agent_page_matches_pvgate_status_and_follows_reloads(
        tmp_path: Path, broker: Broker, procs: Callable[..., Proc]) -> None:
    modbus, page = free_port(), free_port()
    start_sim(procs, modbus, INVS, speed=60)
    blocker = socket.create_server(("127.0.0.1", page))  # the port is taken when the agent starts
    site = write_site(tmp_path / "site.yaml", site_id="web", broker_port=broker.port, modbus_port=modbus,
                      devices=INVS, interval="500ms", extra=page_section(page))
    agent = start_agent(procs, site)
    try:
        agent.wait_for_line(rf"status page: cannot listen on 127.0.0.1:{page} .*polling goes on", timeout=10)
        assert page not in listening_ports(agent.pid)
    finally:
        blocker.close()
    polls = status_json(site)["devices"]["inv01"]["polls"]
    time.sleep(1.5)
    assert status_json(site)["devices"]["inv01"]["polls"] > polls  # polling went on without the page

    mark = agent.mark()
    agent.send_signal(signal.SIGHUP)  # the same file: the page that could not listen is tried again
    agent.wait_for_line(rf"status page on http://127.0.0.1:{page}/", timeout=10, since=mark)
    status, _, data = get(page, "/api/status")
    assert status == 200
    assert shape(json.loads(data)) == shape(status_json(site))

    other = free_port()
    site.write_text(site.read_text(encoding="utf-8").replace(f"port: {page}\n", f"port: {other}\n"), encoding="utf-8")
    mark = agent.mark()
    agent.send_signal(signal.SIGHUP)
    agent.wait_for_line(rf"status page on http://127.0.0.1:{other}/", timeout=15, since=mark)
    agent.wait_for_line(r"reload \(SIGHUP\) applied .*: only the status page changed", timeout=15, since=mark)
    assert agent.find_line(r"applied .*: \d+ links, \d+ devices", since=mark) is None  # workers not rebuilt
    assert listening_ports(agent.pid) >= {other} and page not in listening_ports(agent.pid)

    site.write_text(site.read_text(encoding="utf-8").split("\nstatus_page:")[0] + "\n", encoding="utf-8")
    mark = agent.mark()
    agent.send_signal(signal.SIGHUP)
    agent.wait_for_line(r"status page off", timeout=15, since=mark)
    agent.wait_for_line(r"reload \(SIGHUP\) applied .*: only the status page changed", timeout=15, since=mark)
    assert other not in listening_ports(agent.pid), agent.tail(15)
    assert agent.terminate(timeout=30) == 0  # a clean exit; a loaded CI machine may take its time to stop


def test_no_section_nothing_listens(tmp_path: Path, broker: Broker, procs: Callable[..., Proc]) -> None:
    modbus = free_port()
    start_sim(procs, modbus, INVS[:1], speed=60)
    site = write_site(tmp_path / "site.yaml", site_id="nopage", broker_port=broker.port, modbus_port=modbus,
                      devices=INVS[:1])
    agent = start_agent(procs, site)
    time.sleep(1.0)
    assert listening_ports(agent.pid) == set()  # MQTT is a client, the status socket a unix socket
    assert "status page" not in agent.stderr()


# -- hammering ---------------------------------------------------------------------------------


def poll_times(buffer: Path, device: str, since_ms: int, until_ms: int) -> list[int]:
    db = sqlite3.connect(f"file:{buffer}?mode=ro", uri=True)
    try:
        return [r[0] for r in db.execute("SELECT ts FROM record WHERE device = ? AND kind = ? AND ts >= ? AND ts < ? "
                                         "ORDER BY seq", (device, KIND_DATA, since_ms, until_ms))]
    finally:
        db.close()


def gaps(ts: list[int]) -> list[float]:
    return [(b - a) / 1000 for a, b in zip(ts, ts[1:])]


@pytest.fixture
def hammer() -> Iterator[Callable[[int, float, int], dict[str, int]]]:
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def run(port: int, seconds: float, connections: int) -> dict[str, int]:
        counts = {"answers": 0, "errors": 0}
        lock = threading.Lock()

        def worker(i: int) -> None:
            paths = ["/", "/api/status", "/api/power"]
            n = 0
            while not stop.is_set():
                try:
                    status = get(port, paths[n % 3], timeout=5)[0]
                    key = "answers" if status == 200 else "errors"
                except OSError:
                    key = "errors"
                n += 1
                with lock:
                    counts[key] += 1

        threads.extend(threading.Thread(target=worker, args=(i,), daemon=True) for i in range(connections))
        for t in threads:
            t.start()
        stop.wait(seconds)
        stop.set()
        for t in threads:
            t.join(10)
        return counts

    yield run
    stop.set()


@pytest.mark.slow
def test_polling_keeps_its_pace_while_the_page_is_hammered(
        tmp_path: Path, broker: Broker, procs: Callable[..., Proc],
        hammer: Callable[[int, float, int], dict[str, int]]) -> None:
    modbus, page = free_port(), free_port()
    start_sim(procs, modbus, INVS, speed=60)
    site = write_site(tmp_path / "site.yaml", site_id="hammer", broker_port=broker.port, modbus_port=modbus,
                      devices=INVS, interval="1s", extra=page_section(page))
    agent = start_agent(procs, site)
    buffer = tmp_path / "buffer.sqlite"
    time.sleep(3.0)  # past the first polls
    overruns = [status_json(site)["poll_overruns"]]
    t0 = int(time.time() * 1000)
    time.sleep(15.0)
    t1 = int(time.time() * 1000)
    overruns.append(status_json(site)["poll_overruns"])
    counts = hammer(page, 20.0, 8)
    t2 = int(time.time() * 1000)
    time.sleep(1.5)  # the last readings committed
    overruns.append(status_json(site)["poll_overruns"])
    print(f"hammer: {counts['answers']} answers ({counts['answers'] / 20:.0f}/s), {counts['errors']} errors")
    assert counts["answers"] >= 200 and counts["errors"] == 0
    for dev in ("inv01", "inv02", "meter"):
        quiet, loud = gaps(poll_times(buffer, dev, t0, t1)), gaps(poll_times(buffer, dev, t1, t2))
        print(f"{dev}: quiet {len(quiet)} gaps median {statistics.median(quiet):.3f} max {max(quiet):.3f}; "
              f"hammered {len(loud)} gaps median {statistics.median(loud):.3f} max {max(loud):.3f}")
        assert len(loud) >= 17, dev  # ~20 polls in 20 s, none lost
        assert abs(statistics.median(loud) - 1.0) < 0.1, (dev, loud)
        # No tick missed, none bunched; the slack grows with what the machine does anyway (quiet).
        assert max(loud) < max(1.6, max(quiet) + 0.3) and min(loud) > 0.4, (dev, loud, quiet)
    print(f"poll overruns: {overruns[1] - overruns[0]} quiet, {overruns[2] - overruns[1]} hammered")
    assert overruns[2] - overruns[1] <= overruns[1] - overruns[0]
    assert agent.running
