"""Issue #16: the publisher sleeps without work, the buffer writer commits once per poll cycle.

Real parts: a real mosquitto, a real SQLite buffer, the real Publisher and BufferWriter."""

from __future__ import annotations

import time
from pathlib import Path

from agent.config import load_site
from agent.store.buffer import Buffer
from agent.store.writer import BufferWriter
from agent.uplink.publisher import Publisher
from drivers.model import Reading
from support.chain import SimDev, write_site
from support.ports import free_port


def _wait(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.02)
    assert cond(), what  # type: ignore[operator]


def _reading(device: str, i: int) -> Reading:
    return Reading(device, int(time.time() * 1000), {"ac_power": float(i)}, [])


def test_idle_publisher_does_not_wake(tmp_path: Path, broker) -> None:
    """The 20 ms loop woke 50 times a second; now only work (or a keepalive) wakes it."""
    site = write_site(tmp_path / "site.yaml", site_id="perf-idle", broker_port=broker.port, modbus_port=free_port(),
                      devices=[SimDev("inv01", 1, "huawei-sun2000")], health_interval="60s")
    buf = Buffer(tmp_path / "buffer.sqlite", max_mb=8, min_free_mb=0)
    pub = Publisher(load_site(site).uplink(), buf)
    pub.start()
    try:
        _wait(lambda: pub.connected and pub.window.idle, 10, "connected, nothing to send")
        time.sleep(0.5)  # status and meta acknowledged
        before = pub.pump.wakeups
        time.sleep(5.0)
        woke = pub.pump.wakeups - before
        assert woke <= 5, f"an idle publisher woke {woke} times in 5 s"
        assert pub.last_progress >= time.monotonic() - 0.1, "asleep in select() counts as progress"
        # ...and data wakes it at once: the buffer's commit is the signal, not a timer.
        seqs = buf.append([_reading("inv01", 1)])
        _wait(lambda: not buf.unsent(seqs[0] - 1, limit=1), 2.0, "the new row acknowledged within 2 s")
    finally:
        pub.stop(1.0)
        buf.close()


def test_a_completed_cycle_is_committed_at_once(tmp_path: Path) -> None:
    buf = Buffer(tmp_path / "b.sqlite", max_mb=8, min_free_mb=0)
    w = BufferWriter(buf, commit_interval_s=1.0)
    w.start()
    try:
        time.sleep(0.05)
        t0 = time.monotonic()
        for i in range(20):
            w.put(_reading(f"d{i:02d}", i))
        w.cycle_done()
        _wait(lambda: w.committed == 20, 2.0, "committed")
        assert time.monotonic() - t0 < 0.5, "the cycle's batch waited for the interval"
        assert w.held_in_memory == 0 and w.batch_waiting == 0
        # Without the end of a cycle, the batch waits at most the interval.
        t1 = time.monotonic()
        w.put(_reading("d00", 99))
        time.sleep(0.3)
        assert w.batch_waiting == 1 and w.held_in_memory == 0, "a waiting batch is not 'held'"
        _wait(lambda: w.committed == 21, 3.0, "committed by the interval")
        assert 0.8 <= time.monotonic() - t1 < 2.0
    finally:
        w.stop()
        buf.close()


def test_commits_stay_one_per_interval_however_fast_cycles_end(tmp_path: Path) -> None:
    """SD-card wear: at most one commit (one fsync) per commit_interval, cycles or not."""
    buf = Buffer(tmp_path / "b.sqlite", max_mb=8, min_free_mb=0)
    w = BufferWriter(buf, commit_interval_s=0.5)
    w.start()
    try:
        t0 = time.monotonic()
        for i in range(40):  # 40 cycles of 5 devices, 50 ms apart: 2 s
            for d in range(5):
                w.put(_reading(f"d{d}", i))
            w.cycle_done()
            time.sleep(0.05)
        assert w.flush(5.0)
        elapsed = time.monotonic() - t0
        assert w.committed == 200
        assert w.commits <= elapsed / 0.5 + 2, f"{w.commits} commits in {elapsed:.1f} s"
        assert w.commits >= 3, "cycles were still committed while they kept coming"
    finally:
        w.stop()
        buf.close()


def test_a_sleeping_publisher_keeps_the_connection_alive(tmp_path: Path, broker) -> None:
    """Nothing polls any more: keepalive PINGREQs must still go out on time (the broker drops a
    client silent for 1.5 x keepalive), from the deadline the publisher computes."""
    site = write_site(tmp_path / "site.yaml", site_id="perf-keepalive", broker_port=broker.port,
                      modbus_port=free_port(), devices=[SimDev("inv01", 1, "huawei-sun2000")],
                      extra_mqtt="keepalive: 5")
    buf = Buffer(tmp_path / "buffer.sqlite", max_mb=8, min_free_mb=0)
    pub = Publisher(load_site(site).uplink(), buf)
    pub.start()
    try:
        _wait(lambda: pub.connected and pub.window.idle, 10, "connected")
        before = pub.pump.wakeups
        time.sleep(16.0)  # three keepalives, more than twice the broker's 7.5 s limit
        assert pub.connected and pub.stats.connects == 1, "the broker dropped a silent client"
        assert pub.pump.wakeups - before <= 16, "woke more than keepalive needs"
    finally:
        pub.stop(1.0)
        buf.close()


def test_a_wake_up_whose_byte_was_already_read_is_not_lost() -> None:
    """The state a race leaves: wake() set the flag after _drain() cleared it and its byte was read
    by that same drain. The pump must not sleep on the byte; the old one slept until the next
    deadline (live data waited for the keepalive, 15 s), and lost every later wake-up too."""
    from agent.uplink.pump import Pump

    pump = Pump()
    try:
        pump._woken.set()  # injected: the flag set, no byte in the pair
        t0 = time.monotonic()
        pump.run(None, 5.0)
        assert time.monotonic() - t0 < 1.0, "a pending wake-up was slept through"
        assert not pump._woken.is_set()
        t0 = time.monotonic()
        pump.wake()  # and the next wake-up is seen as well
        pump.run(None, 5.0)
        assert time.monotonic() - t0 < 1.0
    finally:
        pump.close()


def test_wake_ups_from_another_thread_are_never_lost() -> None:
    """A writer thread wakes the publisher after each commit, at any moment of its turn."""
    import threading

    from agent.uplink.pump import Pump

    pump = Pump()
    stop = threading.Event()
    served: list[int] = []
    asked = [0]

    def publisher() -> None:
        while not stop.is_set():
            pump.run(None, 5.0)
            served.append(asked[0])  # the turn after the wait sees the work done before the wake-up

    thread = threading.Thread(target=publisher)
    thread.start()
    try:
        for i in range(1, 3001):
            asked[0] = i  # the work, done before the wake-up (like a commit)
            pump.wake()
            if i % 500 == 0:
                time.sleep(0.01)
        deadline = time.monotonic() + 2.0  # generous: a lost wake-up would sleep the full 5 s
        while time.monotonic() < deadline and (not served or served[-1] < 3000):
            time.sleep(0.01)
        assert served and served[-1] == 3000, "the last wake-up was not served"
    finally:
        stop.set()
        pump.wake()
        thread.join(10)
        pump.close()
