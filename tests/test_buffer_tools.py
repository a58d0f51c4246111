"""`pvgate buffer stats / export / salvage`: read-only tools that never change the live buffer,
and the salvage of a damaged file."""

from __future__ import annotations

import csv
import hashlib
import io
import os
from pathlib import Path

import pytest

from agent.cli import main
from agent.store import readonly
from agent.store.buffer import Buffer
from drivers.model import Reading
from support.chain import SimDev, write_site
from support.faults import overwrite_page, page_size


def reading(i: int) -> Reading:
    return Reading(f"inv0{i % 2}", 1_764_403_200_000 + i * 1000, {"ac_power": float(i), "pad": "x" * 400}, [])


def files(path: Path) -> dict[str, str]:
    """Every file beside the buffer, with a digest of its content."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.parent.iterdir()) if p.is_file()}


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return write_site(tmp_path / "site.yaml", site_id="tools", broker_port=1883, modbus_port=502,
                      devices=[SimDev("inv01", 1, "huawei-sun2000")])


def lower_max_mb(site: Path, max_mb: float) -> None:
    text = site.read_text(encoding="utf-8").replace("  commit_interval: 0.2s\n",
                                                    f"  commit_interval: 0.2s\n  max_mb: {max_mb}\n")
    site.write_text(text, encoding="utf-8")


def test_stats_during_an_outage_with_a_lowered_max_mb_prunes_nothing(
        site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An outage filled the buffer; the technician lowers max_mb, then looks: nothing may go."""
    path = tmp_path / "buffer.sqlite"
    live = Buffer(path, max_mb=8, min_free_mb=0)  # the agent, still running
    live.append([reading(i) for i in range(4000)])
    lower_max_mb(site, 0.5)
    before = files(path)
    unsent = live.stats().unsent
    assert main(["buffer", "-c", str(site), "stats"]) == 0
    out = capsys.readouterr().out
    assert f"unsent         {unsent} " in out and f"epoch          {live.epoch}" in out
    assert main(["buffer", "-c", str(site), "export", "--since", "0", "-o", str(tmp_path / "x.csv")]) == 0
    assert files(path) == {**before, "x.csv": files(path)["x.csv"]}, "not a byte changed beside the buffer"
    assert live.stats().unsent == unsent
    live.close()


def test_export_reads_in_chunks_and_in_time_order(site: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "buffer.sqlite"
    buf = Buffer(path, max_mb=8, min_free_mb=0)
    seqs = buf.append([reading(i) for i in range(1000)])
    buf.mark_sent(seqs[:10])
    buf.close()
    monkeypatch.setattr(readonly, "EXPORT_CHUNK", 7)
    out = tmp_path / "out.csv"
    since, until = reading(100).ts_ms, reading(900).ts_ms
    assert main(["buffer", "-c", str(site), "export", "--since", str(since), "--until", str(until),
                 "-o", str(out)]) == 0
    rows = [r for r in csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"))) if r["key"] == "ac_power"]
    assert [float(r["value"]) for r in rows] == [float(i) for i in range(100, 900)]
    db = readonly.connect_ro(path)
    plan = " ".join(str(r) for r in db.execute("EXPLAIN QUERY PLAN SELECT seq FROM record WHERE ts >= 1 AND ts < 2 "
                                                 "ORDER BY ts, seq").fetchall())
    db.close()
    assert "record_ts" in plan, plan


def test_salvage_of_a_file_without_its_header_page_says_so(
        site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "buffer.sqlite"
    buf = Buffer(path, max_mb=8, min_free_mb=0)
    seqs = buf.append([reading(i) for i in range(2000)])
    buf.mark_sent([1, *seqs[:500]])
    buf.close()
    overwrite_page(path, 1)
    Buffer(path, max_mb=8, min_free_mb=0).close()  # the agent's next start sets the file aside
    [aside] = [p for p in tmp_path.iterdir() if ".corrupt-" in p.name and not p.name.endswith(("-wal", "-shm"))]
    kept = aside.read_bytes()
    # the header page is gone: SQLite cannot read this file at all, and salvage says so
    assert main(["buffer", "-c", str(site), "salvage", str(aside), "--csv", str(tmp_path / "s.csv")]) == 73
    assert "cannot be read as a database" in capsys.readouterr().err
    assert main(["buffer", "-c", str(site), "salvage", str(aside)]) == 73
    assert aside.read_bytes() == kept, "the evidence is never changed"


def test_salvage_of_a_damaged_middle_page(site: Path, tmp_path: Path) -> None:
    path = tmp_path / "buffer.sqlite"
    buf = Buffer(path, max_mb=8, min_free_mb=0)
    seqs = buf.append([reading(i) for i in range(2000)])
    buf.mark_sent([1, *seqs[:500]])
    buf.close()
    overwrite_page(path, os.path.getsize(path) // page_size(path) - 3)
    Buffer(path, max_mb=8, min_free_mb=0).close()
    [aside] = [p for p in tmp_path.iterdir() if ".corrupt-" in p.name and not p.name.endswith(("-wal", "-shm"))]
    assert main(["buffer", "-c", str(site), "salvage", str(aside)]) == 0
    buf = Buffer(path, max_mb=8, min_free_mb=0)
    salvaged = [r for r in buf.unsent(0, limit=10**6) if "salvaged" in r.json()]
    old = [int(r.json()["salvaged"]["seq"]) for r in salvaged]  # type: ignore[index]
    assert 0 < len(old) <= 1500 and min(old) > seqs[499] and old == sorted(old)
    assert all(r.ts == reading(s - 2).ts_ms for r, s in zip(salvaged, old)), "original ts kept"
    buf.close()
    out = tmp_path / "s.csv"
    assert main(["buffer", "-c", str(site), "salvage", str(aside), "--csv", str(out), "--all"]) == 0
    lines = [r for r in csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"))) if r["key"] == "ac_power"]
    assert len(lines) >= len(old) and {int(r["seq"]) for r in lines} >= set(old), "--all: sent rows too"
