"""Chaos mode (`pvgate-sim --chaos SEED[:SECONDS] [--chaos-units LIST]`): faults that come and go.

Every SECONDS (default 10) each chaotic unit draws a new fault from CHAOS_FAULTS: half the time
none, else silent, flaky, slow, a broken CRC, an exception, busy, or one of the broken frames of
simulator/frames.py (random bytes, truncated, overlong, another unit id, another function code, a
lying byte count, valid CRC on junk, a wrong register count, a wrong MBAP transaction id or
length, replies nobody asked for). Now and then every TCP connection is dropped like a rebooting
DTU, and for some rounds a second master talks on the bus (requests for units that are not
there). `--chaos-units 3,4` limits all of it to those units (the others stay healthy on the same
bus: the point of a soak test is that they keep their interval); by default every unit is chaotic.

The draws come from random.Random seeded with SEED, so the same seed gives the same sequence of
rounds: a failure seen in a soak run can be replayed. Each round is printed as one JSON line,
{"event": "chaos", ...}, and each broken frame as it goes out as {"event": "chaos-frame", ...}.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from simulator.device import Fault
from simulator.frames import second_master_request, stray_reply
from simulator.server import Bus

# (fault as --fault writes it, weight): a third of the time a unit behaves. No exception 2: it
# says "this register does not exist", which a client rightly learns for good (the plan drops
# the point), so a random one would teach false holes rather than test error handling.
CHAOS_FAULTS: tuple[tuple[str, int], ...] = (
    ("none", 12), ("silent", 1), ("intermittent:0.3", 2), ("slow:0.8:0.5", 1), ("corrupt:0.2", 2),
    ("exception:4:0.3", 1), ("exception:1:0.3", 1), ("exception:11:0.3", 1), ("busy:0.3", 1),
    ("noise:0.3", 1), ("truncated:0.3", 1), ("overlong:0.3", 1), ("wrong-unit:0.3", 1),
    ("wrong-function:0.3", 1), ("byte-count:0.3", 1), ("junk:0.3", 1), ("wrong-length:0.3", 1),
    ("wrong-tid:0.3", 1), ("mbap-length:0.3", 1), ("babble:0.5", 1),
)
DROP_P = 0.1  # per round: close every TCP connection of every listener
SECOND_MASTER_P = 0.25  # per round: another master talks on the buses with chaotic units
LINE_TICK_S = (0.05, 0.4)  # babbling units and the second master speak at random moments
DEFAULT_PERIOD_S = 10.0


@dataclass(frozen=True)
class Chaos:
    seed: int
    period_s: float = DEFAULT_PERIOD_S
    units: frozenset[int] = frozenset()  # empty: every unit

    @classmethod
    def parse(cls, text: str, units: str | None = None) -> Chaos:
        seed, _, period = text.partition(":")
        try:
            out = cls(int(seed), float(period) if period else DEFAULT_PERIOD_S)
        except ValueError:
            raise ValueError(f"--chaos {text!r}: expected SEED[:SECONDS], e.g. 42 or 42:5") from None
        if not 0.05 <= out.period_s <= 86400:
            raise ValueError(f"--chaos {text!r}: SECONDS must be 0.05..86400")
        if units is None:
            return out
        try:
            listed = frozenset(int(u) for u in units.split(","))
        except ValueError:
            raise ValueError(f"--chaos-units {units!r}: expected unit numbers separated by commas, e.g. 3,4") from None
        return cls(out.seed, out.period_s, listed)

    def applies(self, unit: int) -> bool:
        return not self.units or unit in self.units


@dataclass(frozen=True)
class Round:
    faults: dict[int, str]  # chaotic unit -> fault text
    drop: bool  # close every TCP connection
    second_master: bool  # another master talks on the line this round


def rounds(seed: int, units: Sequence[int]) -> Iterator[Round]:
    """Endless rounds for the chaotic units, the same for the same seed."""
    rng = random.Random(seed)
    names = [name for name, _ in CHAOS_FAULTS]
    weights = [weight for _, weight in CHAOS_FAULTS]
    while True:
        faults = {unit: rng.choices(names, weights)[0] for unit in sorted(units)}
        yield Round(faults, rng.random() < DROP_P, rng.random() < SECOND_MASTER_P)


@dataclass
class Line:
    """What the line task needs to know: whose frames are chaos, and whether a second master talks."""

    rng: random.Random
    chaos: Chaos | None = None
    second_master: bool = False

    def chaotic(self, unit: int) -> bool:
        return self.chaos is not None and self.chaos.applies(unit)


async def run(chaos: Chaos, buses: list[Bus], line: Line, emit: Callable[[str], None] | None = None) -> None:
    """Apply the rounds to the running buses until cancelled."""
    say = emit or (lambda text: print(text, flush=True))
    units = sorted({unit for bus in buses for unit in bus.devices if chaos.applies(unit)})
    line.chaos = chaos
    for bus in buses:
        for unit, device in bus.devices.items():
            # Which requests a fault strikes is seeded too (the requests themselves come from the client).
            device.rng = random.Random(chaos.seed * 1000 + unit)
    for rnd in rounds(chaos.seed, units):
        await asyncio.sleep(chaos.period_s)
        for bus in buses:
            for unit, device in bus.devices.items():
                if unit in rnd.faults:
                    device.fault = Fault.parse(rnd.faults[unit])
        line.second_master = rnd.second_master
        dropped = sum(bus.drop_clients() for bus in buses) if rnd.drop else 0
        say(json.dumps({"event": "chaos", "t": round(time.time(), 3),
                        "faults": {str(u): f for u, f in rnd.faults.items()},
                        "dropped_connections": dropped, "second_master": rnd.second_master}))


async def speak(buses: list[Bus], line: Line) -> None:
    """Frames nobody asked for, put on an idle line: babbling units (a `babble` fault, set by chaos,
    --fault or the control port) and, in chaos rounds that have one, the second master."""
    while True:
        await asyncio.sleep(line.rng.uniform(*LINE_TICK_S))
        for bus in buses:
            if bus.idle():
                said = _speak(bus, line)
                if said is not None:
                    bus.unsolicited(said[2])
                    bus.chaos_event(said[0], said[1], said[2])


def _speak(bus: Bus, line: Line) -> tuple[int, str, bytes] | None:
    """(unit, kind, frame) for what is said on the bus now, or None for silence."""
    for unit, device in sorted(bus.devices.items()):
        if device.fault.kind == "babble" and device.fault.strikes(device.rng):
            return unit, "babble", stray_reply(unit, bus.framer(), line.rng)
    if line.second_master and any(line.chaotic(u) for u in bus.devices) and line.rng.random() < 0.5:
        frame = second_master_request(bus.framer(), line.rng)
        return _addressed(frame, bus), "second-master", frame
    return None


def _addressed(frame: bytes, bus: Bus) -> int:
    """The unit a request frame asks (MBAP: after the 6-byte header)."""
    return frame[6] if bus.listen.kind == "tcp" else frame[0]


def summary(events: Sequence[dict[str, Any]]) -> dict[str, int]:
    """How often each frame fault struck, from the chaos-frame lines (for tests and soak reports)."""
    out: dict[str, int] = {}
    for event in events:
        if event.get("event") == "chaos-frame":
            out[str(event["fault"])] = out.get(str(event["fault"]), 0) + 1
    return out
