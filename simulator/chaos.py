"""Chaos mode (`pvgate-sim --chaos SEED[:SECONDS]`): faults that come and go on their own.

Every SECONDS (default 10) each unit draws a new fault from CHAOS_FAULTS (mostly none, sometimes
silent, flaky, slow, corrupt, refusing or busy), and now and then every TCP connection is
dropped like a rebooting DTU. The draws come from a random.Random seeded with SEED, so the
same seed gives the same sequence of faults: a failure seen in a soak run can be replayed.
Each change is printed as one JSON line, {"event": "chaos", ...}, beside the "ready" line.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from simulator.device import Fault
from simulator.server import Bus

# (fault as --fault writes it, weight): half the time a unit behaves.
CHAOS_FAULTS: tuple[tuple[str, int], ...] = (
    ("none", 12), ("silent", 2), ("intermittent:0.3", 2), ("slow:0.8:0.5", 2),
    ("corrupt:0.2", 2), ("exception:4:0.3", 2), ("busy:0.3", 2),
)
DROP_P = 0.1  # per round: close every TCP connection of every listener
DEFAULT_PERIOD_S = 10.0


@dataclass(frozen=True)
class Chaos:
    seed: int
    period_s: float = DEFAULT_PERIOD_S

    @classmethod
    def parse(cls, text: str) -> Chaos:
        seed, _, period = text.partition(":")
        try:
            out = cls(int(seed), float(period) if period else DEFAULT_PERIOD_S)
        except ValueError:
            raise ValueError(f"--chaos {text!r}: expected SEED[:SECONDS], e.g. 42 or 42:5") from None
        if not 0.05 <= out.period_s <= 86400:
            raise ValueError(f"--chaos {text!r}: SECONDS must be 0.05..86400")
        return out


def rounds(seed: int, units: Sequence[int]) -> Iterator[tuple[dict[int, str], bool]]:
    """Endless rounds of (unit -> fault text, drop connections?), the same for the same seed."""
    rng = random.Random(seed)
    names = [name for name, _ in CHAOS_FAULTS]
    weights = [weight for _, weight in CHAOS_FAULTS]
    while True:
        faults = {unit: rng.choices(names, weights)[0] for unit in sorted(units)}
        yield faults, rng.random() < DROP_P


async def run(chaos: Chaos, buses: list[Bus], emit: Callable[[str], None] | None = None) -> None:
    """Apply the rounds to the running buses until cancelled."""
    say = emit or (lambda line: print(line, flush=True))
    units = sorted({unit for bus in buses for unit in bus.devices})
    for faults, drop in rounds(chaos.seed, units):
        await asyncio.sleep(chaos.period_s)
        for bus in buses:
            for unit, device in bus.devices.items():
                device.fault = Fault.parse(faults[unit])
        dropped = sum(bus.drop_clients() for bus in buses) if drop else 0
        say(json.dumps({"event": "chaos", "t": round(time.time(), 3), "faults": {str(u): f for u, f in faults.items()},
                        "dropped_connections": dropped}))
