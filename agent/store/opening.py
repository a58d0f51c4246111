"""Opening the buffer: a bounded integrity check, damaged files set aside, and the epoch.

At every open the buffer file is checked (`PRAGMA quick_check`, at most CHECK_S seconds: a
check that runs out of time counts as passed, because a station must not stay dark for a slow
SD card). A file that is not a database or is damaged is renamed `<name>.corrupt-<UTC time>`
together with its -wal and -shm, never deleted, and a fresh file is opened.

Then the file's lineage is compared with the side file (agent/store/lineage.py). A new epoch
starts, announced by a `buffer_reset` event on `_site` as the epoch's first record, when:

| reason     | when                                                                    |
|------------|-------------------------------------------------------------------------|
| `new`      | first start: no buffer file and no side file (or a file from before epochs) |
| `missing`  | the side file names an epoch but the buffer file is gone                |
| `replaced` | the file's epoch is not the recorded one, or its seq is below what was recorded (an older copy) |
| `corrupt`  | the file was damaged and set aside (at start or while running)          |

Except for `new`, the new epoch's seqs start above everything pvgate can still find: the side
file's lease, the old file's last seq (when it can still be read), the last seq given in this
process. Rows already in a replaced file keep the epoch they were drawn in.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from agent import private
from agent.store import lineage, sql
from agent.store.lineage import Lineage
from agent.store.rows import record_row
from drivers.model import Event, Value

log = logging.getLogger(__name__)

CHECK_S = 5.0  # the start-up integrity check gives up (and passes) after this long


@dataclass(frozen=True)
class Damage:
    """A buffer file set aside: where it went, what was wrong, what could still be read of it."""

    quarantined: Path
    problem: str
    last_seq: int | None
    epoch: str | None


def check(db: sqlite3.Connection, timeout_s: float = CHECK_S) -> str | None:
    """None when the file looks sound (or the check ran out of time), else what is wrong."""
    deadline = time.monotonic() + timeout_s
    db.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
    try:
        rows = db.execute("PRAGMA quick_check(3)").fetchall()
    except sqlite3.DatabaseError as err:
        if "interrupt" in str(err).lower():
            log.warning("device=_site buffer check did not finish within %.0f s: taken as passed", timeout_s)
            return None
        if sql.classify(err) == sql.CORRUPT:
            return str(err)
        raise
    finally:
        db.set_progress_handler(None, 0)
    text = "; ".join(str(r[0]) for r in rows)
    return None if text == "ok" else text


def quarantine(path: Path, problem: str) -> Damage:
    """Rename the file with its -wal and -shm to `<name>.corrupt-<UTC time>`; never delete."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    # The -wal first: a WAL left beside a fresh file could be replayed into it.
    for suffix in ("-wal", "-shm", ""):
        src = Path(f"{path}{suffix}")
        if src.exists():
            os.replace(src, Path(f"{target}{suffix}"))
    _fsync_dir(path.parent)
    private.prepare_database(path)  # the fresh buffer is owner-only too
    last, epoch = peek(target)
    log.error("device=_site buffer %s is damaged (%s): set aside as %s (last seq %s); a fresh buffer opens",
              path, problem, target, last if last is not None else "unreadable")
    return Damage(target, problem, last, epoch)


def peek(path: Path) -> tuple[int | None, str | None]:
    """The last seq and current epoch of a (damaged) file, as far as they can be read."""
    last: int | None = None
    epoch: str | None = None
    for uri in (f"file:{path}?mode=ro", f"file:{path}?mode=ro&immutable=1"):
        try:
            db = sqlite3.connect(uri, uri=True)
        except sqlite3.Error:
            continue
        try:
            for query in ("SELECT seq FROM sqlite_sequence WHERE name='record'", "SELECT max(seq) FROM record"):
                try:
                    got = db.execute(query).fetchone()
                    if got and got[0] is not None:
                        last = max(last or 0, int(got[0]))
                except sqlite3.Error:
                    pass
            try:
                segments = sql.epochs(db)
                epoch = segments[-1][1] if segments else epoch
            except sqlite3.Error:
                pass
        finally:
            db.close()
        if last is not None:
            break
    return last, epoch


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def reset_reason(db: sqlite3.Connection, lin: Lineage | None, damage: Damage | None) -> str | None:
    """Why this file needs a new epoch, or None when it continues the recorded one."""
    segments = sql.epochs(db)
    if damage is not None:
        return "corrupt"
    if not segments:
        if lin is None:
            return "new"
        return "missing" if sql.last_seq(db) == 0 else "replaced"
    if lin is None:
        return None  # the side file was lost: the file itself still knows its epoch and seq
    if segments[-1][1] != lin.epoch or sql.last_seq(db) < lin.seq_seen:
        return "replaced"
    return None


def establish(db: sqlite3.Connection, path: Path, lin: Lineage | None, damage: Damage | None,
              floor: int = 0) -> tuple[Lineage, list[Event]]:
    """Start a new epoch where needed, announce it and any unannounced losses, in one
    transaction. `floor`: the last seq this process gave (a reopen while running).
    Returns the lineage to record and the events now stored (first in their epoch)."""
    reason = reset_reason(db, lin, damage)
    segments = sql.epochs(db)
    epoch = segments[-1][1] if segments else ""
    events: list[Event] = []
    now = int(time.time() * 1000)
    db.execute("BEGIN IMMEDIATE")
    try:
        if reason is not None:
            epoch = lineage.new_epoch()
            start = 0 if reason == "new" else max(sql.last_seq(db), floor, lin.seq_ceiling if lin else 0,
                                                  (damage.last_seq or 0) if damage else 0)
            if not segments and reason != "new" and sql.last_seq(db) > 0:
                # rows from before epochs existed: an epoch of their own, apart from the new seqs
                sql.add_epoch(db, 0, lineage.new_epoch())
            sql.set_last_seq(db, start)
            sql.add_epoch(db, 0 if reason == "new" else start + 1, epoch)
            events.append(Event("_site", now, "buffer_reset", _reset_details(reason, epoch, start, lin, damage)))
        if lin is not None and lin.unbuffered:
            events.append(Event("_site", now, "dropped_unbuffered", dict(lin.unbuffered)))
        for event in events:
            db.execute("INSERT INTO record(kind, device, ts, body) VALUES (?,?,?,?)", record_row(event))
            db.execute("INSERT INTO unsent(seq) VALUES (?)", (sql.last_seq(db),))
        sql.count(db, "rows", len(events))
        db.execute("COMMIT")
    except BaseException:
        sql.rollback(db)
        raise
    if reason is not None:
        log.warning("device=_site buffer %s: new epoch %s (%s), seq continues from %d",
                    path, epoch, reason, sql.last_seq(db))
    return Lineage(epoch, sql.last_seq(db), 0).extended(sql.last_seq(db)), events


def _reset_details(reason: str, epoch: str, start: int, lin: Lineage | None,
                   damage: Damage | None) -> dict[str, Value]:
    details: dict[str, Value] = {"reason": reason, "epoch": epoch, "first_seq": start + 1}
    previous = lin.epoch if lin is not None else (damage.epoch if damage is not None else None)
    if previous:
        details["previous_epoch"] = previous
    last = damage.last_seq if damage is not None and damage.last_seq is not None else (
        lin.seq_seen if lin is not None else None)
    if last is not None and reason != "new":
        details["previous_last_seq"] = last
    if damage is not None:
        details["quarantined"] = str(damage.quarantined)
        details["problem"] = damage.problem[:200]
    return details
