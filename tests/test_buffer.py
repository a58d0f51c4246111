"""The SQLite buffer and its writer, on real files: seq, sent marks, the size budget, pruning
order, drop events, commit batching, and a real full file system (tmpfs, when root)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.store import writer as writer_mod
from agent.store.buffer import Buffer, PartialWrite
from agent.store.rows import KIND_DROP, KIND_EVENT, Row
from agent.store.writer import BufferWriter
from drivers.errors import StorageError
from drivers.model import Event, Reading, Value
from support.fs import small_tmpfs

DAY_MS = 86_400_000


def reading(i: int, device: str = "inv01", ts: int | None = None, points: int = 35) -> Reading:
    """About the size of a Huawei SUN2000 reading (35 values)."""
    values: dict[str, Value] = {f"p{k:02d}_value": round(1000.0 + i * 0.37 + k * 1.1, 3)
                                                    for k in range(points)}
    return Reading(device, ts if ts is not None else int(time.time() * 1000), values, [])


def on_disk(buf: Buffer) -> int:
    """Database file + WAL, as the file system sees them."""
    return sum(os.path.getsize(p) for p in (buf.path, buf.wal_path) if p.exists())


def kept(buf: Buffer) -> set[int]:
    return {r.seq for r in buf.range(1, 2**62, limit=10**9)}


def drops(buf: Buffer) -> list[dict[str, object]]:
    return [r.json() for r in buf.range(1, 2**62, limit=10**9) if r.kind == KIND_DROP and r.json()["event"] == "dropped"]


def test_seq_is_never_reused_after_deletes_or_reopening(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite"
    buf = Buffer(path, max_mb=8, keep_sent_days=0, min_free_mb=0)
    assert [e.event for e in buf.start_events] == ["buffer_reset"], "seq 1: the first epoch is announced"
    first = buf.append([reading(i) for i in range(10)])
    assert first == list(range(2, 12))
    buf.mark_sent([1, *first])
    assert buf.prune_sent(now_ms=int(time.time() * 1000) + 1000) == 11, "sent and older than 0 days"
    assert kept(buf) == set()
    assert buf.append([reading(10)]) == [12], "the highest seq is remembered even with the table empty"
    buf.close()
    buf = Buffer(path, max_mb=8, keep_sent_days=0, min_free_mb=0)
    assert buf.start_events == [], "the same file continues its epoch"
    assert buf.last_seq() == 12
    assert buf.append([reading(11), reading(12)]) == [13, 14]
    buf.close()


def test_seq_survives_a_process_that_dies_without_closing(tmp_path: Path) -> None:
    """Commits are durable the moment append() returns: a child killed with SIGKILL keeps them."""
    path = tmp_path / "b.sqlite"
    code = (
        "import os, sys, time\n"
        "from agent.store.buffer import Buffer\n"
        "from drivers.model import Reading\n"
        f"b = Buffer({str(path)!r}, max_mb=8, min_free_mb=0)\n"
        "seqs = b.append([Reading('inv01', 1, {'x': i}, []) for i in range(5)])\n"
        "print(seqs[-1], flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=60)
    assert proc.returncode == -9, proc.stderr
    assert proc.stdout.strip() == "6", "seq 1 is the buffer_reset of the new file"
    buf = Buffer(path, max_mb=8, min_free_mb=0)
    assert [r.seq for r in buf.unsent(0)] == [1, 2, 3, 4, 5, 6]
    assert buf.append([reading(0)]) == [7]
    buf.close()


def test_mark_sent_and_unsent_views(tmp_path: Path) -> None:
    buf = Buffer(tmp_path / "b.sqlite", max_mb=8, min_free_mb=0)
    buf.mark_sent([1])  # the buffer_reset of the new file
    seqs = buf.append([reading(i, device=f"inv{i % 3}") for i in range(30)]
                      + [Event("_site", 1, "clock_step", {"delta_ms": 5})])
    assert seqs == list(range(2, 33))
    assert buf.mark_sent([2, 4, 6, 6, 999]) == 3, "unknown and repeated seqs are ignored"
    assert buf.mark_sent([2]) == 0
    unsent = [r.seq for r in buf.unsent(0, limit=1000)]
    assert unsent == [s for s in seqs if s not in (2, 4, 6)]
    assert [r.seq for r in buf.unsent(3, 8)] == [5, 7, 8]
    assert [r.seq for r in buf.range(1, 7)] == [1, 2, 3, 4, 5, 6, 7], "range() includes sent rows"
    stats = buf.stats()
    assert (stats.unsent, stats.total, stats.last_seq) == (28, 32, 32)
    assert {r.epoch for r in buf.range(1, 99)} == {buf.epoch} and len(buf.epoch) == 16
    body = buf.unsent(31)[0]
    assert body.kind == KIND_EVENT and body.json() == {"event": "clock_step", "delta_ms": 5}
    assert buf.kept_bounds(3, 9) == (3, 9) and buf.kept_bounds(40, 50) is None
    buf.close()


@pytest.mark.parametrize("max_mb", [0.1, 0.25, 1.0, 4.0])
def test_max_mb_is_never_exceeded_under_sustained_inserts(tmp_path: Path, max_mb: float) -> None:
    """File + WAL stay within max_mb after every operation: inserts of varying batch sizes, acks,
    drops, pruning — measured on disk."""
    buf = Buffer(tmp_path / "b.sqlite", max_mb=max_mb, keep_sent_days=1, min_free_mb=0)
    budget = int(max_mb * 1024 * 1024)
    peak = 0
    n = 0
    target = int(max_mb * 1024 * 1024 * 3 / 900)  # about three budgets' worth of readings
    sizes = [1, 7, 50, 3, 120, 20]
    while n < target:
        batch = sizes[n % len(sizes)]
        seqs = buf.append([reading(n + i, device=f"inv{(n + i) % 5}") for i in range(batch)])
        n += batch
        peak = max(peak, on_disk(buf))
        if n % 3 == 0:  # some get published
            buf.mark_sent(seqs[: len(seqs) // 2])
            peak = max(peak, on_disk(buf))
        assert peak <= budget, f"{peak} bytes on disk > max_mb {max_mb} ({budget} bytes) after {n} readings"
    buf.prune_sent(now_ms=int(time.time() * 1000) + 2 * DAY_MS)
    assert on_disk(buf) <= budget
    assert drops(buf), "the budget was reached, so unsent rows were dropped and announced"
    assert peak > budget * 0.6, f"the budget is used, not wasted: peak {peak} of {budget}"
    buf.close()


def test_pruning_order_old_sent_then_sent_then_oldest_unsent(tmp_path: Path) -> None:
    buf = Buffer(tmp_path / "b.sqlite", max_mb=0.5, keep_sent_days=1, min_free_mb=0)
    now = int(time.time() * 1000)
    old_sent = buf.append([reading(i, ts=now - 3 * DAY_MS + i) for i in range(40)])
    unsent_old = buf.append([reading(i, ts=now - 2 * DAY_MS + i) for i in range(40)])
    recent_sent = buf.append([reading(i, ts=now - 1000 + i) for i in range(40)])
    buf.mark_sent(old_sent + recent_sent)
    groups = {"old sent": set(old_sent), "recent sent": set(recent_sent), "oldest unsent": set(unsent_old)}
    order = list(groups)
    i = 0
    while groups["oldest unsent"] & kept(buf) and i < 5000:
        buf.append([reading(1000 + i)])
        i += 1
        left = {name: seqs & kept(buf) for name, seqs in groups.items()}
        for k, name in enumerate(order):
            if left[name] != groups[name]:  # this group lost rows: every earlier group is gone
                for earlier in order[:k]:
                    assert not left[earlier], f"{name} pruned while {earlier} still has {sorted(left[earlier])[:5]}"
    assert not groups["oldest unsent"] & kept(buf), "the oldest unsent rows went last, but went"
    first = drops(buf)[0]
    assert first["first_seq"] == min(unsent_old) and first["reason"] == "buffer full (buffer.max_mb reached)"
    buf.close()


def test_drop_events_name_exact_seq_ranges(tmp_path: Path) -> None:
    """Nothing is ever sent: every seq is either still kept or inside exactly one drop event,
    the drops go oldest first, and each count is exact."""
    buf = Buffer(tmp_path / "b.sqlite", max_mb=0.5, min_free_mb=0)
    for i in range(600):
        buf.append([reading(i, device=f"inv{i % 4}")])
    events = drops(buf)
    assert len(events) >= 2
    last = buf.last_seq()
    covered: set[int] = set()
    prev_last = 0
    for ev in events:
        first_seq, last_seq, count = int(ev["first_seq"]), int(ev["last_seq"]), int(ev["count"])  # type: ignore[call-overload]
        span = set(range(first_seq, last_seq + 1))
        assert first_seq > prev_last, "drops go oldest first and never overlap"
        assert span & kept(buf) == {r.seq for r in buf.range(first_seq, last_seq) if r.kind == KIND_DROP}
        assert not span & covered
        announcements = {r.seq for r in buf.range(first_seq, last_seq) if r.kind == KIND_DROP}
        assert count == len(span - announcements), "an earlier announcement inside the range is kept"
        covered |= span
        prev_last = last_seq
    assert covered | kept(buf) == set(range(1, last + 1)), "every seq is kept or named by a drop"
    assert len(events) <= (last - len(kept(buf))) / 20, "drops come in few, large steps"
    assert buf.stats().dropped_unsent == sum(int(ev["count"]) for ev in events)  # type: ignore[call-overload]
    buf.close()


def test_dropped_event_is_published_like_any_record(tmp_path: Path) -> None:
    buf = Buffer(tmp_path / "b.sqlite", max_mb=0.1, min_free_mb=0)
    for i in range(200):
        buf.append([reading(i)])
    rows = [r for r in buf.unsent(0, limit=10_000) if r.kind == KIND_DROP and r.json()["event"] == "dropped"]
    assert rows and all(r.device == "_site" for r in rows), "drop events wait in the buffer, unsent"
    assert set(rows[0].json()) == {"event", "first_seq", "last_seq", "count", "reason"}
    buf.close()


def test_lowering_max_mb_shrinks_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite"
    buf = Buffer(path, max_mb=4, keep_sent_days=0, min_free_mb=0)
    seqs = buf.append([reading(i) for i in range(3000)])
    buf.mark_sent(seqs[:2000])
    buf.close()
    assert os.path.getsize(path) > 1024 * 1024
    buf = Buffer(path, max_mb=1, keep_sent_days=7, min_free_mb=0)
    assert on_disk(buf) <= 1024 * 1024
    assert set(seqs[2000:]) <= kept(buf) | _dropped(buf), "sent rows went first"
    buf.close()


def _dropped(buf: Buffer) -> set[int]:
    out: set[int] = set()
    for ev in drops(buf):
        out |= set(range(int(ev["first_seq"]), int(ev["last_seq"]) + 1))  # type: ignore[call-overload]
    return out


def test_old_schema_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE record (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind INTEGER NOT NULL, device TEXT NOT NULL,
                             ts INTEGER NOT NULL, body TEXT NOT NULL, sent INTEGER NOT NULL DEFAULT 0);
        CREATE INDEX record_unsent ON record(seq) WHERE sent = 0;
        CREATE TABLE counter (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
        INSERT INTO record(kind, device, ts, body, sent) VALUES (0, 'inv01', 1, '{"values":{"a":1},"q":[]}', 5);
        INSERT INTO record(kind, device, ts, body, sent) VALUES (0, 'inv01', 2, '{"values":{"a":2},"q":[]}', 0);
    """)
    db.close()
    buf = Buffer(path, max_mb=8, min_free_mb=0)
    assert [r.seq for r in buf.unsent(0)] == [2, 3], "seq 3: buffer_reset, the file's first epoch"
    assert [e.event for e in buf.start_events] == ["buffer_reset"] and buf.start_events[0].details["reason"] == "new"
    assert {r.epoch for r in buf.range(1, 3)} == {buf.epoch}, "rows from before epochs belong to the first one"
    assert buf.append([reading(3)]) == [4]
    assert buf.stats().total == 4
    buf.close()


