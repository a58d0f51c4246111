"""Link workers: one asyncio task per physical link polls its devices one transaction at a time.

A device that stops answering is reported offline after `offline_after` failed polls and from
then on only probed, with a backoff that doubles up to `backoff_max`, so that its timeouts
cannot eat the poll interval of the live devices on the same bus.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from agent.logutil import RateLimitedLog
from drivers.decode import active_bits, decode_blocks, decode_points
from drivers.errors import DeviceError, LinkError
from drivers.link import EXC_BUSY, EXC_ILLEGAL_ADDRESS, LinkClient
from drivers.model import Block, Device, Event, Link, Point, Reading, Table, Value
from drivers.plan import block_values, plan_reads

log = logging.getLogger(__name__)
Sink = Callable[[Reading | Event], None]
IdentitySink = Callable[[str, dict[str, Value]], None]


@dataclass
class DeviceState:
    device: Device
    blocks: list[Block] = field(default_factory=list)
    splits: set[tuple[Table, int]] = field(default_factory=set)
    unsupported: set[str] = field(default_factory=set)
    online: bool | None = None  # None until the first poll decides
    failures: int = 0
    backoff_s: float = 0.0
    next_probe: float = 0.0
    queued: bool = False
    polls: int = 0
    failed_polls: int = 0
    overruns: int = 0
    last_good_ms: int | None = None
    last_values: dict[str, Value] = field(default_factory=dict)
    alarm_bits: dict[str, int] = field(default_factory=dict)
    identity_read: bool = False

    def replan(self) -> None:
        dmap = self.device.profile
        points = [p for p in dmap.points if p.key not in self.unsupported]
        self.blocks = plan_reads(points, dmap.max_block, dmap.max_gap, dmap.holes, self.splits)


class LinkWorker:
    """Polls the devices of one link, strictly one after the other."""

    def __init__(self, link: Link, devices: list[Device], sink: Sink,
                 identity_sink: IdentitySink | None = None, client: LinkClient | None = None) -> None:
        self.link = link
        self.client = client or LinkClient(link)
        self.sink = sink
        self.identity_sink = identity_sink
        self.states = {d.id: DeviceState(d) for d in devices}
        for state in self.states.values():
            state.replan()
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._rl = RateLimitedLog(log)
        self.last_progress = time.monotonic()
        self.busy_s = 0.0

    def request(self, device_id: str) -> bool:
        """Ask for a poll (called at each interval tick). False when skipped."""
        state = self.states[device_id]
        if state.online is False and time.monotonic() < state.next_probe:
            return False  # offline and backing off: not an overrun
        if state.queued:
            state.overruns += 1
            self._rl.warning(f"overrun:{device_id}", "device=%s poll overrun: previous poll still pending on link %s",
                             device_id, self.link.id)
            return False
        state.queued = True
        self._queue.put_nowait(device_id)
        return True

    async def run(self) -> None:
        try:
            while True:
                device_id = await self._queue.get()
                state = self.states[device_id]
                started = time.monotonic()
                try:
                    await self.poll(state)
                except Exception:  # a bug must not kill the link's worker: log it and go on
                    log.exception("device=%s poll failed unexpectedly", device_id)
                finally:
                    state.queued = False
                    self.busy_s += time.monotonic() - started
                    self.last_progress = time.monotonic()
        finally:
            self.client.close()

    async def poll(self, state: DeviceState) -> Reading | None:
        device = state.device
        ts_ms = int(time.time() * 1000)
        state.polls += 1
        timeout = device.timeout if device.timeout is not None else self.link.timeout
        retries = 0 if state.online is False else (device.retries if device.retries is not None else self.link.retries)
        registers: dict[int, list[int]] = {}
        failure: str | None = None
        for i, block in enumerate(list(state.blocks)):
            try:
                registers[i] = await self._read_block(device, block, timeout, retries)
            except DeviceError as err:
                if err.exception_code == EXC_ILLEGAL_ADDRESS:
                    self._learn_split(state, block)
                    continue
                failure = str(err)
                break  # a device that does not answer one block will not answer the next
            except LinkError as err:
                failure = str(err)
                break
        if failure is not None or not registers:
            self._failed(state, failure or "every block refused")
            return None
        values, quality = decode_blocks(state.blocks, registers)
        quality += [f"unsupported:{k}" for k in sorted(state.unsupported)]
        reading = Reading(device.id, ts_ms, values, quality)
        await self._succeeded(state, reading)
        return reading

    async def _read_block(self, device: Device, block: Block, timeout: float, retries: int) -> list[int]:
        attempt = 0
        while True:
            try:
                return await self.client.read(block.table, block.start, block.count, device.unit, timeout)
            except DeviceError as err:
                busy = err.exception_code == EXC_BUSY
                if attempt >= retries + (2 if busy else 0) or err.exception_code not in (None, EXC_BUSY):
                    raise
                attempt += 1
                if busy:  # Huawei answers "busy" while it talks to its cloud: come back shortly
                    await asyncio.sleep(0.2 * attempt)

    def _learn_split(self, state: DeviceState, block: Block) -> None:
        """Exception 2 on a merged block: split it for good; a single point is unsupported."""
        device_id = state.device.id
        if len(block.points) == 1:
            state.unsupported.add(block.points[0].key)
            log.warning("device=%s point %s (%s %d) refused with illegal address: no longer read",
                        device_id, block.points[0].key, block.table.name.lower(), block.start)
        else:
            mid = block.points[len(block.points) // 2]
            state.splits.add((block.table, mid.address))
            log.info("device=%s block %s %d+%d refused with illegal address: split at %d",
                     device_id, block.table.name.lower(), block.start, block.count, mid.address)
        state.replan()

    async def _succeeded(self, state: DeviceState, reading: Reading) -> None:
        device = state.device
        if state.online is not True:
            if state.online is False:
                log.info("device=%s answers again: online", device.id)
            self.sink(Event(device.id, reading.ts_ms, "online", {"unit": device.unit, "link": self.link.id}))
            self._rl.reset(f"fail:{device.id}")
        state.online = True
        state.failures = 0
        state.backoff_s = 0.0
        state.last_good_ms = reading.ts_ms
        state.last_values = reading.values
        self.sink(reading)
        self._alarm_events(state, reading)
        if not state.identity_read:
            await self._read_identity(state)

    def _failed(self, state: DeviceState, reason: str) -> None:
        device = state.device
        state.failures += 1
        state.failed_polls += 1
        self._rl.warning(f"fail:{device.id}", "device=%s poll failed (%d in a row): %s",
                         device.id, state.failures, reason)
        now = time.monotonic()
        if state.online is not False and state.failures >= device.offline_after:
            state.online = False
            state.backoff_s = device.interval_s
            self.sink(Event(device.id, int(time.time() * 1000), "offline",
                            {"reason": f"no answer after {state.failures} polls: {reason}",
                             "unit": device.unit, "link": self.link.id}))
            log.warning("device=%s offline after %d failed polls", device.id, state.failures)
        elif state.online is False:
            state.backoff_s = min(max(state.backoff_s * 2, device.interval_s), device.backoff_max_s)
        if state.online is False:
            state.next_probe = now + state.backoff_s

    def _alarm_events(self, state: DeviceState, reading: Reading) -> None:
        for point in state.device.profile.points:
            if not point.bits or not point.key.startswith("alarm"):
                continue
            value = reading.values.get(point.key)
            if not isinstance(value, int):
                continue
            before = state.alarm_bits.get(point.key, 0)
            state.alarm_bits[point.key] = value
            raised, cleared = value & ~before, before & ~value
            if raised:
                self.sink(Event(state.device.id, reading.ts_ms, "alarm",
                                {"point": point.key, "alarms": ",".join(active_bits(point, raised)), "raw": value}))
            if cleared:
                self.sink(Event(state.device.id, reading.ts_ms, "alarm_cleared",
                                {"point": point.key, "alarms": ",".join(active_bits(point, cleared)), "raw": value}))

    async def _read_identity(self, state: DeviceState) -> None:
        """Nameplate registers, read once per run for the retained meta message."""
        state.identity_read = True
        points: list[Point] = list(state.device.profile.identity)
        if not points or self.identity_sink is None:
            if self.identity_sink is not None:
                self.identity_sink(state.device.id, {})
            return
        raw: dict[str, list[int]] = {}
        for block in plan_reads(points, state.device.profile.max_block, 0):
            try:
                regs = await self.client.read(block.table, block.start, block.count, state.device.unit,
                                              state.device.timeout or self.link.timeout)
            except (DeviceError, LinkError) as err:
                log.info("device=%s identity registers not readable: %s", state.device.id, err)
                continue
            raw.update(block_values(block, regs))
        values, _ = decode_points([replace(p, publish=True) for p in points], raw)
        self.identity_sink(state.device.id, values)
