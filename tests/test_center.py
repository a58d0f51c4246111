"""pvgate-center against a real PostgreSQL: configuration errors, dedupe on (site, epoch, seq),
gaps found, announced, asked for and recorded as lost, settlement views."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from center import gaps, store
from center.config import GapSettings
from center.schema import migrate
from support.ports import free_port
from support.postgres import Postgres

EPOCH = "00112233445566aa"
PY = sys.executable


def _data(site: str, seqs: list[int], device: str = "inv01") -> bytes:
    return json.dumps({"v": 1, "site": site, "device": device, "epoch": EPOCH, "readings": [
        {"seq": s, "ts": 1764403210000 + s, "values": {"ac_power": 1.5, "energy_total": 100.0 + s}, "q": []}
        for s in seqs]}).encode()


def _event(site: str, seq: int, event: str, **extra: Any) -> bytes:
    return json.dumps({"v": 1, "site": site, "device": "_site", "epoch": EPOCH, "seq": seq, "ts": 1,
                       "event": event, **extra}).encode()


@pytest.fixture
def db(postgres: Postgres) -> Any:
    with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
        migrate(conn)
        store.prepare(conn)
        yield conn


def _store(conn: Any, *msgs: tuple[str, bytes], worker: str = "w1") -> store.Written:
    batch = store.Batch()
    for topic, payload in msgs:
        batch.add(topic, payload, "pvgate")
    with conn.transaction():
        written = store.write(conn, batch, worker)
        for site, reply in batch.replies:
            gaps.on_reply(conn, site, reply)
    return written


def test_check_reports_file_and_line_and_exits_78(tmp_path: Path) -> None:
    path = tmp_path / "center.yaml"
    path.write_text("mqtt:\n  host: 127.0.0.1\n  port: 99999\n  colour: blue\npostgres:\n  dsn: postgresql:///x\n")
    out = subprocess.run([PY, "-m", "center.cli", "check", "-c", str(path)], capture_output=True, text=True)
    assert out.returncode == 78, out
    assert f"{path}:3: mqtt.port:" in out.stderr and f"{path}:4: mqtt.colour: unknown key" in out.stderr
    assert "Traceback" not in out.stderr
    path.write_text("mqtt:\n  host: 127.0.0.1\n")
    out = subprocess.run([PY, "-m", "center.cli", "check", "-c", str(path)], capture_output=True, text=True)
    assert out.returncode == 78 and "postgres.dsn: required" in out.stderr
    path.write_text("mqtt: {host: h}\npostgres: {dsn: 'postgresql:///x'}\ngaps: {resend_after: 2s}\n")
    out = subprocess.run([PY, "-m", "center.cli", "check", "-c", str(path)], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout
    path.write_text(f"mqtt: {{host: h}}\npostgres: {{dsn: 'postgresql://x@127.0.0.1:{free_port()}/none'}}\n")
    out = subprocess.run([PY, "-m", "center.cli", "migrate", "-c", str(path)], capture_output=True, text=True)
    assert out.returncode == 69 and "cannot reach PostgreSQL" in out.stderr and "Traceback" not in out.stderr


def test_duplicates_are_ignored_by_the_key(db: Any) -> None:
    first = _store(db, ("pvgate/s1/data/inv01", _data("s1", [1, 2, 3])), ("pvgate/s1/data/inv01", _data("s1", [3, 4])))
    assert first.readings == 4
    again = _store(db, ("pvgate/s1/data/inv01", _data("s1", [1, 2, 3, 4, 5])), worker="w2")
    assert again.readings == 1
    rows = db.execute("SELECT seq, worker FROM reading WHERE site='s1' ORDER BY seq").fetchall()
    assert rows == [(1, "w1"), (2, "w1"), (3, "w1"), (4, "w1"), (5, "w2")]
    status = json.dumps({"state": "online", "ts": 5, "version": "0.1.0"}).encode()
    _store(db, ("pvgate/s1/status", status), ("pvgate/s1/events/_site", _event("s1", 6, "buffer_reset",
                                                                                reason="new", epoch=EPOCH, first_seq=1)))
    assert db.execute("SELECT state FROM station WHERE site='s1'").fetchone() == ("online",)
    assert db.execute("SELECT first_seq, max_seq FROM stream WHERE site='s1'").fetchone() == (1, 6)
    for bad in (b'{"v":1,"readings":[{"seq":1}]}', _data("s1", [7]).replace(b"1.5", b"NaN"),
                _data("s1", [7]).replace(b'"seq": 7', b'"seq": 0'), b"[1]", b"\xff"):
        with pytest.raises(store.BadMessage):
            store.Batch().add("pvgate/s1/data/inv01", bad, "pvgate")


def test_gaps_are_found_announced_asked_for_and_lost_with_the_stations_reason(db: Any) -> None:
    sent: list[tuple[str, str, dict[str, Any]]] = []
    keeper = gaps.GapKeeper(GapSettings(resend_after_s=0.0, resend_every_s=0.0), lambda *a: sent.append(a))
    _store(db, ("pvgate/s2/data/inv01", _data("s2", [1, 2, 3, 6, 7, 9, 12])),
           ("pvgate/s2/events/_site", _event("s2", 13, "dropped", first_seq=8, last_seq=8, count=1, reason="buffer full")))
    keeper.check(db)
    rows = db.execute("SELECT first_seq, last_seq, state FROM gap WHERE site='s2' ORDER BY 1").fetchall()
    assert rows == [(4, 5, "requested"), (8, 8, "dropped"), (10, 11, "open")], "one request per station per check"
    assert sent == [("s2", "resend", {"id": f"gap/{EPOCH}/4/5/1", "first_seq": 4, "last_seq": 5})]
    # The station no longer keeps 4..5: lost, with its words.
    reply = {"v": 1, "id": f"gap/{EPOCH}/4/5/1", "command": "resend", "ok": False, "ts": 1,
             "error": "no records kept in seq 4..5; kept now: seq 9..12"}
    _store(db, ("pvgate/s2/reply/resend", json.dumps(reply).encode()))
    assert db.execute("SELECT state, reason FROM gap WHERE site='s2' AND first_seq=4").fetchone() == (
        "lost", "station: no records kept in seq 4..5; kept now: seq 9..12")
    # 10..11 asked next; 10 arrives (resent), then 11 after a done reply: the gap closes as resent.
    keeper.check(db)
    assert sent[-1][2]["first_seq"] == 10
    _store(db, ("pvgate/s2/data/inv01", _data("s2", [10])))
    keeper.check(db)
    assert db.execute("SELECT first_seq, last_seq FROM gap WHERE site='s2' AND state<>'lost' AND state<>'dropped'").fetchall() == [(11, 11)]
    _store(db, ("pvgate/s2/data/inv01", _data("s2", [11, 14])))
    keeper.check(db)
    assert db.execute("SELECT first_seq, last_seq, how, requests FROM gap_closed WHERE site='s2'").fetchall() == [
        (11, 11, "resent", 1)], "what is left of a gap keeps its history"
    assert db.execute("SELECT count(*) FROM gap WHERE site='s2' AND state IN ('open','requested')").fetchone() == (0,)
    assert db.execute("SELECT seqs_seen, seqs_open, seqs_dropped, seqs_lost, gaps FROM stream_status "
                      "WHERE site='s2'").fetchone() == (11, 0, 1, 2, 2)


def test_settlement_views_take_the_latest_revision(db: Any) -> None:
    def report(seq: int, revision: int, kwh: float) -> tuple[str, bytes]:
        body = {"v": 1, "site": "s3", "epoch": EPOCH, "seq": seq, "ts": 1, "date": "2026-12-03",
                "timezone": "Asia/Shanghai", "revision": revision,
                "station": {"yield_kwh": kwh, "specific_yield": kwh / 100, "export_kwh": kwh, "completeness": 1.0}}
        return "pvgate/s3/report/daily", json.dumps(body).encode()

    _store(db, report(1, 0, 400.0), report(2, 1, 412.5), report(2, 1, 412.5))
    assert db.execute("SELECT count(*) FROM report_daily WHERE site='s3'").fetchone() == (2,)
    assert db.execute("SELECT yield_kwh, revision FROM settlement_daily WHERE site='s3'").fetchone() == (412.5, 1)
    assert db.execute("SELECT yield_kwh, days FROM settlement_monthly WHERE site='s3'").fetchone() == (412.5, 1)
    assert db.execute("SELECT rank FROM ranking_daily WHERE site='s3'").fetchone() == (1,)