def test_writer_commits_once_per_burst(tmp_path: Path) -> None:
    """One poll cycle's readings arrive within a moment: one commit (one fsync), not one each."""
    buf = Buffer(tmp_path / "b.sqlite", max_mb=8, min_free_mb=0)
    w = BufferWriter(buf, commit_interval_s=0.5)
    w.start()
    try:
        for cycle in range(3):
            for i in range(40):
                w.put(reading(cycle * 100 + i, device=f"inv{i:02d}"))
                time.sleep(0.002)
            assert w.flush(5.0)
            assert w.commits == cycle + 1, f"cycle {cycle}: {w.commits} commits"
            time.sleep(0.6)
        assert w.committed == 120 and buf.last_seq() == 121, "and the buffer_reset of the new file"
    finally:
        w.stop()
        buf.close()


def test_writer_stop_commits_what_is_queued(tmp_path: Path) -> None:
    buf = Buffer(tmp_path / "b.sqlite", max_mb=8, min_free_mb=0)
    w = BufferWriter(buf, commit_interval_s=30)
    w.start()
    for i in range(10):
        w.put(reading(i))
    w.stop()
    assert buf.last_seq() == 11
    buf.close()


# -- a real full file system ------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path, 4) as mnt:
        yield mnt


def fill(path: Path, leave_bytes: int) -> Path:
    """Fill the file system holding `path` until only leave_bytes are free."""
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    filler = path / f"filler{time.monotonic_ns()}"
    with open(filler, "wb") as f:
        try:
            f.write(b"\0" * max(0, free - leave_bytes))
            f.flush()
            os.fsync(f.fileno())
        except OSError:
            pass
    return filler


