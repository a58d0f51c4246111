"""The agent under a fake systemd: NOTIFY_SOCKET is a datagram socket this test owns.

READY=1 after start, WATCHDOG=1 every WATCHDOG_USEC/2 while the loops progress, no more pings
once the poll loop is wedged (test hook PVGATE_TEST_WEDGE_POLL_AFTER), STOPPING=1 on SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from support.broker import Broker
from support.chain import SimDev, agent_cmd, buffer_seqs, readings, start_sim, write_site
from support.faults import overwrite_page
from support.ports import free_port
from support.procs import Proc

DEVICES = [SimDev("inv01", 1, "huawei-sun2000")]
WATCHDOG_USEC = 1_000_000


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET: a thread records every datagram with its arrival time."""

    def __init__(self) -> None:
        # A short directory: pytest's tmp_path can exceed the 108-byte sun_path limit.
        self.dir = tempfile.mkdtemp(prefix="pvn-")
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self._lock = threading.Lock()
        self._got: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-systemd", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, OSError):
                continue
            with self._lock:
                self._got.append((time.monotonic(), data.decode()))

    @property
    def got(self) -> list[tuple[float, str]]:
        with self._lock:
            return list(self._got)

    def messages(self) -> list[str]:
        return [m for _, m in self.got]

    def wait_for(self, text: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while True:
            for t, msg in self.got:
                if text in msg.split("\n"):
                    return t
            if time.monotonic() >= deadline:
                raise AssertionError(f"no {text!r} within {timeout}s; got {self.messages()}")
            time.sleep(0.02)

    def pings(self, after: float = 0.0, before: float = float("inf")) -> list[float]:
        return [t for t, m in self.got if m == "WATCHDOG=1" and after <= t < before]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def systemd() -> Iterator[FakeSystemd]:
    fake = FakeSystemd()
    try:
        yield fake
    finally:
        fake.close()


def _env(systemd: FakeSystemd, **extra: str) -> dict[str, str | None]:
    env: dict[str, str | None] = {"NOTIFY_SOCKET": systemd.path, "WATCHDOG_USEC": str(WATCHDOG_USEC),
                                  "WATCHDOG_PID": None, "PVGATE_TEST_WEDGE_POLL_AFTER": None}
    env.update(extra)
    return env


def _site(tmp_path: Path, broker_port: int, site_id: str) -> tuple[Path, int]:
    port = free_port()
    return write_site(tmp_path / "site.yaml", site_id=site_id, broker_port=broker_port, modbus_port=port,
                      devices=DEVICES, interval="500ms", timeout="0.2s"), port


def test_ready_then_watchdog_at_half_the_interval_then_stopping(
        tmp_path: Path, broker: Broker, procs: Callable[..., Proc], systemd: FakeSystemd
) -> None:
    site, port = _site(tmp_path, broker.port, "notify-ok")
    start_sim(procs, port, DEVICES, speed=60)
    started = time.monotonic()
    agent = procs(agent_cmd(site), "agent", env=_env(systemd))
    ready_at = systemd.wait_for("READY=1", timeout=20)
    agent.wait_for_line(r"running: site notify-ok", timeout=5)
    time.sleep(3.2)

    msgs = systemd.messages()
    assert msgs.index("READY=1") < msgs.index("WATCHDOG=1"), "READY=1 comes first"
    assert any(m.startswith("STATUS=") for m in msgs), "systemctl status gets a STATUS= line"
    pings = systemd.pings(after=ready_at)
    assert len(pings) >= 5, f"pings after READY: {len(pings)} in 3.2 s"
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    # WATCHDOG_USEC/2 = 0.5 s: the pace systemd recommends (sd_watchdog_enabled(3)).
    assert 0.4 <= statistics.median(gaps) <= 0.65, gaps
    assert max(gaps) < WATCHDOG_USEC / 1e6, f"a gap as long as the watchdog timeout: {gaps}"
    assert started < ready_at

    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=15) == 0
    time.sleep(0.2)
    assert "STOPPING=1" in systemd.messages()


