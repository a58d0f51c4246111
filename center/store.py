"""Messages -> rows -> PostgreSQL, one transaction per batch.

Readings, events and daily reports are copied into per-connection staging tables (COPY is the
fast path into PostgreSQL) and moved with ``INSERT … SELECT … ON CONFLICT DO NOTHING``: the key
(site, epoch, seq) makes every duplicate — a QoS 1 redelivery, a replay, a resend — a no-op.
Status, meta and health are upserts of the latest. A message that does not follow the contract is
counted and skipped, never stored half.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg

log = logging.getLogger(__name__)

STAGING = """
CREATE TEMP TABLE IF NOT EXISTS stage_data (site text, device text, epoch text, replay boolean, body jsonb)
    ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_event (site text, epoch text, seq bigint, device text, ts bigint,
    kind text, body jsonb) ON COMMIT DELETE ROWS;
"""
# A data message is copied as it came (one row, its text parsed by PostgreSQL's jsonb input) and
# exploded into readings here: far less work in Python than a row per reading.
MOVE_READINGS = """INSERT INTO reading (site, epoch, seq, device, ts, vals, q, replay, worker)
    SELECT m.site, m.epoch, (r->>'seq')::bigint, m.device, (r->>'ts')::bigint, r->'values',
           coalesce(r->'q', '[]'), m.replay, %s
    FROM stage_data m CROSS JOIN LATERAL jsonb_array_elements(m.body->'readings') r
    ON CONFLICT DO NOTHING"""
MOVE_EVENTS = """INSERT INTO event (site, epoch, seq, device, ts, kind, body, worker)
    SELECT site, epoch, seq, device, ts, kind, body, %s FROM stage_event ON CONFLICT DO NOTHING"""
STREAMS = """INSERT INTO stream (site, epoch, max_seq)
    SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[]) ORDER BY 1, 2
    ON CONFLICT (site, epoch) DO UPDATE SET max_seq = greatest(stream.max_seq, excluded.max_seq),
        dirty = true, updated_at = now()"""
RESETS = """UPDATE stream s SET first_seq = (e.body->>'first_seq')::bigint FROM stage_event e
    WHERE e.kind = 'buffer_reset' AND s.site = e.site AND s.epoch = e.epoch AND s.first_seq IS NULL"""


class BadMessage(ValueError):
    """A payload that does not follow the contract."""


@dataclass
class Batch:
    """Rows of one transaction, gathered from many messages."""

    data: list[tuple[str, str, str, bool, str]] = field(default_factory=list)  # one row per data message
    readings: int = 0
    max_seq: dict[tuple[str, str], int] = field(default_factory=dict)
    events: list[tuple[Any, ...]] = field(default_factory=list)
    reports: list[tuple[Any, ...]] = field(default_factory=list)
    status: dict[str, tuple[str, int, str | None]] = field(default_factory=dict)
    meta: dict[tuple[str, str], str] = field(default_factory=dict)
    health: dict[str, tuple[int, str]] = field(default_factory=dict)
    replies: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    bad: int = 0
    _text: str = ""

    @property
    def records(self) -> int:
        return self.readings + len(self.events) + len(self.reports)

    def _seq(self, site: str, epoch: str, seq: Any) -> int:
        if not isinstance(seq, int) or isinstance(seq, bool) or not 0 < seq < 2**63:
            raise ValueError(f"seq {seq!r} is not an integer from 1 to 2**63-1")
        key = (site, epoch)
        if seq > self.max_seq.get(key, 0):
            self.max_seq[key] = seq
        return seq

    def add(self, topic: str, payload: bytes, prefix: str) -> None:
        """Parse one message into rows; BadMessage when it does not follow the contract."""
        site, kind, name = split_topic(topic, prefix)
        if not payload:
            return  # a retained message being cleared
        try:
            self._text = payload.decode("utf-8")
            body = json.loads(self._text, parse_constant=_no_constant)
        except ValueError as err:
            raise BadMessage(f"not JSON: {err}") from None
        if "\\u0000" in self._text:
            raise BadMessage("a string with NUL (\\u0000): PostgreSQL's jsonb cannot hold it")
        if not isinstance(body, dict):
            raise BadMessage("not a JSON object")
        try:
            self._add(site, kind, name, body)
        except (KeyError, TypeError, ValueError) as err:
            raise BadMessage(f"{kind}: {type(err).__name__}: {err}") from None

    def _add(self, site: str, kind: str, name: str, body: dict[str, Any]) -> None:
        if kind == "data":
            epoch, readings = str(body["epoch"]), body["readings"]
            for r in readings:
                self._seq(site, epoch, r["seq"])
                ts = r["ts"]
                if not isinstance(ts, int) or not 0 <= ts < 2**63 or not isinstance(r["values"], dict) \
                        or not isinstance(r["q"], list):
                    raise ValueError("a reading needs an integer ts, an object of values and a list q")
            self.data.append((site, name, epoch, body.get("replay") is True, self._text))
            self.readings += len(readings)
        elif kind == "events":
            rest = {k: v for k, v in body.items() if k not in ("v", "site", "device", "epoch", "seq", "ts", "event")}
            self.events.append((site, str(body["epoch"]), self._seq(site, str(body["epoch"]), body["seq"]), name,
                                int(body["ts"]),
                                str(body["event"]), json.dumps(rest)))
        elif kind == "report" and name == "daily":
            self.reports.append((site, str(body["epoch"]), self._seq(site, str(body["epoch"]), body["seq"]),
                                 str(body["date"]),
                                 int(body.get("revision", 0)), json.dumps(body)))
        elif kind == "status":
            self.status[site] = (str(body["state"]), int(body["ts"]), body.get("version"))
        elif kind == "meta":
            self.meta[site, name] = json.dumps(body)
        elif kind == "health":
            self.health[site] = (int(body["ts"]), json.dumps(body))
        elif kind == "reply" and name == "resend":
            self.replies.append((site, body))
        else:
            raise BadMessage(f"topic kind {kind!r} is not ingested")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (payloads are strict JSON)")


def split_topic(topic: str, prefix: str) -> tuple[str, str, str]:
    """`P/S/kind[/name]` -> (site, kind, name)."""
    if not topic.startswith(prefix + "/"):
        raise BadMessage(f"topic {topic!r} is not under {prefix}/")
    parts = topic[len(prefix) + 1:].split("/")
    if len(parts) < 2 or not parts[0]:
        raise BadMessage(f"topic {topic!r}: expected {prefix}/<site>/<kind>")
    return parts[0], parts[1], "/".join(parts[2:])


@dataclass
class Written:
    readings: int = 0
    events: int = 0
    reports: int = 0


def prepare(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
    """Staging tables of this connection (temporary: each connection has its own)."""
    with conn.transaction():
        conn.execute(STAGING.encode())


def write(conn: psycopg.Connection[tuple[Any, ...]], batch: Batch, worker: str) -> Written:
    """Store one batch in one transaction (the caller commits by leaving conn.transaction())."""
    out = Written()
    with conn.cursor() as cur:
        _copy(cur, "stage_data (site, device, epoch, replay, body)", batch.data)
        _copy(cur, "stage_event (site, epoch, seq, device, ts, kind, body)", batch.events)
        if batch.data:
            out.readings = cur.execute(MOVE_READINGS, (worker,)).rowcount
        if batch.events:
            out.events = cur.execute(MOVE_EVENTS, (worker,)).rowcount
        for site, epoch, seq, day, revision, body in batch.reports:
            cur.execute("""INSERT INTO report_daily (site, epoch, seq, day, revision, body, worker)
                VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING""",
                        (site, epoch, seq, day, revision, body, worker))
            out.reports += cur.rowcount
        if batch.max_seq:
            keys = sorted(batch.max_seq)
            cur.execute(STREAMS, ([k[0] for k in keys], [k[1] for k in keys], [batch.max_seq[k] for k in keys]))
            cur.execute(RESETS)
        _latest(cur, batch)
    return out


def _copy(cur: psycopg.Cursor[tuple[Any, ...]], target: str, rows: Iterable[tuple[Any, ...]]) -> None:
    rows = list(rows)
    if not rows:
        return
    with cur.copy(f"COPY {target} FROM STDIN".encode()) as copy:
        for row in rows:
            copy.write_row(row)


def _latest(cur: psycopg.Cursor[tuple[Any, ...]], batch: Batch) -> None:
    for site, (state, ts, version) in sorted(batch.status.items()):
        cur.execute("""INSERT INTO station (site, state, ts, version) VALUES (%s, %s, %s, %s)
            ON CONFLICT (site) DO UPDATE SET state = excluded.state, ts = excluded.ts, version = excluded.version,
                updated_at = now() WHERE station.ts <= excluded.ts""", (site, state, ts, version))
    for (site, device), body in sorted(batch.meta.items()):
        cur.execute("""INSERT INTO device (site, device, meta) VALUES (%s, %s, %s)
            ON CONFLICT (site, device) DO UPDATE SET meta = excluded.meta, updated_at = now()""", (site, device, body))
    for site, (ts, body) in sorted(batch.health.items()):
        cur.execute("""INSERT INTO health (site, ts, body) VALUES (%s, %s, %s)
            ON CONFLICT (site) DO UPDATE SET ts = excluded.ts, body = excluded.body, updated_at = now()
            WHERE health.ts <= excluded.ts""", (site, ts, body))
