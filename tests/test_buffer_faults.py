"""The buffer under storage faults, on real files: damaged files (header page, a middle page),
a deleted buffer, an older copy put back, a file system remounted read-only while writing
(tmpfs, root), and — injected at the SQLite or os call, where the OS cannot produce them on
demand — EIO and SQLITE_CORRUPT while running, a failing statvfs.

In each: nothing is deleted that was not announced, no seq is given twice within an epoch (and
a new epoch starts above the old seqs), and records held in memory are written after recovery.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.store import lineage, opening, sql
from agent.store import writer as writer_mod
from agent.store.buffer import Buffer, open_buffer
from agent.store.rows import Row
from agent.store.writer import BufferWriter
from drivers.model import Event, Reading
from support.faults import inject, overwrite_page, page_size, sqlite_error


def reading(i: int, device: str = "inv01") -> Reading:
    return Reading(device, 1_764_403_200_000 + i * 1000, {"ac_power": float(i), "energy_total": 1000.0 + i}, [])


def filled(path: Path, n: int, sent: int = 0) -> list[int]:
    """A closed buffer with n readings, the first `sent` of them acknowledged."""
    buf = Buffer(path, max_mb=8, min_free_mb=0)
    seqs = buf.append([reading(i) for i in range(n)])
    buf.mark_sent([1, *seqs[:sent]] if sent else [])  # 1: the file's buffer_reset
    buf.close()
    return seqs


def all_rows(buf: Buffer) -> list[Row]:
    return buf.range(0, 2**62, limit=10**9)


def events(buf: Buffer, name: str) -> list[dict[str, object]]:
    return [r.json() for r in all_rows(buf) if r.kind != 0 and r.json()["event"] == name]


def quarantined(path: Path) -> list[Path]:
    return sorted(p for p in path.parent.iterdir() if ".corrupt-" in p.name and not p.name.endswith(("-wal", "-shm")))


# -- damaged at start ---------------------------------------------------------------------------


def test_header_page_overwritten_is_set_aside_and_seq_continues(tmp_path: Path) -> None:
    path = tmp_path / "buffer.sqlite"
    seqs = filled(path, 300)
    old_epoch = lineage.read(path).epoch  # type: ignore[union-attr]
    size = path.stat().st_size
    overwrite_page(path, 1)
    buf, started = open_buffer(_Cfg(path))
    try:
        [aside] = quarantined(path)
        assert aside.stat().st_size == size, "set aside whole, never deleted"
        reset = started[0].details
        assert started[0].event == "buffer_reset" and reset["reason"] == "corrupt"
        assert reset["previous_epoch"] == old_epoch and reset["quarantined"] == str(aside)
        assert buf.epoch != old_epoch
        new = buf.append([reading(1000)])
        assert new[0] > seqs[-1], "the new epoch's seqs start above every seq given before"
        assert int(reset["first_seq"]) > seqs[-1]  # type: ignore[call-overload]
        assert buf.unsent(0)[0].json().get("event") == "buffer_reset", "announced first"
    finally:
        buf.close()


def test_middle_page_overwritten_is_found_and_salvaged(tmp_path: Path) -> None:
    path = tmp_path / "buffer.sqlite"
    seqs = filled(path, 3000, sent=1000)
    pages = path.stat().st_size // page_size(path)
    overwrite_page(path, pages // 2)
    buf = Buffer(path, max_mb=8, min_free_mb=0)
    try:
        [aside] = quarantined(path)
        [reset] = events(buf, "buffer_reset")
        assert reset["reason"] == "corrupt" and reset["previous_last_seq"] == seqs[-1], "the old last seq was read"
        before = buf.last_seq()
        from agent.store import salvage

        got, new = salvage.into_buffer(buf, aside)
    finally:
        buf.close()
    # what a damaged page costs depends on what it held (records, or only an index): all that is
    # readable of the 2000 unsent readings comes back, nothing that was sent
    assert got.only_unsent and 0 < got.rows <= 2000 and got.first_seq is not None and got.first_seq > seqs[999]
    assert new == list(range(before + 1, before + 1 + got.rows)), "new seqs, in the live epoch"
    buf = Buffer(path, max_mb=8, min_free_mb=0)
    rows = buf.unsent(before, limit=10**6)
    marks = [r.json()["salvaged"] for r in rows]
    assert {m["epoch"] for m in marks} == {reset["previous_epoch"]}  # type: ignore[index]
    assert all(r.epoch == buf.epoch for r in rows)
    assert rows[0].ts == reading(int(marks[0]["seq"]) - 2).ts_ms, "original ts kept"  # type: ignore[index]
    buf.close()


def test_not_a_database_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "buffer.sqlite"
    path.write_bytes(b"this is not sqlite" * 500)
    buf, started = open_buffer(_Cfg(path))
    assert [e.details["reason"] for e in started] == ["corrupt"] and len(quarantined(path)) == 1
    buf.append([reading(0)])
    buf.close()


def test_integrity_check_is_bounded_in_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "buffer.sqlite"
    filled(path, 20000)
    db = sqlite3.connect(path)
    assert opening.check(db, timeout_s=0.0) is None, "a check that runs out of time counts as passed"
    db.close()


# -- deleted, replaced ----------------------------------------------------------------------------


def test_deleted_buffer_starts_above_the_recorded_lease(tmp_path: Path) -> None:
    path = tmp_path / "buffer.sqlite"
    seqs = filled(path, 50)
    old = lineage.read(path)
    assert old is not None and old.seq_ceiling >= seqs[-1]
    path.unlink()
    buf = Buffer(path, max_mb=8, min_free_mb=0)
    [reset] = events(buf, "buffer_reset")
    assert reset["reason"] == "missing" and reset["previous_epoch"] == old.epoch
    assert reset["previous_last_seq"] == seqs[-1], "a clean close records the exact last seq"
    assert buf.last_seq() > old.seq_ceiling and buf.epoch != old.epoch
    buf.close()


def test_the_lease_is_written_ahead_and_rarely(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The side file is written once per LEASE seqs, always before a seq above it is committed;
    a process killed without closing leaves a lease above every seq it gave."""
    monkeypatch.setattr(lineage, "LEASE", 100)
    path = tmp_path / "b.sqlite"
    writes = []
    real = lineage.write

    def counting(p: Path, lin: lineage.Lineage) -> bool:
        writes.append(lin.seq_ceiling)
        return real(p, lin)

    monkeypatch.setattr(lineage, "write", counting)
    buf = Buffer(path, max_mb=8, min_free_mb=0)
    for i in range(100):
        buf.append([reading(i * 10 + k) for k in range(10)])
        recorded = lineage.read(path)
        assert recorded is not None and recorded.seq_ceiling >= buf.last_seq()
    assert len(writes) <= 1 + 1000 // 100 + 1, f"{len(writes)} writes for 1000 seqs"
    last = buf.last_seq()
    buf._db.close()  # as if killed: no clean close
    path.unlink()
    buf = Buffer(path, max_mb=8, min_free_mb=0)
    assert buf.append([reading(0)])[0] > last
    buf.close()


