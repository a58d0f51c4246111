"""LinkWorker scheduling against a scripted fake link (ordering, offline/backoff, busy, splits),
and LinkClient against the simulator on real loopback sockets (late replies, reconnects)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest

from agent.poller import LinkWorker
from agent.poller.state import Job
from drivers.devicemap import ProfileLibrary
from drivers.errors import DeviceError, LinkError
from drivers.link import LinkClient, LinkStats
from drivers.model import (
    DataType,
    Device,
    DeviceMap,
    Event,
    Link,
    LinkType,
    Point,
    Reading,
    Table,
)
from simulator.device import Fault, SimDevice
from simulator.physics import PvPlant, SimClock
from simulator.server import Bus, Listen, serve_tcp
from support.ports import free_port

T = TypeVar("T")
TIMEOUT = 0.02


def run(coro: Awaitable[T], limit: float = 20.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, limit)
    return asyncio.run(bounded())


# --------------------------------------------------------------------------- fake link


@dataclass
class Unit:
    mode: str = "ok"  # ok | silent | busy | linkdown
    busy_left: int = 0
    refuse: set[int] = field(default_factory=set)  # addresses that answer exception 2 when read


class FakeClient:
    """Stands in for LinkClient: answers by unit, logs every transaction, costs TIMEOUT per silence."""

    def __init__(self, link: Link, units: dict[int, Unit]) -> None:
        self.link = link
        self.units = units
        self.stats = LinkStats()
        self.log: list[tuple[float, int, int, int, str]] = []
        self.connected = True
        self.in_flight = 0

    async def read(self, table: Table, address: int, count: int, unit: int, timeout: float) -> list[int]:
        assert self.in_flight == 0, "two transactions in flight on one link"
        self.in_flight += 1
        try:
            u = self.units[unit]
            outcome = "ok"
            if u.mode == "linkdown":
                outcome = "link"
            elif u.mode == "silent":
                outcome = "timeout"
                await asyncio.sleep(timeout)
            elif u.busy_left > 0:
                u.busy_left -= 1
                outcome = "busy"
            elif any(address <= a < address + count for a in u.refuse):
                outcome = "exc2"
            self.log.append((time.monotonic(), unit, address, count, outcome))
            if outcome == "link":
                raise LinkError("link down")
            if outcome == "timeout":
                raise DeviceError(f"no answer from unit {unit}")
            if outcome == "busy":
                raise DeviceError("busy", exception_code=6)
            if outcome == "exc2":
                raise DeviceError("illegal address", exception_code=2)
            await asyncio.sleep(0.001)
            return [unit] * count
        finally:
            self.in_flight -= 1

    def close(self) -> None:
        pass


LINK = Link("bus1", LinkType.RTU_OVER_TCP, host="127.0.0.1", port=1, timeout=TIMEOUT, retries=1, inter_frame_s=0.0)


def profile(*addresses: int, max_gap: int = 16) -> DeviceMap:
    points = tuple(Point(f"p{a}", Table.HOLDING, a, DataType.U16, 1) for a in addresses)
    return DeviceMap("fake", "fake", "test", points, max_block=125, max_gap=max_gap)


TWO_BLOCKS = profile(0, 1, 100, 101)


def device(dev_id: str, unit: int, dmap: DeviceMap = TWO_BLOCKS, **kw: Any) -> Device:
    kw.setdefault("interval_s", 1.0)
    return Device(dev_id, "bus1", unit, dmap, **kw)


class Recorder:
    def __init__(self) -> None:
        self.items: list[Reading | Event] = []

    def __call__(self, item: Reading | Event) -> None:
        self.items.append(item)

    def readings(self, dev: str) -> list[Reading]:
        return [r for r in self.items if isinstance(r, Reading) and r.device == dev]

    def events(self, dev: str) -> list[str]:
        return [e.event for e in self.items if isinstance(e, Event) and e.device == dev]


async def with_worker(devices: list[Device], units: dict[int, Unit],
                      body: Callable[[LinkWorker, FakeClient, Recorder], Awaitable[None]]) -> None:
    fake = FakeClient(LINK, units)
    rec = Recorder()
    worker = LinkWorker(LINK, devices, rec, client=fake)  # type: ignore[arg-type]
    task = asyncio.create_task(worker.run())
    try:
        await body(worker, fake, rec)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def settle(worker: LinkWorker, limit: float = 5.0) -> None:
    deadline = time.monotonic() + limit
    while any(s.queued for s in worker.states.values()):
        assert time.monotonic() < deadline, "worker did not finish its queue"
        await asyncio.sleep(0.002)


async def tick_all(worker: LinkWorker) -> None:
    for dev_id in worker.states:
        worker.request(dev_id)
    await settle(worker)


# --------------------------------------------------------------------------- ordering


def test_a_silent_units_retry_waits_behind_the_live_units() -> None:
    async def body(worker: LinkWorker, fake: FakeClient, rec: Recorder) -> None:
        await tick_all(worker)
        order = [(unit, outcome) for _, unit, _, _, outcome in fake.log]
        assert order == [(1, "ok"), (1, "ok"), (2, "timeout"), (3, "ok"), (3, "ok"), (2, "timeout")]
        assert len(rec.readings("a")) == len(rec.readings("c")) == 1 and not rec.readings("b")
        assert worker.states["b"].failures == 1
        # Second cycle: the failing unit now comes last and gets no retry inside its poll.
        fake.log.clear()
        await tick_all(worker)
        assert [(u, o) for _, u, _, _, o in fake.log] == [(1, "ok"), (1, "ok"), (3, "ok"), (3, "ok"), (2, "timeout")]

    devs = [device("a", 1), device("b", 2, offline_after=5), device("c", 3)]
    run(with_worker(devs, {1: Unit(), 2: Unit("silent"), 3: Unit()}, body))


def test_a_retry_reads_every_block_again_so_values_belong_to_the_timestamp() -> None:
    async def body(worker: LinkWorker, fake: FakeClient, rec: Recorder) -> None:
        fake.units[1].mode = "ok"

        orig = fake.read
        calls = {"n": 0}

        async def second_block_times_out_once(table: Table, address: int, count: int, unit: int,
                                              timeout: float) -> list[int]:
            calls["n"] += 1
            if address == 100 and calls["n"] == 2:
                await asyncio.sleep(timeout)
                fake.log.append((time.monotonic(), unit, address, count, "timeout"))
                raise DeviceError("no answer")
            return await orig(table, address, count, unit, timeout)

        fake.read = second_block_times_out_once  # type: ignore[method-assign]
        t0 = int(time.time() * 1000)
        await tick_all(worker)
        assert [(a, o) for _, _, a, _, o in fake.log] == [(0, "ok"), (100, "timeout"), (0, "ok"), (100, "ok")]
        (reading,) = rec.readings("a")
        assert reading.ts_ms >= t0 and reading.values == {"p0": 1, "p1": 1, "p100": 1, "p101": 1}
        assert worker.states["a"].failures == 0 and worker.states["a"].polls == 1

    run(with_worker([device("a", 1)], {1: Unit()}, body))


def test_nobody_waits_longer_than_its_interval() -> None:
    """A probe behind a stream of live polls is promoted once it waited one interval."""
    async def body(worker: LinkWorker, fake: FakeClient, rec: Recorder) -> None:
        state = worker.states["dead"]
        state.online, state.failures, state.backoff_s = False, 3, 1.0
        job_time = time.monotonic() - 1.0  # asked for a whole interval ago
        worker.request("dead")
        worker._jobs[-1].requested = job_time
        worker.request("live")
        await settle(worker)
        assert fake.log[0][1] == 2, "the overdue probe goes first"

    devs = [device("live", 1), device("dead", 2)]
    run(with_worker(devs, {1: Unit(), 2: Unit("silent")}, body))


# --------------------------------------------------------------------------- offline / online


def test_offline_after_n_failed_polls_probed_with_backoff_then_online() -> None:
    async def body(worker: LinkWorker, fake: FakeClient, rec: Recorder) -> None:
        interval = 0.05
        probes: list[float] = []
        t_end = time.monotonic() + 2.0
        recovered_at: float | None = None
        while time.monotonic() < t_end:
            before = len([x for x in fake.log if x[1] == 2])
            await tick_all(worker)
            if len([x for x in fake.log if x[1] == 2]) > before and worker.states["dead"].online is False:
                probes.append(time.monotonic())
            if recovered_at is None and time.monotonic() > t_end - 0.8:
                fake.units[2].mode = "ok"
                recovered_at = time.monotonic()
            await asyncio.sleep(interval)
        assert rec.events("dead") == ["online", "offline", "online"]
        assert worker.states["dead"].online is True
        # Probes of the offline device: spaced ever wider, never more than backoff_max apart.
        gaps = [b - a for a, b in itertools.pairwise(probes)]
        assert len(gaps) >= 2 and gaps[-1] > gaps[0], gaps
        assert all(g <= 0.4 + 0.15 for g in gaps), gaps
        # The live device was polled at every tick, dead device or not.
        assert len(rec.readings("live")) == worker.states["live"].polls
        assert worker.states["live"].failed_polls == 0

    devs = [device("live", 1, interval_s=0.05), device("dead", 2, interval_s=0.05, offline_after=3,
                                                       backoff_max_s=0.4)]

    async def main() -> None:
        units = {1: Unit(), 2: Unit()}

        async def start(worker: LinkWorker, fake: FakeClient, rec: Recorder) -> None:
            await tick_all(worker)  # online first
            fake.units[2].mode = "silent"
            await body(worker, fake, rec)

        await with_worker(devs, units, start)

    run(main())


def test_probe_backoff_doubles_up_to_the_cap() -> None:
    async def body(worker: LinkWorker, fake: FakeClient, rec: Recorder) -> None:
        state = worker.states["dead"]
        backoffs = []
        for _ in range(8):
            state.next_probe = 0.0  # pretend the backoff elapsed: we look at how it grows
            worker.request("dead")
            await settle(worker)
            backoffs.append(state.backoff_s)
        assert state.online is False and rec.events("dead") == ["offline"]
        # Poll 1 fails, poll 2 makes it offline (backoff = interval), then each probe doubles it.
        assert backoffs == [0.0, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]

    run(with_worker([device("dead", 2, offline_after=2, backoff_max_s=10.0)], {2: Unit("silent")}, body))


def test_a_link_that_is_down_does_not_push_probes_back() -> None:
    async def body(worker: LinkWorker, fake: FakeClient, rec: Recorder) -> None:
        for _ in range(4):
            worker.states["a"].next_probe = min(worker.states["a"].next_probe, time.monotonic())
            worker.request("a")
            await settle(worker)
        state = worker.states["a"]
        assert state.online is False and "offline" in rec.events("a")
        assert state.next_probe <= time.monotonic(), "a down link costs no bus time: probe at the next tick"
        fake.units[1].mode = "ok"
        worker.request("a")
        await settle(worker)
        assert state.online is True and rec.events("a")[-1] == "online"

    run(with_worker([device("a", 1, offline_after=2)], {1: Unit("linkdown")}, body))


# --------------------------------------------------------------------------- busy, exception 2


def test_busy_is_retried_later_while_the_bus_serves_others() -> None:
    async def body(worker: LinkWorker, fake: FakeClient, rec: Recorder) -> None:
        await tick_all(worker)
        order = [(u, o) for _, u, _, _, o in fake.log]
        assert order[:3] == [(1, "busy"), (2, "ok"), (2, "ok")], order
        assert order[3:] == [(1, "busy"), (1, "ok"), (1, "ok")], order
        assert len(rec.readings("huawei")) == 1 and worker.states["huawei"].failures == 0
        assert worker.states["huawei"].busy_answers == 2

    devs = [device("huawei", 1), device("meter", 2)]
    run(with_worker(devs, {1: Unit(busy_left=2), 2: Unit()}, body))


def test_busy_every_time_fails_the_poll_after_three_retries() -> None:
    async def body(worker: LinkWorker, fake: FakeClient, rec: Recorder) -> None:
        await tick_all(worker)
        assert [o for *_, o in fake.log] == ["busy"] * 4
        assert worker.states["huawei"].failures == 1 and not rec.readings("huawei")

    run(with_worker([device("huawei", 1)], {1: Unit(busy_left=100)}, body))


def test_exception_2_splits_the_block_and_the_split_is_remembered() -> None:
    dmap = profile(0, 1, 4, 5, 8, 9, max_gap=4)  # one merged block 0..9
    async def body(worker: LinkWorker, fake: FakeClient, rec: Recorder) -> None:
        await tick_all(worker)
        first = [(a, c, o) for _, _, a, c, o in fake.log]
        # 0+10 refused -> split at 5 -> 0+6 refused -> split at 1 ... until p4 alone is refused.
        assert first[0] == (0, 10, "exc2") and first[-1][2] == "ok"
        (reading,) = rec.readings("a")
        assert set(reading.values) == {"p0", "p1", "p5", "p8", "p9"}
        assert reading.quality == ["unsupported:p4"]
        fake.log.clear()
        await tick_all(worker)
        assert all(o == "ok" for *_, o in fake.log), "the learned split is kept for later polls"
        assert not any(a <= 4 < a + c for _, _, a, c, _ in fake.log)

    run(with_worker([device("a", 1, dmap)], {1: Unit(refuse={4})}, body))


# --------------------------------------------------------------------------- LinkClient over sockets


def sim_bus(units: dict[int, Fault], kind: str = "rtu-over-tcp", baud: int = 9600) -> tuple[Bus, int]:
    port = free_port()
    lib = ProfileLibrary.default()
    clock = SimClock.starting_now(1.0, sim_start=1_780_000_000.0)
    devices = {u: SimDevice(u, lib.get("chint-dtsu666"), PvPlant(seed=u, meter=True), clock, f)
               for u, f in units.items()}
    return Bus(Listen.parse(f"{kind}://127.0.0.1:{port}?baudrate={baud}&turnaround_ms=5"), devices), port


def test_late_reply_is_drained_not_taken_as_the_next_answer() -> None:
    """Unit 1 answers block A 0.15 s late, after our timeout; the next read (block B, same unit,
    same size) must get B's registers. With the quiet gap switched off it gets A's: the hazard."""
    async def scenario(gap: float) -> tuple[list[int], list[int], LinkStats]:
        bus, port = sim_bus({1: Fault("slow", 0.15)})
        server = await serve_tcp(bus)
        link = Link("dtu", LinkType.RTU_OVER_TCP, host="127.0.0.1", port=port, timeout=0.05, retries=0,
                    inter_frame_s=gap)
        client = LinkClient(link)
        try:
            with pytest.raises(DeviceError):
                await client.read(Table.HOLDING, 0x2000, 4, 1, 0.05)  # block A: answered late
            bus.devices[1].fault = Fault()
            got_b = await client.read(Table.HOLDING, 0x2044, 4, 1, 0.5)  # block B, right after
            await asyncio.sleep(0.3)  # let anything still in flight land
            expect_b = await client.read(Table.HOLDING, 0x2044, 4, 1, 0.5)
            return got_b, expect_b, client.stats
        finally:
            client.close()
            server.close()

    # Registers 0x2044.. hold the grid frequency (f32 of Hz x100, ~5000: high word 0x459C),
    # 0x2000.. a line voltage (V x10, ~4000: high word 0x457A); the high word tells the block.
    got, expected, stats = run(scenario(gap=0.2))
    assert got[0] == expected[0] == 0x459C, f"a late reply was taken as the answer to the next read: {got}"
    assert stats.late_frames >= 1 and stats.timeouts == 1
    poisoned, expected, _ = run(scenario(gap=0.0))
    assert poisoned[0] != expected[0], "control: without the quiet gap the late reply poisons the next read"


def test_first_connect_fails_then_reconnects_with_backoff_and_after_a_drop() -> None:
    async def scenario() -> None:
        bus, port = sim_bus({1: Fault()})
        link = Link("dtu", LinkType.RTU_OVER_TCP, host="127.0.0.1", port=port, timeout=0.3, retries=0)
        client = LinkClient(link)
        with pytest.raises(LinkError, match="cannot open"):
            await client.read(Table.HOLDING, 0x2000, 2, 1, 0.3)
        with pytest.raises(LinkError, match="next try"):
            await client.read(Table.HOLDING, 0x2000, 2, 1, 0.3)  # backing off: no new attempt
        server = await serve_tcp(bus)
        await asyncio.sleep(0.7)  # first backoff is 0.5 s +- 20 %
        assert len(await client.read(Table.HOLDING, 0x2000, 2, 1, 0.3)) == 2
        # The peer drops the connection (a DTU rebooting): the next read fails, a later one reconnects.
        server.close()
        bus.drop_clients()
        await asyncio.sleep(0.1)
        server = await serve_tcp(bus)
        deadline = time.monotonic() + 5
        while True:
            try:
                regs = await client.read(Table.HOLDING, 0x2000, 2, 1, 0.3)
                break
            except (LinkError, DeviceError):
                assert time.monotonic() < deadline, "never reconnected"
                await asyncio.sleep(0.1)
        assert len(regs) == 2 and client.stats.reconnects >= 1
        client.close()
        server.close()

    run(scenario())



def test_corrupt_crc_is_no_answer_and_exceptions_carry_their_code() -> None:
    async def scenario() -> None:
        bus, port = sim_bus({1: Fault("corrupt", 1.0), 2: Fault("exception", 4.0), 3: Fault("busy", 1.0, 1.0)})
        server = await serve_tcp(bus)
        link = Link("dtu", LinkType.RTU_OVER_TCP, host="127.0.0.1", port=port, timeout=0.1, retries=0,
                    inter_frame_s=0.02)
        client = LinkClient(link)
        try:
            with pytest.raises(DeviceError) as crc:
                await client.read(Table.HOLDING, 0x2000, 2, 1, 0.1)
            assert crc.value.exception_code is None and client.stats.timeouts == 1
            with pytest.raises(DeviceError) as exc4:
                await client.read(Table.HOLDING, 0x2000, 2, 2, 0.1)
            assert exc4.value.exception_code == 4
            with pytest.raises(DeviceError) as busy:
                await client.read(Table.HOLDING, 0x2000, 2, 3, 0.1)
            assert busy.value.exception_code == 6
            bus.devices[1].fault = Fault()
            assert len(await client.read(Table.HOLDING, 0x2000, 2, 1, 0.1)) == 2  # and the link is fine
        finally:
            client.close()
            server.close()

    run(scenario())


# --------------------------------------------------------------------------- simulator timing, faults


def test_simulator_holds_each_answer_until_the_wire_could_have_carried_it() -> None:
    """9600 baud 8N1: request (8) + 3.5 silence + turnaround + response (5 + 2N) characters."""
    async def scenario() -> tuple[float, float]:
        bus, port = sim_bus({1: Fault(), 2: Fault()}, baud=9600)  # listener turnaround 5 ms
        bus.devices[2].turnaround_s = 0.045  # a slower unit on the same bus
        server = await serve_tcp(bus)
        client = LinkClient(Link("dtu", LinkType.RTU_OVER_TCP, host="127.0.0.1", port=port, timeout=1.0))
        try:
            await client.read(Table.HOLDING, 0x2000, 44, 1, 1.0)  # connect, warm up
            times = []
            for unit in (1, 2):
                best = 1.0
                for _ in range(3):
                    await asyncio.sleep(0.01)  # the bus is idle again (3.5 characters after the answer)
                    t = time.monotonic()
                    await client.read(Table.HOLDING, 0x2000, 44, unit, 1.0)
                    best = min(best, time.monotonic() - t)
                times.append(best)
            return times[0], times[1]
        finally:
            client.close()
            server.close()

    fast, slow = run(scenario())
    wire = (8 + 3.5 + 5 + 88) * 10 / 9600
    assert wire + 0.005 <= fast <= wire + 0.005 + 0.025, fast
    assert wire + 0.045 <= slow <= wire + 0.045 + 0.025, slow


@pytest.mark.parametrize(("text", "kind", "arg", "p"), [
    ("silent", "silent", 1.0, 1.0), ("slow", "slow", 1.0, 1.0), ("slow:0.35", "slow", 0.35, 1.0),
    ("slow:0.35:0.25", "slow", 0.35, 0.25), ("corrupt", "corrupt", 1.0, 1.0), ("corrupt:0.1", "corrupt", 0.1, 0.1),
    ("exception:2", "exception", 2.0, 1.0), ("exception:6:0.5", "exception", 6.0, 0.5),
    ("intermittent", "intermittent", 0.5, 0.5), ("busy:0.3", "busy", 0.3, 0.3), ("none", "none", 1.0, 1.0),
])
def test_fault_syntax(text: str, kind: str, arg: float, p: float) -> None:
    f = Fault.parse(text)
    assert (f.kind, f.p) == (kind, p)
    if kind in ("slow", "exception", "intermittent", "busy"):
        assert f.arg == arg


@pytest.mark.parametrize("text", ["loud", "slow:x", "slow:1:2", "busy:1.5", "corrupt:0.1:0.2"])
def test_fault_syntax_errors(text: str) -> None:
    with pytest.raises(ValueError):
        Fault.parse(text)


def test_a_cancel_that_arrives_with_a_wake_up_stops_the_worker() -> None:
    """A poll request wakes the worker in the same turn as the agent's stop cancels it: on Python
    3.11 a wait_for-based wait swallowed that cancel, and the agent hung in `stopping`."""

    async def main() -> None:
        for _ in range(100):
            dev = device("inv01", 1)
            worker = LinkWorker(LINK, [dev], Recorder(), client=FakeClient(LINK, {}))  # type: ignore[arg-type]
            # a job not due for a while: the worker waits with a timeout, as between a retry's attempts
            worker._jobs.append(Job(worker.states["inv01"], 0, time.monotonic(), False, 1,
                                    not_before=time.monotonic() + 60))
            task = asyncio.create_task(worker.run())
            await asyncio.sleep(0.001)
            worker._wake.set()
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=2.0)
            assert done, "the worker did not stop on cancel"

    asyncio.run(main())


class SwallowsOneCancel(FakeClient):
    """Injected fault: the answer arrives in the same loop turn as the agent's cancel, and the
    library's `wait_for` (pymodbus, on Python 3.11) returns the answer and drops the cancel."""

    swallowed = 0

    async def read(self, table: Table, address: int, count: int, unit: int, timeout: float) -> list[int]:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            if self.swallowed:
                raise
            self.swallowed += 1
        return [0] * count


