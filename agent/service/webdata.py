"""What the status page serves, computed off the event loop and cached.

A browser left open refreshes every few seconds, and a misbehaving one (or a script) may ask as
fast as it can: every answer here is computed at most once per TTL, on a worker thread, one
computation at a time however many requests wait for it, so the page can never cost polling
more than that. Today's power is read from the buffer over a read-only connection
(agent/store/readonly.py): the page never writes, prunes or checkpoints the buffer.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from agent.clock import device_kind
from agent.config import SiteConfig
from agent.energy.source import day_bounds, local_day
from agent.i18n import LANGUAGES, normalize
from agent.store.readonly import connect_ro
from agent.store.rows import KIND_DATA

T = TypeVar("T")
STATUS_TTL_S = 1.0
POWER_TTL_S = 10.0
POWER_KEY = "ac_power"
BUCKETS_S = (10, 30, 60, 300)  # the finest that keeps a series within MAX_POINTS
MAX_POINTS = 300


class Cached(Generic[T]):
    """A value recomputed on a worker thread at most every ttl_s; requests arriving while it is
    being computed wait for that computation instead of starting their own."""

    def __init__(self, compute: Callable[[], T], ttl_s: float) -> None:
        self.compute = compute
        self.ttl_s = ttl_s
        self.computed = 0  # how many times it ran (the tests count them)
        self._value: T | None = None
        self._at = 0.0
        self._pending: asyncio.Task[T] | None = None

    def clear(self) -> None:
        self._value = None

    async def get(self) -> T:
        if self._value is not None and time.monotonic() - self._at < self.ttl_s:
            return self._value
        if self._pending is None:
            self._pending = asyncio.get_running_loop().create_task(self._refresh())
        # shield: a client hanging up must not cancel the computation others wait for
        return await asyncio.shield(self._pending)

    async def _refresh(self) -> T:
        try:
            value = await asyncio.to_thread(self.compute)
            self.computed += 1
            self._value, self._at = value, time.monotonic()
            return value
        finally:
            self._pending = None


def to_json(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False, default=str, separators=(",", ":")).encode("utf-8")


def inverters(cfg: SiteConfig) -> list[str]:
    """The devices whose AC power makes the station's: inverters with an ac_power point."""
    out = []
    for device in cfg.devices:
        keys = [p.key for p in device.profile.points if p.publish]
        if POWER_KEY in keys and device_kind(keys) == "inverter":
            out.append(device.id)
    return out


def bucket_for(span_ms: int) -> int:
    """Seconds per point: the finest of BUCKETS_S that keeps the span within MAX_POINTS (a whole
    day in 5-minute buckets; the first minutes after a start in 10-second ones)."""
    for seconds in BUCKETS_S:
        if span_ms / (seconds * 1000) <= MAX_POINTS:
            return seconds
    return BUCKETS_S[-1]


def power_today(cfg: SiteConfig, now_ms: int | None = None) -> dict[str, Any]:
    """Today's (site local day) mean AC power per bucket of each inverter, and their sum."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    tz = cfg.site.timezone
    start, end = day_bounds(local_day(now, tz), tz)
    devices = inverters(cfg)
    out: dict[str, Any] = {"day": local_day(now, tz).isoformat(), "timezone": tz, "unit": "kW", "key": POWER_KEY,
                           "start_ms": start, "end_ms": end, "ts": now, "bucket_s": BUCKETS_S[-1],
                           "inverters": devices, "devices": {d: [] for d in devices}, "station": []}
    path = Path(cfg.buffer.path)
    if not devices or not path.exists():
        return out
    db = connect_ro(path)
    try:
        first = db.execute("SELECT ts FROM record WHERE ts >= ? AND ts < ? AND kind = ? ORDER BY ts LIMIT 1",
                           (start, end, KIND_DATA)).fetchone()
        if first is None:
            return out
        bucket_ms = bucket_for(max(0, min(now, end) - int(first[0]))) * 1000
        marks = ",".join("?" * len(devices))
        rows = db.execute(
            f"SELECT device, (ts - ?) / ?, avg(json_extract(body, '$.values.{POWER_KEY}')) FROM record "
            f"WHERE ts >= ? AND ts < ? AND kind = ? AND device IN ({marks}) GROUP BY 1, 2 ORDER BY 2",
            (start, bucket_ms, int(first[0]), end, KIND_DATA, *devices)).fetchall()
    finally:
        db.close()
    station: dict[int, float] = {}
    for device, bucket, kw in rows:
        if not isinstance(kw, (int, float)):
            continue
        ts = start + int(bucket) * bucket_ms
        out["devices"][device].append([ts, round(float(kw), 3)])
        station[ts] = station.get(ts, 0.0) + float(kw)
    out["bucket_s"] = bucket_ms // 1000
    out["station"] = [[ts, round(kw, 3)] for ts, kw in sorted(station.items())]
    return out


def accept_language(header: str | None) -> str | None:
    """The first of LANGUAGES an Accept-Language header asks for, by its q-values."""
    if not header:
        return None
    ranked: list[tuple[float, int, str]] = []
    for i, part in enumerate(header.split(",")[:20]):
        tag, _, params = part.strip().partition(";")
        q = 1.0
        if params.strip().startswith("q="):
            try:
                q = float(params.strip()[2:])
            except ValueError:
                q = 0.0
        lang = normalize(tag.strip())
        if lang is not None and q > 0:
            ranked.append((-q, i, lang))
    return min(ranked)[2] if ranked else None


def choose_language(query_lang: str | None, site_lang: str | None, header: str | None, agent_lang: str) -> str:
    """?lang= first, then the site file's site.language, then the browser's, then the agent's."""
    for candidate in (normalize(query_lang), site_lang, accept_language(header), agent_lang):
        if candidate in LANGUAGES:
            return candidate
    return "en"