def test_buffer_and_side_file_deleted_start_a_new_epoch(tmp_path: Path) -> None:
    path = tmp_path / "buffer.sqlite"
    filled(path, 10)
    old = lineage.read(path)
    path.unlink()
    lineage.side_path(path).unlink()
    buf = Buffer(path, max_mb=8, min_free_mb=0)
    assert [e["reason"] for e in events(buf, "buffer_reset")] == ["new"]
    assert old is not None and buf.epoch != old.epoch, "seq 1 again, but in a new epoch: (epoch, seq) stays unique"
    buf.close()


def test_older_copy_put_back_is_a_new_epoch_and_old_rows_keep_theirs(tmp_path: Path) -> None:
    path = tmp_path / "buffer.sqlite"
    filled(path, 20)
    backup = tmp_path / "backup.sqlite"
    backup.write_bytes(path.read_bytes())
    buf = Buffer(path, max_mb=8, min_free_mb=0)
    first_epoch = buf.epoch
    later = buf.append([reading(i) for i in range(20, 40)])
    buf.close()
    os.replace(backup, path)
    buf = Buffer(path, max_mb=8, min_free_mb=0)
    [reset] = events(buf, "buffer_reset")[-1:]
    assert reset["reason"] == "replaced" and reset["previous_epoch"] == first_epoch
    new = buf.append([reading(99)])
    assert new[0] > later[-1]
    assert {r.epoch for r in buf.range(1, 21)} == {first_epoch}, "old rows keep the epoch they were drawn in"
    assert buf.range(new[0], new[0])[0].epoch == buf.epoch != first_epoch
    buf.close()


# -- errors while running -------------------------------------------------------------------------


def wait(cond: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.02)
    assert cond(), "condition not reached in time"  # type: ignore[operator]


