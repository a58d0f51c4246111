"""What `pvgate commission` finds out: checks with a verdict, each device's identity and readings.

The texts in here are already in the report's language: the checks are made after the language
is set, so the report renderer only lays them out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from drivers.model import Device, DeviceMap, Value

PASS, WARN, FAIL = "pass", "warn", "fail"


@dataclass(frozen=True)
class Check:
    name: str  # what was checked, e.g. "Identity (model, serial, rated power)"
    status: str  # PASS, WARN or FAIL
    detail: str  # one line: what was found, and for a failure what to do
    subject: str = ""  # the device id, or "" for the station


@dataclass
class Sample:
    t_s: float  # seconds since the check began
    values: dict[str, Value]


@dataclass
class DeviceResult:
    device: Device
    dmap: DeviceMap | None = None  # the map as read (a SunSpec map after discovery)
    answers: int = 0
    attempts: int = 0
    error: str = ""  # why it did not answer, the last time it did not
    identity: dict[str, Value] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    flags: set[str] = field(default_factory=set)  # quality flags of every sample, e.g. invalid:pv4_voltage
    poll_ms: list[float] = field(default_factory=list)  # how long each full read of the device took
    checks: list[Check] = field(default_factory=list)

    @property
    def answered(self) -> bool:
        return self.answers > 0

    @property
    def meter(self) -> bool:
        name = (self.dmap or self.device.profile).name.lower()
        return "meter" in name

    def unit_of(self, key: str) -> str:
        dmap = self.dmap or self.device.profile
        return next((p.unit for p in (*dmap.points, *dmap.identity) if p.key == key), "")


@dataclass
class Acceptance:
    """The whole check of one station."""

    site_file: str
    site_id: str
    site_name: str
    capacity_kwp: float | None
    timezone: str
    location: tuple[float, float] | None
    started_ms: int
    duration_s: float
    version: str
    language: str
    station_checks: list[Check] = field(default_factory=list)
    devices: list[DeviceResult] = field(default_factory=list)

    def all_checks(self) -> list[Check]:
        return [*self.station_checks, *(c for d in self.devices for c in d.checks)]

    @property
    def passed(self) -> bool:
        return all(c.status != FAIL for c in self.all_checks())

    def count(self, status: str) -> int:
        return sum(c.status == status for c in self.all_checks())
