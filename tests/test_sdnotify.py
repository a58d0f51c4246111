"""sd_notify protocol and progress watchdog, against real AF_UNIX datagram sockets."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from agent.service.sdnotify import ProgressWatchdog, SdNotifier

LOGGER = "agent.service.sdnotify"


def _drain(sock: socket.socket, duration_s: float) -> list[str]:
    """Collect every datagram that arrives within ``duration_s``."""
    messages: list[str] = []
    deadline = time.monotonic() + duration_s
    while (remaining := deadline - time.monotonic()) > 0:
        sock.settimeout(remaining)
        try:
            messages.append(sock.recv(4096).decode("utf-8"))
        except TimeoutError:
            break
    return messages


def _recv_one(sock: socket.socket, timeout_s: float = 2.0) -> str:
    sock.settimeout(timeout_s)
    return sock.recv(4096).decode("utf-8")


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A filesystem notify socket standing in for PID 1, exported as NOTIFY_SOCKET."""
    # pytest's tmp_path can exceed the 108-byte sun_path limit; a short dir cannot.
    directory = tempfile.mkdtemp(prefix="sdn-")
    path = os.path.join(directory, "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    try:
        yield sock
    finally:
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def watchdog_env(monkeypatch: pytest.MonkeyPatch, notify_socket: socket.socket) -> socket.socket:
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    return notify_socket


def test_ready_status_stopping_reach_the_socket(notify_socket: socket.socket) -> None:
    notifier = SdNotifier.from_env()
    assert notifier.enabled

    assert notifier.ready()
    assert _recv_one(notify_socket) == "READY=1"
    assert notifier.status("polling 3 devices")
    assert _recv_one(notify_socket) == "STATUS=polling 3 devices"
    assert notifier.stopping()
    assert _recv_one(notify_socket) == "STOPPING=1"


def test_abstract_socket_name(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"pvgate-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        notifier = SdNotifier.from_env()

        assert notifier.ready()
        assert _recv_one(sock) == "READY=1"


def test_reloading_carries_monotonic_timestamp(notify_socket: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert SdNotifier.from_env().reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

    lines = _recv_one(notify_socket).split("\n")
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_status_is_kept_on_one_line(notify_socket: socket.socket) -> None:
    # A newline would smuggle in another KEY=value assignment (e.g. READY=1).
    SdNotifier.from_env().status("bad\nREADY=1")
    assert _recv_one(notify_socket) == "STATUS=bad READY=1"


def test_without_notify_socket_everything_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    notifier = SdNotifier.from_env()

    assert not notifier.enabled
    assert notifier.notify("READY=1") is False
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    assert notifier.watchdog_interval_s() is None


def test_unreachable_socket_returns_false_without_raising(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", f"/nonexistent-{uuid.uuid4().hex}/notify")
    notifier = SdNotifier.from_env()

    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        assert notifier.enabled
        assert notifier.ready() is False
    assert any("READY=1" in r.getMessage() for r in caplog.records)


def test_watchdog_interval_is_half_the_timeout(watchdog_env: socket.socket) -> None:
    notifier = SdNotifier.from_env()
    assert notifier.watchdog_enabled
    assert notifier.watchdog_interval_s() == pytest.approx(30.0)
    assert notifier.watchdog()
    assert _recv_one(watchdog_env) == "WATCHDOG=1"


@pytest.mark.parametrize(
    ("usec", "pid"), [("abc", None), ("0", None), ("-5", None), ("60000000", "not-a-pid")]
)
def test_malformed_watchdog_env_disables_watchdog(
    monkeypatch: pytest.MonkeyPatch, notify_socket: socket.socket, usec: str, pid: str | None
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", pid)
    notifier = SdNotifier.from_env()
    assert notifier.enabled
    assert notifier.watchdog_interval_s() is None


def test_watchdog_pid_of_another_process_disables_watchdog(
    monkeypatch: pytest.MonkeyPatch, notify_socket: socket.socket
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    notifier = SdNotifier.from_env()

    assert notifier.enabled
    assert not notifier.watchdog_enabled
    assert notifier.watchdog_interval_s() is None
    assert notifier.watchdog() is False
    # Other notifications still go out; only the watchdog belongs to someone else.
    assert notifier.ready()
    assert _drain(notify_socket, 0.2) == ["READY=1"]


def test_progress_watchdog_pings_only_while_all_loops_progress(
    watchdog_env: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    last = {"poll": 100.0, "publish": 100.0}
    wd = ProgressWatchdog(
        SdNotifier.from_env(),
        {"poll": lambda: last["poll"], "publish": lambda: last["publish"]},
        stale_after_s=10.0,
    )

    assert wd.tick(now=105.0)
    assert _recv_one(watchdog_env) == "WATCHDOG=1"

    # Publish keeps going, poll is wedged at t=100.
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for now in (111.0, 115.0, 120.0, 130.0):
            last["publish"] = now
            assert wd.tick(now=now) is False
    assert _drain(watchdog_env, 0.2) == []
    assert wd.stalled == frozenset({"poll"})
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, "a stall is reported once, not on every tick"
    assert "poll" in warnings[0].getMessage()
    assert "publish" not in warnings[0].getMessage()

    # A second loop joining the stall is news: reported once more.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert wd.tick(now=150.0) is False
        assert wd.tick(now=160.0) is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "poll" in warnings[0].getMessage() and "publish" in warnings[0].getMessage()

    # Recovery resumes pings and says so.
    caplog.clear()
    last["poll"] = last["publish"] = 170.0
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert wd.tick(now=171.0)
    assert _recv_one(watchdog_env) == "WATCHDOG=1"
    assert wd.stalled == frozenset()
    assert any("resumed" in r.getMessage() for r in caplog.records)


def test_failing_probe_counts_as_stalled(watchdog_env: socket.socket) -> None:
    def broken() -> float:
        raise RuntimeError("loop state unavailable")

    wd = ProgressWatchdog(
        SdNotifier.from_env(), {"ok": time.monotonic, "broken": broken}, stale_after_s=5.0
    )
    assert wd.tick() is False
    assert wd.stalled == frozenset({"broken"})
    assert _drain(watchdog_env, 0.2) == []


def test_tick_without_systemd_does_not_ping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    wd = ProgressWatchdog(SdNotifier.from_env(), {"poll": time.monotonic}, stale_after_s=5.0)
    assert wd.tick() is False
    assert wd.stalled == frozenset()


def test_run_in_thread_stops_pinging_when_a_loop_wedges(watchdog_env: socket.socket) -> None:
    wedged_at: list[float] = []

    def poll_progress() -> float:
        # A healthy loop reports "just now"; a wedged one is stuck at its last progress.
        return wedged_at[0] if wedged_at else time.monotonic()

    wd = ProgressWatchdog(
        SdNotifier.from_env(),
        {"poll": poll_progress, "publish": time.monotonic},
        stale_after_s=0.2,
    )
    stop = threading.Event()
    thread = wd.run_in_thread(0.05, stop)
    try:
        assert thread.daemon
        healthy = _drain(watchdog_env, 1.0)
        assert healthy.count("WATCHDOG=1") >= 5
        assert set(healthy) == {"WATCHDOG=1"}

        wedged_at.append(time.monotonic())
        # Pings may continue until the loop is stale_after_s old; discard those.
        _drain(watchdog_env, 0.4)
        assert _drain(watchdog_env, 0.6) == []
        assert wd.stalled == frozenset({"poll"})
    finally:
        stop.set()
        thread.join(timeout=2.0)
    assert not thread.is_alive()


def test_invalid_arguments_are_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = SdNotifier.from_env()
    with pytest.raises(ValueError):
        ProgressWatchdog(notifier, {}, stale_after_s=0)
    wd = ProgressWatchdog(notifier, {}, stale_after_s=1.0)
    with pytest.raises(ValueError):
        wd.run_in_thread(0, threading.Event())
