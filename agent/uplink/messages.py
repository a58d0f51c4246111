"""MQTT topics and message bodies of Contract 2, built from buffer rows.

Stored bodies are JSON objects already: they are spliced into the message text, never parsed
and dumped again — on a backlog drain that is most of the work the publisher would otherwise do.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from agent.store.rows import KIND_DATA, KIND_REPORT, Row
from drivers.model import Device

LIVE, BACKLOG, RESEND = "live", "backlog", "resend"
_BODY = itemgetter(4)  # Row.body
GROUP_MIN_ROWS = 500  # a window this large is a backlog: batch per device


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    seqs: list[int]
    lane: str
    job: int = 0  # the resend request it belongs to (resend lane)
    retain: bool = False  # the daily report: a center that subscribes later still gets it


class Topics:
    def __init__(self, prefix: str, site: str) -> None:
        self.base = f"{prefix}/{site}"

    def status(self) -> str:
        return f"{self.base}/status"

    def meta(self, device: str) -> str:
        return f"{self.base}/meta/{device}"

    def data(self, device: str) -> str:
        return f"{self.base}/data/{device}"

    def events(self, device: str) -> str:
        return f"{self.base}/events/{device}"

    def report(self) -> str:
        return f"{self.base}/report/daily"

    def health(self) -> str:
        return f"{self.base}/health"

    def cmd(self) -> str:
        return f"{self.base}/cmd/+"

    def reply(self, name: str) -> str:
        return f"{self.base}/reply/{name}"


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def _obj(head: str, body: str, tail: str) -> str:
    """One JSON object: our fields, then the stored body's fields spliced in without parsing."""
    inner = body[1:-1]
    return "{" + head + ("," + inner if inner else "") + tail + "}"


def _size(rows: list[Row]) -> int:
    """Bytes the rows take in a data message."""
    return sum(map(len, map(_BODY, rows))) + 48 * len(rows)


def _by_run(rows: Sequence[Row]) -> list[list[Row] | Row]:
    """Runs of consecutive readings of one device; events alone."""
    out: list[list[Row] | Row] = []
    for row in rows:
        last = out[-1] if out else None
        if row.kind != KIND_DATA:
            out.append(row)
        elif isinstance(last, list) and last[0].device == row.device and last[0].epoch == row.epoch:
            last.append(row)
        else:
            out.append([row])
    return out


def _by_device(rows: Sequence[Row]) -> list[list[Row] | Row]:
    """Each device's readings together, at the place of its first; events alone."""
    out: list[list[Row] | Row] = []
    per: dict[tuple[str, str], list[Row]] = {}  # one message never mixes epochs
    for row in rows:
        if row.kind != KIND_DATA:
            out.append(row)
        elif (row.device, row.epoch) in per:
            per[row.device, row.epoch].append(row)
        else:
            per[row.device, row.epoch] = [row]
            out.append(per[row.device, row.epoch])
    return out