def test_injected_eio_drops_nothing_and_held_records_are_written(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Injected SQLITE_IOERR ("disk I/O error") at the insert: it used to be taken for a full
    disk, and every unsent row was deleted."""
    monkeypatch.setattr(writer_mod, "RETRY_S", 0.05)
    buf = Buffer(tmp_path / "b.sqlite", max_mb=8, min_free_mb=0)
    kept = buf.append([reading(i) for i in range(100)])
    faulty = inject(buf, sqlite_error("disk I/O error", sqlite3.SQLITE_IOERR), fail=3)
    w = BufferWriter(buf, commit_interval_s=0.02)
    w.start()
    try:
        for i in range(100, 120):
            w.put(reading(i))
        wait(lambda: faulty.raised >= 1)
        progress = w.last_progress
        time.sleep(0.1)
        assert w.last_progress == progress, "no progress while nothing can be written"
        wait(lambda: w.last_commit_ok and w.held_in_memory == 0)
    finally:
        w.stop()
    assert faulty.raised == 3 and w.errors[sql.TRANSIENT] == 3 and w.failed_commits == 3
    assert w.last_progress > progress
    values = [r.json()["values"]["ac_power"] for r in buf.unsent(0, limit=1000) if r.kind == 0]
    assert values == [float(i) for i in range(120)], "nothing deleted; the held records written in order"
    assert buf.stats().dropped_unsent == 0 and not [r for r in all_rows(buf) if '"dropped"' in r.body]
    assert set(kept) <= {r.seq for r in all_rows(buf)}
    buf.close()


def test_injected_corrupt_while_running_sets_the_file_aside_and_writes_what_was_held(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite"
    buf = Buffer(path, max_mb=8, min_free_mb=0)
    old_seqs = buf.append([reading(i) for i in range(50)])
    old_epoch = buf.epoch
    inject(buf, sqlite_error("database disk image is malformed", sqlite3.SQLITE_CORRUPT, sqlite3.DatabaseError), 1)
    w = BufferWriter(buf, commit_interval_s=0.02)
    w.start()
    try:
        for i in range(50, 60):
            w.put(reading(i))
        assert w.flush(10)
        wait(lambda: w.last_commit_ok and w.held_in_memory == 0)
    finally:
        w.stop()
    assert w.errors[sql.CORRUPT] == 1 and w.buffer_resets == 1 and buf.epoch != old_epoch
    [aside] = quarantined(path)
    rows = buf.unsent(0, limit=1000)
    assert rows[0].json()["event"] == "buffer_reset" and rows[0].json()["quarantined"] == str(aside)
    assert rows[0].seq > old_seqs[-1], "above every seq of the old file"
    assert [r.json()["values"]["ac_power"] for r in rows[1:]] == [float(i) for i in range(50, 60)]
    assert len({r.seq for r in rows}) == len(rows)
    old = sqlite3.connect(aside)
    assert old.execute("SELECT count(*) FROM record").fetchone()[0] == 51, "the old file is kept as it was"
    old.close()
    buf.close()


def test_failing_statvfs_does_not_stop_the_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """os.statvfs raising (injected) is an unknown free space, not a dead writer thread."""
    buf = Buffer(tmp_path / "b.sqlite", max_mb=8, min_free_mb=0)

    def broken(_: object) -> os.statvfs_result:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "statvfs", broken)
    w = BufferWriter(buf, commit_interval_s=0.02)
    w.start()
    try:
        for i in range(10):
            w.put(reading(i))
        assert w.flush(10)
        assert w.last_commit_ok and w.committed == 10
    finally:
        w.stop()
    buf.close()


FSIZE_CHILD = """
import json, resource, signal, sys, time
from agent.store.buffer import Buffer
from agent.store.writer import BufferWriter
from drivers.model import Reading
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
buf = Buffer(sys.argv[1], max_mb=4, min_free_mb=0)
w = BufferWriter(buf, commit_interval_s=0.02)
w.start()
put = lambda a, b: [w.put(Reading("inv01", 1764403200000 + i * 1000, {"ac_power": float(i)}, [])) for i in range(a, b)]
put(0, 20)
assert w.flush(10) and w.last_commit_ok
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # no file may grow past 4 KiB: the WAL cannot
put(20, 40)
deadline = time.monotonic() + 10
while w.failed_commits < 2 and time.monotonic() < deadline:
    time.sleep(0.02)
during = {"held": w.held_in_memory, "errors": dict(w.errors), "ok": w.last_commit_ok}
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
deadline = time.monotonic() + 40
while (w.held_in_memory or not w.last_commit_ok) and time.monotonic() < deadline:
    time.sleep(0.05)
w.stop()
rows = [r for r in buf.unsent(0, limit=1000) if r.kind == 0]
print(json.dumps({"during": during, "values": [r.json()["values"]["ac_power"] for r in rows],
                  "seqs": [r.seq for r in rows], "dropped": buf.stats().dropped_unsent}))
buf.close()
"""


def test_real_write_errors_from_the_kernel_hold_and_recover(tmp_path: Path) -> None:
    """A real write error from the kernel, on demand: RLIMIT_FSIZE makes every write past 4 KiB
    fail with EFBIG (SQLite: disk I/O error). In a child process, so that nothing else of the
    test run is limited."""
    proc = subprocess.run([sys.executable, "-c", FSIZE_CHILD, str(tmp_path / "b.sqlite")], capture_output=True,
                          text=True, timeout=90, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["during"]["held"] == 20 and not got["during"]["ok"]
    assert got["during"]["errors"]["transient"] >= 2 and got["during"]["errors"]["full"] == 0, got["during"]
    assert got["values"] == [float(i) for i in range(40)], "nothing deleted, the held records written in order"
    assert len(set(got["seqs"])) == 40 and got["dropped"] == 0


def test_records_held_at_stop_are_announced_at_the_next_start(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite"
    buf = Buffer(path, max_mb=8, min_free_mb=0)
    inject(buf, sqlite_error("disk I/O error", sqlite3.SQLITE_IOERR), fail=10**6)
    w = BufferWriter(buf, commit_interval_s=0.02)
    w.start()
    for i in range(5):
        w.put(reading(i, device=f"inv0{i % 2}"))
    wait(lambda: w.failed_commits >= 1)
    w.stop()
    buf.close()
    noted = lineage.read(path)
    assert noted is not None and noted.unbuffered is not None and noted.unbuffered["count"] == 5
    buf = Buffer(path, max_mb=8, min_free_mb=0)
    [ev] = events(buf, "dropped_unbuffered")
    assert ev["count"] == 5 and ev["devices"] == ["inv00", "inv01"]
    assert (ev["first_ts"], ev["last_ts"]) == (reading(0).ts_ms, reading(4).ts_ms)
    buf.close()
    again = Buffer(path, max_mb=8, min_free_mb=0)
    assert len(events(again, "dropped_unbuffered")) == 1, "announced once"
    again.close()


# -- alarms, size -------------------------------------------------------------------------------


def test_active_alarms_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite"
    buf = Buffer(path, max_mb=8, min_free_mb=0)
    buf.append([Event("inv01", 1, "alarm", {"point": "alarm_1", "alarms": "grid_overvoltage", "raw": 5}),
                Event("inv02", 1, "alarm", {"point": "alarm_1", "alarms": "x", "raw": 1})])
    buf.append([Event("inv02", 2, "alarm_cleared", {"point": "alarm_1", "alarms": "x", "raw": 0})])
    buf.close()
    buf = Buffer(path, max_mb=8, min_free_mb=0)
    assert buf.active_alarms() == {"inv01": {"alarm_1": 5}}
    buf.set_alarms("inv01", {})
    assert buf.active_alarms() == {}
    buf.close()


def test_file_without_auto_vacuum_above_max_mb_opens_in_bounded_time(tmp_path: Path) -> None:
    """As `sqlite3 .recover` leaves it: auto_vacuum=NONE, free pages, above max_mb."""
    path = tmp_path / "b.sqlite"
    db = sqlite3.connect(path)
    db.executescript("PRAGMA auto_vacuum=NONE; PRAGMA journal_mode=WAL;"
                     "CREATE TABLE record (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind INTEGER NOT NULL,"
                     " device TEXT NOT NULL, ts INTEGER NOT NULL, body TEXT NOT NULL);")
    body = json.dumps({"values": {"x": "y" * 900}, "q": []})
    db.executemany("INSERT INTO record(kind, device, ts, body) VALUES (0, 'inv01', ?, ?)",
                   [(i, body) for i in range(3000)])
    db.execute("DELETE FROM record WHERE seq < 1500")
    db.commit()
    db.close()
    t0 = time.monotonic()
    buf = Buffer(path, max_mb=1, min_free_mb=0)
    assert time.monotonic() - t0 < 30
    assert buf.size_bytes() <= 1024 * 1024 and sql.pragma(buf._db, "auto_vacuum") == 2
    buf.close()


class _Cfg:
    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.max_mb = 8.0
        self.keep_sent_days = 7.0
        self.min_free_mb = 0.0
