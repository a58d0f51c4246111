"""Link workers: one asyncio task per physical link polls its devices one transaction at a time.

Dead devices must not starve live ones (ARCHITECTURE.md, non-negotiable 2). On a 9600-baud bus
one timeout costs as much as two or three complete polls, so the worker orders its work:

1. due polls of healthy devices, in the order they were asked for;
2. retries, and polls of devices whose last poll failed (a failed attempt is not retried on the
   spot: the retry goes behind the healthy devices of the same cycle);
3. probes of offline devices.

Nothing waits longer than its device's interval before it is served, whatever its class, so an
overloaded bus delays everyone a little instead of starving someone for good.

A device is reported offline after `offline_after` failed polls and from then on only probed,
one attempt without retries, with a backoff that doubles from its interval up to `backoff_max`.
When it answers again it is reported online and polled normally. An inverter that falls silent at
night is asleep, not offline (the runtime's night policy decides): `sleep` and `wake` events
instead, probed rarely until dawn, and reported offline after all if it stays silent in daylight. A link that is down (port
gone, DTU unreachable) costs no bus time, so it does not push the devices' probes back: they are
tried again at their next interval, and answer as soon as the link is back.

Modbus exception 6 (busy) is retried later, up to three times, without holding the bus; exception
2 (illegal address) on a merged block starts a bisection that learns which registers the device
serves (agent/poller/learning.py); the plan then merges over what it learned, and a single point
that is refused is no longer read.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from agent.logutil import RateLimitedLog
from agent.poller.state import (
    BUSY_DELAY_S,
    BUSY_RETRIES,
    DeviceState,
    IdentitySink,
    Job,
    NightPolicy,
    Sink,
    Stamp,
    take_next,
    wall_stamp,
)
from agent.poller.teach import LearnedSink, learn_from_refusal
from agent.poller.vendor import meter_prefix, read_manufacturer, vendor_values
from drivers.decode import active_bits, decode_points
from drivers.errors import DeviceError, LinkError
from drivers.link import EXC_BUSY, EXC_ILLEGAL_ADDRESS, LinkClient
from drivers.model import Block, Device, Event, Link, Point, Reading, Table, Value
from drivers.plan import block_values, plan_reads
from drivers.publishable import published_values
from drivers.sunspec import DiscoveryError, device_map, discover, without_scale_factors

log = logging.getLogger(__name__)


class LinkWorker:
    """Polls the devices of one link, one transaction at a time, live devices first."""

    def __init__(self, link: Link, devices: list[Device], sink: Sink,
                 identity_sink: IdentitySink | None = None, client: LinkClient | None = None,
                 stamp: Stamp = wall_stamp, night: NightPolicy | None = None,
                 learned_sink: LearnedSink | None = None, on_idle: Callable[[], None] | None = None) -> None:
        self.link = link
        self.on_idle = on_idle  # the link has nothing left to poll: the buffer may commit the cycle
        self.learned_sink = learned_sink
        self.stamp = stamp
        self.night = night
        self.client = client or LinkClient(link)
        self.sink = sink
        self.identity_sink = identity_sink
        self.states = {d.id: DeviceState(d) for d in devices}
        for state in self.states.values():
            state.replan()
        self._jobs: list[Job] = []
        self._wake = asyncio.Event()
        self._seq = itertools.count()
        self._rl = RateLimitedLog(log)
        self.last_progress = time.monotonic()
        self.busy_s = 0.0
        self.probe_s = 0.0  # bus time spent on offline devices
        self._busy = False  # a job is being attempted (it is in no queue meanwhile)

    # -- scheduling --------------------------------------------------------------------------

    def request(self, device_id: str) -> bool:
        """Ask for a poll (called at each interval tick). False when skipped."""
        state = self.states[device_id]
        now = time.monotonic()
        if state.online is False and now < state.next_probe:
            return False  # offline and backing off: not an overrun
        if state.queued:
            state.overruns += 1
            self._rl.warning(f"overrun:{device_id}", "device=%s poll overrun: previous poll still pending on link %s",
                             device_id, self.link.id)
            return False
        state.queued = True
        probe = state.online is False
        attempts = 1 if probe or state.failures > 0 else 1 + self._retries(state.device)
        self._jobs.append(Job(state, next(self._seq), now, probe, attempts))
        self._wake.set()
        return True

    def pending(self) -> int:
        return len(self._jobs)

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing on the wire."""
        return not self._jobs and not self._busy

    async def _next_job(self) -> Job:
        while True:
            job = take_next(self._jobs, time.monotonic())
            if job is not None:
                return job
            now = time.monotonic()
            self._wake.clear()
            later = min((j.not_before for j in self._jobs), default=None)
            if later is None:
                await self._wake.wait()
                continue
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that arrives with
                # the wake-up, and a worker that misses its cancel holds up the agent's stop forever.
                async with asyncio.timeout(max(0.0, later - now)):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def run(self) -> None:
        try:
            while True:
                job = await self._next_job()
                started = time.monotonic()
                self._busy = True
                try:
                    done = await self._attempt(job, inline=False)
                except Exception:  # a bug must not kill the link's worker: log it and go on
                    log.exception("device=%s poll failed unexpectedly", job.state.device.id)
                    done = True
                finally:
                    self._busy = False
                spent = time.monotonic() - started
                self.busy_s += spent
                job.state.bus_s += spent
                if job.probe:
                    self.probe_s += spent
                self.last_progress = time.monotonic()
                if done:
                    job.state.queued = False
                else:
                    self._jobs.append(job)
                if not self._jobs and self.on_idle is not None:
                    self.on_idle()
        finally:
            self.client.close()

    async def poll(self, state: DeviceState) -> Reading | None:
        """Poll one device now, retries included (commissioning, tests); not for use beside run()."""
        job = Job(state, next(self._seq), time.monotonic(), state.online is False,
                  1 + self._retries(state.device))
        await self._attempt(job, inline=True)
        return job.reading

    # -- one device --------------------------------------------------------------------------

    def _retries(self, device: Device) -> int:
        return device.retries if device.retries is not None else self.link.retries

    def _timeout(self, device: Device) -> float:
        return device.timeout if device.timeout is not None else self.link.timeout

    async def _attempt(self, job: Job, *, inline: bool) -> bool:
        """Read the job's remaining blocks. True when the poll is finished (good or failed),
        False when it must wait for its turn again (a retry, or a device that said busy)."""
        state = job.state
        device = state.device
        if not job.ts_ms:
            state.polls += 1
        elif not inline:
            # Resumed after waiting its turn: read everything again, so that the reading's
            # values belong to its timestamp (a retry is rare; stale values are not).
            job.registers.clear()
        job.ts_ms, job.flags = self.stamp()
        timeout = self._timeout(device)
        if device.profile.sunspec and not state.discovered:
            if not await self._discover(job, timeout):
                return True
            device = state.device
        while pending := [b for b in state.blocks if b not in job.registers]:
            block = pending[0]
            try:
                job.registers[block] = await self.client.read(block.table, block.start, block.count,
                                                              device.unit, timeout)
            except DeviceError as err:
                code = err.exception_code
                if code == EXC_ILLEGAL_ADDRESS:
                    await self._learn(state, block, timeout)
                    continue
                if code == EXC_BUSY:
                    job.busy += 1
                    state.busy_answers += 1
                    if job.busy > BUSY_RETRIES:
                        self._failed(job, f"{err} (busy, {BUSY_RETRIES} retries)")
                        return True
                    delay = BUSY_DELAY_S * job.busy
                    if inline:
                        await asyncio.sleep(delay)
                        continue
                    job.not_before = time.monotonic() + delay  # the bus serves others meanwhile
                    return False
                if code is None:  # no answer, or a garbled one
                    job.attempts_left -= 1
                    if job.attempts_left > 0:
                        job.retried = True
                        if inline:
                            continue
                        return False
                self._failed(job, str(err))
                return True
            except LinkError as err:
                self._failed(job, str(err), link=True)
                return True
        if not state.blocks:
            self._failed(job, "every point refused with illegal address")
            return True
        job.reading = self._reading(state, job)
        await self._succeeded(state, job.reading)
        return True

    @staticmethod
    def _reading(state: DeviceState, job: Job) -> Reading:
        """The poll's registers decoded into what the center receives."""
        device = state.device
        registers = {i: job.registers[b] for i, b in enumerate(state.blocks)}
        values, quality = published_values(device, state.blocks, registers)
        values = vendor_values(values, state.vendor, state.meter_prefix)  # SunSpec meters only
        quality += [*(f"unsupported:{k}" for k in sorted(state.unsupported)), *job.flags]
        return Reading(device.id, job.ts_ms, values, quality)

    async def _discover(self, job: Job, timeout: float) -> bool:
        """A SunSpec device's points come from its model chain, walked on first contact."""
        state = job.state
        device = state.device

        async def holding(address: int, count: int) -> list[int]:
            return await self.client.read(Table.HOLDING, address, count, device.unit, timeout)

        try:
            found = await discover(holding)
        except (DeviceError, DiscoveryError) as err:
            self._failed(job, f"SunSpec discovery: {err}")
            return False
        except LinkError as err:
            self._failed(job, str(err), link=True)
            return False
        dmap = device_map(found, name=device.profile.name, map_id=device.profile.id)
        state.device = replace(device, profile=dmap)
        state.discovered = True
        state.meter_prefix = meter_prefix(found.ids)
        if state.meter_prefix is not None:
            state.vendor = await read_manufacturer(lambda tb, a, n: self.client.read(tb, a, n, device.unit, timeout),
                                                   dmap)
        state.replan()
        log.info("device=%s SunSpec at %d: models %s, %d points", device.id, found.base,
                 ", ".join(str(i) for i in found.ids), len(dmap.points))
        return True

    async def _learn(self, state: DeviceState, block: Block, timeout: float) -> None:
        """Exception 2: find the registers the device serves, replan, teach its siblings."""
        device = state.device

        async def read(table: Table, start: int, count: int) -> list[int]:
            return await self.client.read(table, start, count, device.unit, timeout)

        await learn_from_refusal(read, state, block, self.states.values(), self.learned_sink)

    async def _succeeded(self, state: DeviceState, reading: Reading) -> None:
        device = state.device
        if state.online is not True:
            kind = "wake" if state.asleep else "online"
            if state.online is False:
                log.info("device=%s answers again: %s", device.id, "awake" if state.asleep else "online")
            self.sink(Event(device.id, reading.ts_ms, kind, {"unit": device.unit, "link": self.link.id}))
            self._rl.reset(f"fail:{device.id}")
        state.online = True
        state.asleep = False
        state.failures = 0
        state.backoff_s = 0.0
        state.last_good_ms = reading.ts_ms
        state.last_values = reading.values
        self.sink(reading)
        self._alarm_events(state, reading)
        if not state.identity_read:
            await self._read_identity(state)

    def _failed(self, job: Job, reason: str, *, link: bool = False) -> None:
        state = job.state
        device = state.device
        state.failures += 1
        state.failed_polls += 1
        if not state.asleep:
            self._rl.warning(f"fail:{device.id}", "device=%s poll failed (%d in a row): %s",
                             device.id, state.failures, reason)
        if state.online is not False and state.failures >= device.offline_after:
            self._silent(state, f"no answer after {state.failures} polls: {reason}", link)
        elif state.asleep and not link:
            self._still_asleep(state, reason)
        elif state.online is False and not link:
            state.backoff_s = min(max(state.backoff_s * 2, device.interval_s), device.backoff_max_s)
        if state.online is False:
            # Counted from the tick that asked for this poll, so the probe lands on a tick.
            backoff = 0.0 if link else state.backoff_s
            state.next_probe = job.requested + 0.95 * backoff

    def _silent(self, state: DeviceState, reason: str, link: bool) -> None:
        """The device stopped answering: asleep (an inverter at night) or offline."""
        device = state.device
        asleep, why = (False, "") if link or self.night is None else self.night.asleep(device, state.last_values)
        state.online = False
        state.asleep = asleep
        details: dict[str, Value] = {"reason": f"{reason} ({why})" if why else reason,
                                     "unit": device.unit, "link": self.link.id}
        self.sink(Event(device.id, int(time.time() * 1000), "sleep" if asleep else "offline", details))
        if asleep and self.night is not None:
            state.backoff_s = self.night.sleep_probe_s(device)
            log.info("device=%s asleep after %d silent polls (%s); probed every %.0f s until dawn",
                     device.id, state.failures, why, state.backoff_s)
        else:
            state.backoff_s = device.interval_s
            log.warning("device=%s offline after %d failed polls; probing it with backoff up to %gs",
                        device.id, state.failures, device.backoff_max_s)

    def _still_asleep(self, state: DeviceState, reason: str) -> None:
        """A sleeping device that is still silent: asleep until the day says otherwise."""
        assert self.night is not None
        device = state.device
        asleep, why = self.night.asleep(device, state.last_values)
        if asleep:
            state.backoff_s = self.night.sleep_probe_s(device)
            return
        state.asleep = False  # daylight and still silent: a real fault
        state.backoff_s = device.interval_s
        self.sink(Event(device.id, int(time.time() * 1000), "offline",
                        {"reason": f"still silent after night: {reason} ({why})", "unit": device.unit,
                         "link": self.link.id}))
        log.warning("device=%s did not wake: offline (%s)", device.id, why)

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
                                              self._timeout(state.device))
            except (DeviceError, LinkError) as err:
                log.info("device=%s identity registers not readable: %s", state.device.id, err)
                continue
            raw.update(block_values(block, regs))
        values: dict[str, Any] = dict(decode_points([replace(p, publish=True) for p in without_scale_factors(points)],
                                                    raw)[0])
        if state.discovered:
            # The center learns a discovered device's points from its meta message.
            values["_points"] = [{"key": p.key, "unit": p.unit, "type": p.type.name_}
                                 for p in state.device.profile.points if p.publish]
        self.identity_sink(state.device.id, values)
