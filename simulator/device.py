"""A simulated Modbus device: a device map encoded from the physics, plus faults on demand."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from drivers.codec import encode_invalid, encode_point
from drivers.errors import DecodeError
from drivers.model import DataType, DeviceMap, Point, Table, Value
from simulator.frames import FRAME_KINDS
from simulator.physics import PvPlant, SimClock

FAULT_KINDS = ("none", "silent", "slow", "corrupt", "exception", "intermittent", "busy", *FRAME_KINDS)
# What an inverter does between its own dusk and dawn (the sun model's zero-irradiance times):
# "silent" like most string inverters, whose Modbus interface is powered by the panels, or
# "standby" (answers, zero power, its standby status) like inverters with an auxiliary supply.
# Meters are powered by the grid and always answer.
NIGHT_MODES = ("silent", "standby")
EXC_ILLEGAL_FUNCTION = 1
EXC_ILLEGAL_ADDRESS = 2
EXC_BUSY = 6


@dataclass
class Fault:
    """How a unit misbehaves: kind, its argument, and how often it strikes.

    silent                    never answers
    slow:SECONDS[:P]          answers SECONDS late (with probability P, default always)
    corrupt[:P]               answers with a broken CRC (with probability P, default always)
    exception:CODE[:P]        answers with Modbus exception CODE (default 4)
    intermittent[:P]          does not answer with probability P (default 0.5)
    busy[:P]                  answers exception 6 (busy) with probability P (default 0.5)
    KIND[:P]                  a broken frame instead of the reply, KIND one of FRAME_KINDS
                              (simulator/frames.py); babble[:P]: P is the chance, every 0.05-0.4 s
                              of idle line, that the unit sends a reply nobody asked for (default 0.5)
    """

    kind: str = "none"
    arg: float = 0.0
    p: float = 1.0  # probability that the fault strikes on a given request

    @classmethod
    def parse(cls, text: str) -> Fault:
        kind, *args = text.split(":")
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {', '.join(FAULT_KINDS)}")
        try:
            nums = [float(a) for a in args if a != ""]
        except ValueError:
            raise ValueError(f"fault {text!r}: arguments must be numbers, e.g. slow:0.8 or busy:0.3") from None
        if kind in ("slow", "exception"):
            if len(nums) > 2:
                raise ValueError(f"fault {text!r}: expected {kind}:ARG[:P]")
            arg = nums[0] if nums else (1.0 if kind == "slow" else 4.0)
            p = nums[1] if len(nums) > 1 else 1.0
        else:
            if len(nums) > 1:
                raise ValueError(f"fault {text!r}: expected {kind}[:P]")
            p = nums[0] if nums else {"intermittent": 0.5, "busy": 0.5, "babble": 0.5}.get(kind, 1.0)
            arg = p
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"fault {text!r}: probability must be 0..1")
        return cls(kind, arg, p)

    def strikes(self, rng: random.Random) -> bool:
        """Whether the fault applies to this request (draws a number only when it may not)."""
        if self.kind == "none":
            return False
        return self.p >= 1.0 or rng.random() < self.p


@dataclass
class SimDevice:
    unit: int
    profile: DeviceMap
    plant: PvPlant
    clock: SimClock
    fault: Fault = field(default_factory=Fault)
    served: int = 0  # requests answered with data
    requests: int = 0  # requests addressed to this unit, answered or not
    turnaround_s: float | None = None  # None: the listener's
    overrides: dict[str, Value] = field(default_factory=dict)
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    night: str = "silent"  # one of NIGHT_MODES

    def asleep(self, real_t: float | None = None) -> bool:
        """Whether the unit is switched off for the night at real time real_t (it then never answers)."""
        if self.night != "silent" or self.plant.meter:
            return False
        return self.plant.sun.fraction(self.clock.sim(real_t)) <= 0.0

    def values_at(self, sim_t: float) -> dict[str, Value]:
        """Every point's engineering value at simulated time sim_t."""
        state = self.plant.state(sim_t)
        out: dict[str, Value] = {}
        for point in (*self.profile.points, *self.profile.identity):
            if point.key in self.overrides:
                out[point.key] = self.overrides[point.key]
            elif point.key == "status" and point.enum:
                out[point.key] = status_code(point, float(state.get("ac_power", 0.0)) > 0.0)
            elif point.key in state:
                out[point.key] = state[point.key]
            elif point.sim is not None:
                out[point.key] = point.sim
            elif point.key == "serial":
                out[point.key] = f"SIM{self.unit:03d}{self.plant.seed:05d}"
            elif point.key == "rated_power_kw":
                out[point.key] = self.plant.rated_kw
            elif point.key == "device_time":  # the device's own clock runs on simulated time
                out[point.key] = int(sim_t)
            else:
                out[point.key] = 0
        return out

    def read(self, table: Table, address: int, count: int, real_t: float | None = None) -> list[int] | int:
        """Registers (or bits) for a read request, or a Modbus exception code."""
        if any(t is table and lo <= address + count - 1 and hi >= address for t, lo, hi in self.profile.holes):
            return EXC_ILLEGAL_ADDRESS
        values = self.values_at(self.clock.sim(real_t))
        image = [0] * count
        for point in (*self.profile.points, *self.profile.identity):
            if point.table is not table or point.end <= address or point.address >= address + count:
                continue
            regs = self._encode(point, values.get(point.key, 0))
            for i, reg in enumerate(regs):
                pos = point.address + i - address
                if 0 <= pos < count:
                    image[pos] = reg
        self.served += 1
        return image

    def _encode(self, point: Point, value: Value) -> list[int]:
        if table_is_bits(point):
            return [1 if value else 0] * point.count
        if value is None:
            return encode_invalid(point)
        sf = None
        if point.scale_factor is not None:
            sf_point = self.profile.point(point.scale_factor)
            sf_value = sf_point.sim if isinstance(sf_point.sim, (int, float)) else 0
            sf = int(sf_value)
        try:
            return encode_point(point, value, sf)
        except DecodeError:
            return encode_invalid(point)


def table_is_bits(point: Point) -> bool:
    return point.table.is_bit or (point.type is DataType.BOOL and point.table.is_bit)


RUNNING_TEXTS = ("on-grid", "run", "normal", "mppt", "generating")
IDLE_TEXTS = ("standby: no irradiation", "standby", "wait", "sleep")


def status_code(point: Point, running: bool) -> int:
    """The device's own code for "producing" or "idle at night", found in its enum texts, so
    that every vendor's map gets a status its own enum names (Huawei 0x0200, Sungrow 0x0000…)."""
    for prefix in RUNNING_TEXTS if running else IDLE_TEXTS:
        for code, text in point.enum:
            if text.lower().startswith(prefix):
                return code
    return int(point.sim) if isinstance(point.sim, (int, float)) else point.enum[0][0]