def test_a_worker_whose_cancel_is_swallowed_mid_read_is_still_stopped() -> None:
    from agent.tasks import cancel_and_wait

    async def main() -> None:
        worker = LinkWorker(LINK, [device("inv01", 1)], Recorder(),
                            client=SwallowsOneCancel(LINK, {}))  # type: ignore[arg-type]
        worker.request("inv01")
        task = asyncio.create_task(worker.run())
        await asyncio.sleep(0.05)  # in the middle of its read
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=0.5)
        assert not done, "the fault is not reproduced: a single cancel stopped the worker"
        assert await cancel_and_wait([task], "link worker", limit_s=5.0)
        assert task.done()

    asyncio.run(main())


def test_cancel_and_wait_gives_up_on_a_task_that_never_ends(caplog: pytest.LogCaptureFixture) -> None:
    from agent.tasks import cancel_and_wait

    give_up = asyncio.Event()

    async def stubborn() -> None:
        while not give_up.is_set():
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                pass  # swallows every cancel until the test lets it go

    async def main() -> None:
        task = asyncio.create_task(stubborn())
        await asyncio.sleep(0)
        started = time.monotonic()
        assert await cancel_and_wait([task], "stubborn", limit_s=1.2) is False
        assert 1.0 <= time.monotonic() - started < 3.0
        assert "1 stubborn task(s) still running" in caplog.text
        give_up.set()
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
        assert task.done()

    asyncio.run(main())