def test_watchdog_pings_stop_when_the_poll_loop_is_wedged(
        tmp_path: Path, broker: Broker, procs: Callable[..., Proc], systemd: FakeSystemd
) -> None:
    site, port = _site(tmp_path, broker.port, "notify-wedge")
    start_sim(procs, port, DEVICES, speed=60)
    agent = procs(agent_cmd(site), "agent", env=_env(systemd, PVGATE_TEST_WEDGE_POLL_AFTER="2.5"))
    ready_at = systemd.wait_for("READY=1", timeout=20)
    m = agent.wait_for_line(r"systemd watchdog: .*a busy link worker: after ([0-9.]+) s", timeout=5)
    stall_s = float(m.group(1))
    assert stall_s < 5, "the test site's polls are short"
    agent.wait_for_line(r"TEST HOOK PVGATE_TEST_WEDGE_POLL_AFTER: link workers wedged", timeout=10)
    wedged_at = time.monotonic()
    assert len(systemd.pings(after=ready_at, before=wedged_at)) >= 3, "pings while the loops progress"

    # Pings may go on until the busy worker is stale_after old (plus one ping interval and a poll
    # tick), then they must stop for good.
    time.sleep(stall_s + 1.5)
    quiet_from = time.monotonic()
    time.sleep(2.5)
    assert systemd.pings(after=quiet_from) == [], "a wedged poll loop must not feed the watchdog"
    agent.wait_for_line(r"device=_site withholding systemd watchdog ping, stalled: poll", timeout=2)
    assert agent.running, "the agent itself does not exit: systemd's watchdog restarts it"

    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=15) == 0, agent.tail()
    time.sleep(0.2)
    assert "STOPPING=1" in systemd.messages()


def test_a_corrupt_buffer_at_start_is_set_aside_and_the_station_goes_on(
        tmp_path: Path, broker: Broker, procs: Callable[..., Proc], systemd: FakeSystemd,
        collector_factory: Callable[..., Any]
) -> None:
    """A power cut damaged the buffer's first page (a real file, really overwritten): READY within
    10 s, data within 20 s, the file set aside, `buffer_reset` published, seq above the old file's."""
    site, port = _site(tmp_path, broker.port, "corrupt")
    start_sim(procs, port, DEVICES, speed=60)
    first = procs(agent_cmd(site), "agent1")
    first.wait_for_line(r"running: site corrupt", timeout=20)
    time.sleep(2.5)
    assert first.terminate(timeout=15) == 0
    old_last, _ = buffer_seqs(tmp_path / "buffer.sqlite")
    assert old_last > 3
    overwrite_page(tmp_path / "buffer.sqlite", 1)  # the header page: not a database any more

    col = collector_factory(["pvgate/corrupt/#"])
    started = time.monotonic()
    agent = procs(agent_cmd(site), "agent2", env=_env(systemd))
    ready_at = systemd.wait_for("READY=1", timeout=10)
    assert ready_at - started <= 10
    col.wait_for(lambda ms: any("/data/" in m.topic for m in ms), timeout=20 - (time.monotonic() - started),
                 desc="data within 20 s of the start")
    col.wait_for(lambda ms: any(m.topic.endswith("/events/_site") and m.json().get("event") == "buffer_reset"
                                for m in ms), timeout=10, desc="buffer_reset")
    reset = next(m.json() for m in col.messages() if m.topic.endswith("/events/_site")
                 and m.json().get("event") == "buffer_reset")
    assert reset["reason"] == "corrupt", reset
    assert list(tmp_path.glob("buffer.sqlite.corrupt-*")), "the damaged file is kept, set aside"
    data_seqs = [r["seq"] for r in readings([m for m in col.messages() if "/data/" in m.topic])]
    assert min(data_seqs) > old_last, "seq goes on above the old file's (from the side record)"
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=15) == 0