def test_disk_full_drops_oldest_and_recovers(tmpfs: Path) -> None:
    buf = Buffer(tmpfs / "b.sqlite", max_mb=8, min_free_mb=0)
    first = buf.append([reading(i) for i in range(200)])
    filler = fill(tmpfs, 96 * 1024)
    for i in range(400):  # far more than fits in what is left
        buf.append([reading(1000 + i)])
    events = drops(buf)
    assert events and events[0]["first_seq"] == first[0], "the oldest unsent went first"
    assert str(events[0]["reason"]).startswith("disk full")
    size_full = on_disk(buf)
    filler.unlink()
    for i in range(400):
        buf.append([reading(2000 + i)])
    assert drops(buf) == events, "with space back, nothing more is dropped"
    assert on_disk(buf) > size_full, "and the buffer grows again"
    buf.close()


def test_free_space_floor_is_kept(tmpfs: Path) -> None:
    """min_free_mb: the buffer stops growing where the file system would fall below the floor."""
    buf = Buffer(tmpfs / "b.sqlite", max_mb=8, min_free_mb=2)
    for i in range(3000):
        buf.append([reading(i)])
        st = os.statvfs(tmpfs)
        assert st.f_bavail * st.f_frsize >= 2 * 1024 * 1024, f"below the floor after {i} appends"
    assert drops(buf) and str(drops(buf)[0]["reason"]).startswith("disk full")
    buf.close()