class MessageBuilder:
    """Rows -> data/event messages: per device, in seq order, bounded in readings and bytes."""

    def __init__(self, topics: Topics, site: str, batch_max: int, max_bytes: int = 64 * 1024) -> None:
        """max_bytes bounds each payload (the publisher derives it from the broker's limits);
        a single record larger than that still gets its own message: the publisher decides."""
        self.topics = topics
        self.site_json = json.dumps(site, ensure_ascii=False)
        self.batch_max = batch_max
        self.max_bytes = max_bytes

    def build(self, rows: Sequence[Row], lane: str) -> list[Message]:
        """A window of GROUP_MIN_ROWS rows or more is a backlog: each device's readings go
        together, messages in the order of their first seq. A smaller window keeps strict seq
        order: only consecutive readings of one device share a message."""
        tail = (',"replay":true' if lane != LIVE else "") + (',"resend":true' if lane == RESEND else "")
        items: list[list[Row] | Row] = []
        for run in (_by_device(rows) if len(rows) >= GROUP_MIN_ROWS else _by_run(rows)):
            if isinstance(run, list):
                items.extend(self._split(run))
            else:
                items.append(run)
        items.sort(key=lambda item: item[0].seq if isinstance(item, list) else item.seq)
        out: list[Message] = []
        for item in items:
            if isinstance(item, list):
                out.extend(self._fit(item, lane, tail))
            else:
                out.append(self._event(item, lane, tail))
        return out

    def _fit(self, rows: list[Row], lane: str, tail: str) -> list[Message]:
        """_split estimates sizes; the built payload is what counts: halve until it fits."""
        msg = self._data(rows, lane, tail)
        if len(msg.payload) <= self.max_bytes or len(rows) == 1:
            return [msg]
        half = len(rows) // 2
        return self._fit(rows[:half], lane, tail) + self._fit(rows[half:], lane, tail)

    def _split(self, rows: list[Row]) -> list[list[Row]]:
        """Evenly into as few messages as batch_max and max_bytes allow."""
        limit = self.max_bytes - 256
        total = _size(rows)
        if len(rows) <= self.batch_max and total <= limit:
            return [rows]
        per = math.ceil(len(rows) / max(math.ceil(len(rows) / self.batch_max), math.ceil(total / limit)))
        out: list[list[Row]] = []
        for i in range(0, len(rows), per):
            chunk = rows[i:i + per]
            while _size(chunk) > limit and len(chunk) > 1:  # uneven rows: halve until it fits
                half = len(chunk) // 2
                out.extend(self._split(chunk[:half]))
                chunk = chunk[half:]
            out.append(chunk)
        return out

    def _head(self, device: str, epoch: str = "") -> str:
        # epoch: the buffer lineage the seqs were drawn in; the center dedupes on (epoch, seq)
        head = f'"v":1,"site":{self.site_json},"device":{json.dumps(device, ensure_ascii=False)}'
        return head + (f',"epoch":{json.dumps(epoch)}' if epoch else "")

    def _data(self, rows: list[Row], lane: str, tail: str) -> Message:
        # Stored bodies are JSON objects with values and q: splice seq and ts in, no parsing.
        readings = ",".join([f'{{"seq":{r.seq},"ts":{r.ts},{r.body[1:]}' for r in rows])
        text = "{" + self._head(rows[0].device, rows[0].epoch) + ',"readings":[' + readings + "]" + tail + "}"
        return Message(self.topics.data(rows[0].device), text.encode(), [r.seq for r in rows], lane)

    def _event(self, row: Row, lane: str, tail: str) -> Message:
        if row.kind == KIND_REPORT:
            return self._report(row, lane, tail)
        text = _obj(f'{self._head(row.device, row.epoch)},"seq":{row.seq},"ts":{row.ts}', row.body, tail)
        return Message(self.topics.events(row.device), text.encode(), [row.seq], lane)

    def _report(self, row: Row, lane: str, tail: str) -> Message:
        # Contract 2: no device field; ts is the local midnight ending the report's day.
        head = f'"v":1,"site":{self.site_json}' + (f',"epoch":{json.dumps(row.epoch)}' if row.epoch else "")
        text = _obj(f'{head},"seq":{row.seq},"ts":{row.ts}', row.body, tail)
        return Message(self.topics.report(), text.encode(), [row.seq], lane, retain=True)


def meta_payload(site: str, device: Device, identity: dict[str, Any]) -> bytes:
    """The retained P/S/meta/<device> message: identity and every published point with its unit.

    A SunSpec device's points are discovered at run time; the poller sends them along with the
    nameplate as `_points`.
    """
    identity = dict(identity)
    discovered = identity.pop("_points", None)
    points = discovered if isinstance(discovered, list) else [
        {"key": p.key, "unit": p.unit, "type": p.type.name_,
         **({"counter": True} if p.counter else {}),
         **({"enum": {str(k): v for k, v in p.enum}} if p.enum else {}),
         **({"bits": {str(k): v for k, v in p.bits}} if p.bits else {})}
        for p in device.profile.points if p.publish]
    return dumps({
        "v": 1, "site": site, "device": device.id, "profile": device.profile.id,
        "name": device.profile.name, "unit": device.unit, "link": device.link,
        "interval_s": device.interval_s, "identity": identity, "points": points,
        # devices[].name, the station's own name for it (一号逆变器); `name` is the device map's
        **({"label": device.name} if device.name else {}),
    })
