"""The registers a device really serves, learned by bisection when it refuses a read (exception 2).

Real devices do not serve every address a map's merged blocks span: many refuse a read that
crosses a register they do not have. When a block is refused, its points are split in halves and
each half read, recursively, once. Where both halves of a refused read answer, the cause lies
between them: the registers there are a learned hole (or, with no register between them, a
learned split: the device will not read across that address). A single point refused on its
own is unsupported. The plan then merges over the learned holes the way it merges over a map's
declared ones: the fewest transactions the device accepts.

What was learned is kept per device (`Learned`, saved by the runtime in the state directory) and
used from the first poll after a restart. It is learned again when the device's map or its
identity (model, firmware) changes, and after LEARNED_MAX_AGE_S.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from drivers.errors import DeviceError
from drivers.link import EXC_ILLEGAL_ADDRESS
from drivers.model import DeviceMap, Point, Table

LEARNED_MAX_AGE_S = 7 * 86400.0  # relearn weekly: a firmware update may change what is served
BISECT_BUDGET = 64  # transactions one bisection may spend; the rest falls back to a plain split
Reader = Callable[[Table, int, int], Awaitable[list[int]]]


@dataclass
class Learned:
    """What one device serves, beyond its map: learned holes, splits and unsupported points."""

    fingerprint: str  # the map's readable layout this was learned with
    holes: set[tuple[Table, int, int]] = field(default_factory=set)
    splits: set[tuple[Table, int]] = field(default_factory=set)
    unsupported: set[str] = field(default_factory=set)
    learned_at: float = field(default_factory=time.time)
    identity: str = ""  # model|firmware of the device it was learned on, once known

    def to_json(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "learned_at": round(self.learned_at),
                "holes": sorted([t.name.lower(), lo, hi] for t, lo, hi in self.holes),
                "splits": sorted([t.name.lower(), a] for t, a in self.splits),
                "unsupported": sorted(self.unsupported), "identity": self.identity}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Learned:
        return cls(str(data["fingerprint"]),
                   {(Table[str(t).upper()], int(lo), int(hi)) for t, lo, hi in data.get("holes", [])},
                   {(Table[str(t).upper()], int(a)) for t, a in data.get("splits", [])},
                   {str(k) for k in data.get("unsupported", [])}, float(data.get("learned_at", 0)),
                   str(data.get("identity", "")))

    def fresh(self, fingerprint: str, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return self.fingerprint == fingerprint and now - self.learned_at < LEARNED_MAX_AGE_S


def fingerprint(dmap: DeviceMap) -> str:
    """The map's readable layout: learning over another layout says nothing about this one."""
    layout = ";".join(f"{p.table.name}:{p.address}:{p.count}" for p in sorted(
        dmap.points, key=lambda p: (p.table.value, p.address)))
    return hashlib.sha256(f"{dmap.id}|{layout}".encode()).hexdigest()[:16]


def identity_key(identity: dict[str, Any]) -> str:
    """Model and firmware: a device swapped or updated may serve other registers."""
    return f"{identity.get('model', '')}|{identity.get('firmware', '')}"


class Bisection:
    """One device's learning pass over a refused block; reads through `read`, one at a time."""

    def __init__(self, read: Reader, learned: Learned, budget: int = BISECT_BUDGET) -> None:
        self.read = read
        self.learned = learned
        self.budget = budget
        self.transactions = 0

    async def run(self, points: list[Point]) -> None:
        """Learn why these points, read together, were refused. Raises the DeviceError of a
        device that stops answering (the poll then fails as any poll would)."""
        points = sorted(points, key=lambda p: p.address)
        if len(points) == 1:
            self.learned.unsupported.add(points[0].key)
            return
        mid = len(points) // 2
        left, right = points[:mid], points[mid:]
        if self.transactions + 2 > self.budget:
            self.learned.splits.add((right[0].table, right[0].address))  # out of budget: a plain split
            return
        left_ok = await self._reads(left)
        right_ok = await self._reads(right)
        if left_ok and right_ok:
            end = max(p.end for p in left)
            start = right[0].address
            table = right[0].table
            if start > end:
                self.learned.holes.add((table, end, start - 1))
            else:
                self.learned.splits.add((table, start))
        if not left_ok:
            await self.run(left)
        if not right_ok:
            await self.run(right)

    async def _reads(self, points: list[Point]) -> bool:
        start = points[0].address
        end = max(p.end for p in points)
        self.transactions += 1
        try:
            await self.read(points[0].table, start, end - start)
        except DeviceError as err:
            if err.exception_code == EXC_ILLEGAL_ADDRESS:
                return False
            raise
        return True