def test_writer_holds_records_in_memory_while_the_disk_is_full(tmpfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk so full that not even the WAL can grow: append fails, the writer keeps records in
    memory (bounded), announces what it had to discard, and recovers once space is freed."""
    monkeypatch.setattr(writer_mod, "MEMORY_LIMIT", 50)
    path = tmpfs / "b.sqlite"
    Buffer(path, max_mb=8, min_free_mb=0).close()  # the WAL is truncated to nothing on close
    buf = Buffer(path, max_mb=8, min_free_mb=0)
    filler = fill(tmpfs, 0)
    with pytest.raises(PartialWrite) as exc:
        buf.append([reading(0)])
    assert exc.value.seqs == [] and isinstance(exc.value, StorageError)
    w = BufferWriter(buf, commit_interval_s=0.05)
    w.start()
    try:
        for i in range(80):
            w.put(reading(i))
        deadline = time.monotonic() + 10
        while w.memory_dropped < 30 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not w.last_commit_ok and w.held_in_memory == 50 and w.memory_dropped == 30
        filler.unlink()
        w.put(reading(999))
        deadline = time.monotonic() + 10
        while (w.held_in_memory or not w.last_commit_ok) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert w.last_commit_ok and w.held_in_memory == 0
    finally:
        w.stop()
    rows: list[Row] = [r for r in buf.unsent(0, limit=1000) if r.json().get("event") != "buffer_reset"]
    assert rows[0].kind == KIND_DROP and rows[0].json()["event"] == "dropped_unbuffered"
    assert rows[0].json()["count"] == 30
    values = [json.loads(r.body)["values"]["p00_value"] for r in rows[1:]]
    assert values == [reading(i).values["p00_value"] for i in [*range(30, 80), 999]], "the newest 50 were kept, in order"
    buf.close()
