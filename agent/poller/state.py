"""What a link worker keeps per device (DeviceState), its work items (Job), and the hooks it is given:
the clock that stamps a poll and the night policy that tells a sleeping inverter from a dead one."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.poller.learning import Learned, fingerprint
from drivers.model import Block, Device, Event, Reading, Value
from drivers.plan import plan_reads

Sink = Callable[[Reading | Event], None]
IdentitySink = Callable[[str, dict[str, Any]], None]  # device id, nameplate values
Stamp = Callable[[], tuple[int, tuple[str, ...]]]  # the poll's ts (UTC ms) and its clock flags


def wall_stamp() -> tuple[int, tuple[str, ...]]:
    return int(time.time() * 1000), ()


class NightPolicy(Protocol):
    """Tells a sleeping inverter from a dead one (agent/service/timekeeping.py provides it)."""

    def asleep(self, device: Device, last_values: Mapping[str, Value]) -> tuple[bool, str]:
        """Whether a device that stopped answering now is asleep, and why."""
        ...

    def sleep_probe_s(self, device: Device) -> float:
        """Seconds until a sleeping device is asked again (its interval again from dawn)."""
        ...

CLASS_DUE = 0  # a healthy device's poll
CLASS_RETRY = 1  # a retry, or a device whose last poll failed
CLASS_PROBE = 2  # an offline device's probe
BUSY_RETRIES = 3  # exception 6 answers tolerated per poll
BUSY_DELAY_S = 0.2  # first wait after "busy"; grows linearly


@dataclass
class DeviceState:
    device: Device
    blocks: list[Block] = field(default_factory=list)
    learned: Learned = field(default_factory=lambda: Learned(""))  # what the device really serves
    online: bool | None = None  # None until the first poll decides
    asleep: bool = False  # not answering, and the night policy says it sleeps (online is False)
    failures: int = 0
    backoff_s: float = 0.0
    next_probe: float = 0.0
    queued: bool = False
    polls: int = 0
    failed_polls: int = 0
    overruns: int = 0
    busy_answers: int = 0
    bus_s: float = 0.0  # bus time this device's polls took, answered or not
    last_good_ms: int | None = None
    last_values: dict[str, Value] = field(default_factory=dict)
    alarm_bits: dict[str, int] = field(default_factory=dict)
    identity_read: bool = False
    discovered: bool = False  # SunSpec: the model chain was walked and the points placed
    vendor: str | None = None  # SunSpec: the common model's manufacturer (a meter's W sign)
    meter_prefix: str | None = None  # SunSpec: where its meter model's values are (vendor.meter_prefix)

    def __post_init__(self) -> None:
        if not self.learned.fingerprint:
            self.learned = Learned(fingerprint(self.device.profile))

    @property
    def unsupported(self) -> set[str]:
        return self.learned.unsupported

    def replan(self) -> None:
        """The fewest reads the device accepts: the map's holes and the learned ones."""
        dmap = self.device.profile
        points = [p for p in dmap.points if p.key not in self.learned.unsupported]
        holes = (*dmap.holes, *self.learned.holes)
        self.blocks = plan_reads(points, dmap.max_block, dmap.max_gap, holes, self.learned.splits)


@dataclass
class Job:
    """One requested poll of one device, possibly spread over several turns on the bus."""

    state: DeviceState
    seq: int
    requested: float  # monotonic time of the request (the interval tick)
    probe: bool
    attempts_left: int  # for "no answer": 1 + retries for a healthy device, else 1
    ts_ms: int = 0  # when the poll started (first transaction), UTC epoch ms
    flags: tuple[str, ...] = ()  # clock quality of ts_ms (clock:unsynced)
    registers: dict[Block, list[int]] = field(default_factory=dict)
    not_before: float = 0.0
    busy: int = 0
    retried: bool = False
    reading: Reading | None = None


def job_class(job: Job, now: float) -> int:
    if now - job.requested >= job.state.device.interval_s:
        return CLASS_DUE  # nobody waits longer than one interval, whatever its class
    if job.probe:
        return CLASS_PROBE
    if job.retried or job.state.failures > 0:
        return CLASS_RETRY
    return CLASS_DUE


def take_next(jobs: list[Job], now: float) -> Job | None:
    """Remove and return the job to run now (class first, then order of asking), if one is ready."""
    if len(jobs) == 1:
        return jobs.pop() if jobs[0].not_before <= now else None  # the usual case: no choice to make
    ready = [j for j in jobs if j.not_before <= now]
    if not ready:
        return None
    job = min(ready, key=lambda j: (job_class(j, now), j.seq))
    jobs.remove(job)
    return job
