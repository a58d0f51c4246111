"""Active alarms, kept in the buffer file so that a restart neither repeats an `alarm` nor
misses the `alarm_cleared` of an alarm that ended while the agent was down.

Stored as `counter` rows `alarm:<device>/<point>` = the point's raw bits (device ids never hold
a `/`: they are MQTT topic levels). Every stored `alarm` / `alarm_cleared` event updates them in
the same transaction as the event itself, so the state and the announcements cannot disagree,
not even across a crash.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping

from agent.store.rows import KIND_EVENT, RecordRow

PREFIX = "alarm:"


def active(db: sqlite3.Connection) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for name, bits in db.execute("SELECT name, value FROM counter WHERE name LIKE 'alarm:%'"):
        device, _, point = str(name)[len(PREFIX):].partition("/")
        out.setdefault(device, {})[point] = int(bits)
    return out


def put(db: sqlite3.Connection, device: str, point: str, bits: int) -> None:
    name = f"{PREFIX}{device}/{point}"
    if bits:
        db.execute("INSERT INTO counter(name, value) VALUES (?, ?) "
                   "ON CONFLICT(name) DO UPDATE SET value=excluded.value", (name, bits))
    else:
        db.execute("DELETE FROM counter WHERE name=?", (name,))


def replace(db: sqlite3.Connection, device: str, bits: Mapping[str, int]) -> None:
    db.execute("DELETE FROM counter WHERE name >= ? AND name < ?", (f"{PREFIX}{device}/", f"{PREFIX}{device}0"))
    for point, value in bits.items():
        put(db, device, point, int(value))


def track(db: sqlite3.Connection, rows: list[RecordRow]) -> None:
    """Alarm events carry the point's whole raw value: the active bits after this event."""
    for kind, device, _, body in rows:
        if kind != KIND_EVENT or not body.startswith('{"event":"alarm'):
            continue
        fields = json.loads(body)
        point, raw = fields.get("point"), fields.get("raw")
        if fields.get("event") in ("alarm", "alarm_cleared") and isinstance(point, str) and isinstance(raw, int):
            put(db, device, point, raw)
