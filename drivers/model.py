"""Core value types shared by every stage: links, devices, device maps, planned reads, readings.

Stdlib only and free of behaviour, so that config, planning, decoding, the simulator and the
agent can all speak the same language without importing each other.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Union

Value = Union[int, float, str, bool]


class Table(enum.Enum):
    """Modbus data table of a point; the value is the read function code."""

    COIL = 1
    DISCRETE = 2
    HOLDING = 3
    INPUT = 4

    @property
    def is_bit(self) -> bool:
        return self in (Table.COIL, Table.DISCRETE)


class DataType(enum.Enum):
    """Encoding of a point in registers; the value is the register count (0 = variable)."""

    U16 = ("u16", 1)
    I16 = ("i16", 1)
    U32 = ("u32", 2)
    I32 = ("i32", 2)
    U64 = ("u64", 4)
    I64 = ("i64", 4)
    F32 = ("f32", 2)
    F64 = ("f64", 4)
    STRING = ("string", 0)
    BITS = ("bits", 1)
    SUNSSF = ("sunssf", 1)
    BOOL = ("bool", 1)

    @property
    def name_(self) -> str:
        return self.value[0]

    @property
    def words(self) -> int:
        return self.value[1]

    @classmethod
    def parse(cls, text: str) -> DataType:
        for member in cls:
            if member.value[0] == text:
                return member
        raise ValueError(text)


class WordOrder(enum.Enum):
    BIG = "big"  # high word first (ABCD)
    LITTLE = "little"  # low word first (CDAB)


class LinkType(enum.Enum):
    TCP = "tcp"
    RTU = "rtu"
    RTU_OVER_TCP = "rtu-over-tcp"


@dataclass(frozen=True)
class Point:
    """One named value of a device map."""

    key: str
    table: Table
    address: int
    type: DataType
    count: int  # registers (or bits for coil/discrete tables)
    word_order: WordOrder = WordOrder.BIG
    byte_swap: bool = False
    scale: float = 1.0
    offset: float = 0.0
    scale_factor: str | None = None  # key of a SunSpec sunssf point of the same map
    unit: str = ""
    counter: bool = False
    invalid: tuple[int, ...] = ()  # raw sentinels meaning "not available"
    enum: tuple[tuple[int, str], ...] = ()
    bits: tuple[tuple[int, str], ...] = ()
    publish: bool = True  # scale-factor and identity helpers are read but not published
    sim: float | str | None = None  # the simulator's value when its physics has none
    # (key of another point, its raw codes) for which this point means something; e.g. a fault
    # code that the device leaves stale once the fault is gone. None: always valid.
    valid_when: tuple[str, tuple[int, ...]] | None = None
    # (min, max) a value can physically take, in the point's unit; outside is flagged invalid.
    range: tuple[float, float] | None = None

    @property
    def end(self) -> int:
        """One past the last register (or bit) the point occupies."""
        return self.address + self.count


@dataclass(frozen=True)
class DeviceMap:
    """A device map (profile): the points of one device model and how to read them."""

    id: str
    name: str
    source: str
    points: tuple[Point, ...]
    identity: tuple[Point, ...] = ()
    max_block: int = 125
    max_gap: int = 16
    holes: tuple[tuple[Table, int, int], ...] = ()  # (table, first, last) never to be read
    path: str = ""
    sunspec: bool = False  # points are discovered at run time by walking the model chain

    def point(self, key: str) -> Point:
        for p in self.points:
            if p.key == key:
                return p
        raise KeyError(key)


@dataclass(frozen=True)
class SerialSettings:
    port: str
    baudrate: int = 9600
    parity: str = "N"
    stopbits: int = 1
    bytesize: int = 8


@dataclass(frozen=True)
class Link:
    """One physical link: an RS-485 bus, a serial server or a TCP endpoint."""

    id: str
    type: LinkType
    host: str = ""
    port: int = 502
    serial: SerialSettings | None = None
    timeout: float = 1.0
    retries: int = 1
    inter_frame_s: float = 0.0  # silence after a timeout before the next request

    @property
    def endpoint(self) -> str:
        if self.serial is not None:
            return f"{self.serial.port}@{self.serial.baudrate}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Nameplate:
    """What the site file says a device is (`devices[].expect`); `pvgate commission` compares it
    with what the device itself reports. None: not declared, not compared."""

    model: str | None = None
    serial: str | None = None
    rated_kw: float | None = None


@dataclass(frozen=True)
class Device:
    id: str
    link: str
    unit: int
    profile: DeviceMap
    interval_s: float = 10.0
    timeout: float | None = None  # overrides the link's
    retries: int | None = None
    offline_after: int = 3  # failed polls before the device is reported offline
    backoff_max_s: float = 300.0
    # A meter whose CT (or whole meter) sits the other way round: its power signs are flipped
    # and its import/export counters swapped before publishing (drivers.sign.apply_sign).
    invert_power: bool = False
    name: str = ""  # free text for people (Chinese is fine); the id stays the machine's name
    expect: Nameplate | None = None


@dataclass(frozen=True)
class Block:
    """One planned read: a contiguous range of one table covering some points."""

    table: Table
    start: int
    count: int
    points: tuple[Point, ...]

    def __hash__(self) -> int:
        # A block is a dict key several times per poll, and the generated hash hashed every
        # field of every point (enums included) each time: ~9 % of the event loop's CPU.
        cached: int | None = self.__dict__.get("_hash")
        if cached is None:
            cached = hash((self.table, self.start, self.count, self.points))
            self.__dict__["_hash"] = cached  # frozen: the cache is no field (not compared, not copied)
        return cached

    def __getstate__(self) -> dict[str, object]:
        # caches, not fields: hashes differ between processes, compiled decoders do not pickle
        return {k: v for k, v in self.__dict__.items() if k not in ("_hash", "_plain")}


@dataclass
class Reading:
    """One completed poll of one device; gets its site-wide seq when buffered."""

    device: str
    ts_ms: int
    values: dict[str, Value]
    quality: list[str] = field(default_factory=list)


@dataclass
class Event:
    """A state change or alarm; shares the site-wide seq with readings."""

    device: str  # "_site" for events about the station
    ts_ms: int
    event: str
    details: dict[str, Value] = field(default_factory=dict)
