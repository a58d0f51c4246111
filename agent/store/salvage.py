"""`pvgate buffer salvage`: what can still be read from a buffer file set aside as damaged.

The quarantined file (with its -wal) is copied to a temporary directory first, so that SQLite
may apply the WAL there while the quarantined evidence stays exactly as it was found. Rows are
read in seq order, a chunk at a time; a chunk that hits a damaged page is read again row by
row, and what still fails is skipped and counted.

Salvaged records go into the live buffer as new, unsent records with new seqs (so the center
gets them as a backlog), keeping their original `ts`, and each carries
`"salvaged": {"epoch": <old epoch>, "seq": <old seq>}`: the center can tell them from fresh
readings and drop those it already has under the old (epoch, seq). By default only the rows
that were still unsent in the damaged file are copied (all rows, when its unsent table cannot
be read, or with `--all`).
"""

from __future__ import annotations

import bisect
import csv
import json
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from agent.store import opening, sql
from agent.store.buffer import Buffer
from agent.store.rows import KIND_DATA, RecordRow
from drivers.errors import StorageError

CHUNK = 1000


@dataclass
class Salvaged:
    rows: int = 0
    skipped: int = 0  # seqs that could not be read (a damaged page)
    first_seq: int | None = None  # in the damaged file
    last_seq: int | None = None
    only_unsent: bool = True


def read_damaged(path: Path, result: Salvaged, include_sent: bool = False) -> Iterator[RecordRow]:
    """Rows of a damaged buffer file, oldest first, each body marked `salvaged`."""
    if not path.exists():
        raise FileNotFoundError(path)
    with tempfile.TemporaryDirectory(prefix="pvgate-salvage-") as tmp:
        copy = Path(tmp) / "damaged.sqlite"
        shutil.copyfile(path, copy)
        if Path(f"{path}-wal").exists():
            shutil.copyfile(f"{path}-wal", f"{copy}-wal")
        last, epoch = opening.peek(copy)
        db = sqlite3.connect(str(copy), isolation_level=None)
        try:
            try:
                db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            except sqlite3.DatabaseError as err:
                raise StorageError(f"{path} cannot be read as a database ({err}): nothing to salvage; "
                                   "the file is kept as it is for expert recovery") from err
            segments = _segments(db, epoch or "")
            unsent = None if include_sent else _unsent(db)
            result.only_unsent = unsent is not None
            for seq, kind, device, ts, body in _rows(db, last or 0, result):
                if unsent is not None and seq not in unsent:
                    continue
                result.rows += 1
                result.first_seq = seq if result.first_seq is None else result.first_seq
                result.last_seq = seq
                mark = json.dumps({"epoch": _epoch_of(segments, seq), "seq": seq})
                yield kind, device, ts, f'{body[:-1]}{"," if len(body) > 2 else ""}"salvaged":{mark}}}'
        finally:
            db.close()


def _segments(db: sqlite3.Connection, fallback: str) -> list[tuple[int, str]]:
    try:
        return sql.epochs(db) or [(0, fallback)]
    except sqlite3.Error:
        return [(0, fallback)]


def _epoch_of(segments: list[tuple[int, str]], seq: int) -> str:
    i = bisect.bisect_right([first for first, _ in segments], seq) - 1
    return segments[max(0, i)][1]


def _unsent(db: sqlite3.Connection) -> set[int] | None:
    try:
        return {int(r[0]) for r in db.execute("SELECT seq FROM unsent")}
    except sqlite3.Error:
        return None


def _rows(db: sqlite3.Connection, last: int, result: Salvaged) -> Iterator[tuple[int, int, str, int, str]]:
    """Every readable row up to `last` (or as far as a scan goes when last is unknown)."""
    seq = 0
    query = "SELECT seq, kind, device, ts, body FROM record WHERE seq >= ? AND seq <= ? ORDER BY seq LIMIT ?"
    while True:
        hi = seq + CHUNK - 1
        try:
            rows = db.execute(query, (seq, 2**62, CHUNK)).fetchall()
        except sqlite3.DatabaseError:
            if seq > last:
                return
            rows = list(_one_by_one(db, seq, hi, result))
            yield from rows
            seq = hi + 1
            continue
        if not rows:
            return
        yield from rows
        seq = int(rows[-1][0]) + 1


def _one_by_one(db: sqlite3.Connection, lo: int, hi: int, result: Salvaged) -> Iterator[tuple[int, int, str, int, str]]:
    for seq in range(lo, hi + 1):
        try:
            row = db.execute("SELECT seq, kind, device, ts, body FROM record WHERE seq = ?", (seq,)).fetchone()
        except sqlite3.DatabaseError:
            result.skipped += 1
            continue
        if row is not None:
            yield row


def into_buffer(buffer: Buffer, path: Path, include_sent: bool = False) -> tuple[Salvaged, list[int]]:
    """Copy into the live buffer as unsent records with new seqs; returns what and the new seqs."""
    result = Salvaged()
    seqs: list[int] = []
    batch: list[RecordRow] = []
    for row in read_damaged(path, result, include_sent):
        batch.append(row)
        if len(batch) >= CHUNK:
            seqs += buffer.append_rows(batch)
            batch = []
    if batch:
        seqs += buffer.append_rows(batch)
    return result, seqs


def to_csv(path: Path, out: IO[str], include_sent: bool = False) -> Salvaged:
    """CSV: epoch and seq in the damaged file, ts, device, key, value (events: key `event:<name>`,
    value the event's JSON)."""
    result = Salvaged()
    writer = csv.writer(out)
    writer.writerow(["epoch", "seq", "ts_utc_ms", "device", "key", "value"])
    for kind, device, ts, body in read_damaged(path, result, include_sent):
        fields = json.loads(body)
        mark = fields.pop("salvaged")
        if kind == KIND_DATA:
            for key, value in fields["values"].items():
                writer.writerow([mark["epoch"], mark["seq"], ts, device, key, value])
        else:
            name = fields.pop("event", "")
            writer.writerow([mark["epoch"], mark["seq"], ts, device, f"event:{name}",
                             json.dumps(fields, ensure_ascii=False)])
    return result
