"""The center's side over real parts: a private PostgreSQL, mosquitto, five stations (pvgate-sim
and pvgate run each) and two pvgate-center workers on one shared subscription. Through a broker
outage, kill -9 of a worker and of an agent, and a gap forced into one station's buffer (rows
deleted before they were sent, unannounced), the database ends with every record of every
station exactly once, and their status, meta and health; the forced gap is recorded as lost with the station's reason; both workers
stored a share."""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from support.chain import SimDev, start_agent, start_sim, write_site
from support.ports import free_port
from support.postgres import Postgres
from support.procs import Proc
from support.schemas import validate_all

pytestmark = [pytest.mark.slow, pytest.mark.contract]
SITES = ["east-1", "east-2", "west-1", "west-2", "north-1"]
DEV = [SimDev("inv01", 1, "huawei-sun2000")]
FORCED, KILLED = "west-1", "east-2"


def _center(procs: Callable[..., Proc], tmp: Path, name: str, broker_port: int, pg: Postgres) -> Proc:
    path = tmp / f"{name}.yaml"
    path.write_text(f"mqtt:\n  host: 127.0.0.1\n  port: {broker_port}\n  client_id: {name}\n  share_group: county\n"
                    f"  keepalive: 5s\npostgres:\n  dsn: {pg.dsn()}\ningest:\n  batch_wait: 50ms\n"
                    "gaps:\n  check_every: 1s\n  resend_after: 2s\n  resend_every: 1s\n  answer_within: 10s\n",
                    encoding="utf-8")
    proc = procs([sys.executable, "-m", "center.cli", "run", "-c", str(path)], name)
    proc.wait_for_line(r"connected to", timeout=20, stream="stderr")
    return proc


def _buffer(path: Path) -> dict[int, tuple[int, str]]:
    """seq -> (kind, body) of every record kept in a station's buffer (sent ones are kept too)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {s: (k, b) for s, k, b in db.execute("SELECT seq, kind, body FROM record")}
    finally:
        db.close()


def _stored(conn: Any, site: str) -> dict[int, Any]:
    rows = conn.execute("SELECT seq, vals FROM reading WHERE site = %s UNION ALL "
                        "SELECT seq, NULL FROM event WHERE site = %s", (site, site)).fetchall()
    return dict(rows)


def _force_gap(buffer: Path) -> tuple[int, int]:
    """Delete a run of unsent records from the middle of the unsent ones (the agent is stopped)."""
    db = sqlite3.connect(str(buffer))
    try:
        unsent = [r[0] for r in db.execute("SELECT seq FROM unsent ORDER BY seq")]
        assert len(unsent) >= 6, f"the outage left only {len(unsent)} unsent records"
        mid = len(unsent) // 2
        first, last = unsent[mid - 1], unsent[mid + 1]
        db.execute("DELETE FROM record WHERE seq BETWEEN ? AND ?", (first, last))
        db.execute("DELETE FROM unsent WHERE seq BETWEEN ? AND ?", (first, last))
        db.commit()
    finally:
        db.close()
    return first, last


def _wait(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.5)


def test_every_record_once_through_outage_kills_and_a_forced_gap(
        tmp_path: Path, postgres: Postgres, broker: Any, collector_factory: Any, procs: Callable[..., Proc]) -> None:
    col = collector_factory(["pvgate/#"])
    workers = {n: _center(procs, tmp_path, n, broker.port, postgres) for n in ("center-a", "center-b")}
    time.sleep(0.5)  # subscribed
    agents: dict[str, Proc] = {}
    sites: dict[str, Path] = {}
    for site in SITES:
        port = free_port()
        start_sim(procs, port, DEV, speed=60)
        (tmp_path / site).mkdir()
        sites[site] = write_site(tmp_path / site / "site.yaml", site_id=site, broker_port=broker.port,
                                 modbus_port=port, devices=DEV, interval="500ms")
        agents[site] = start_agent(procs, sites[site], name=f"agent-{site}")
    conn = psycopg.connect(postgres.dsn(), autocommit=True)
    try:
        _wait("readings of every station", lambda: all(len(_stored(conn, s)) >= 5 for s in SITES), 30)
        workers["center-b"].kill9()  # a worker dies with messages in hand; its session keeps the rest
        agents[KILLED].kill9()
        time.sleep(2)
        workers["center-b"] = _center(procs, tmp_path, "center-b", broker.port, postgres)
        agents[KILLED] = start_agent(procs, sites[KILLED], name=f"agent-{KILLED}-2")
        time.sleep(2)
        broker.stop()  # the county broker goes down; the stations buffer
        time.sleep(4)
        agents[FORCED].kill9()
        forced = _force_gap(tmp_path / FORCED / "buffer.sqlite")
        broker.start()
        agents[FORCED] = start_agent(procs, sites[FORCED], name=f"agent-{FORCED}-2")
        time.sleep(3)

        def complete() -> bool:
            return all(set(_buffer(tmp_path / s / "buffer.sqlite")) <= set(_stored(conn, s)) for s in SITES)

        def forced_lost() -> bool:
            row = conn.execute("SELECT state FROM gap WHERE site = %s AND first_seq = %s AND last_seq = %s",
                               (FORCED, *forced)).fetchone()
            return row is not None and row[0] == "lost"

        _wait("every buffered record in PostgreSQL and the forced gap settled",
              lambda: complete() and forced_lost(), 60)
        for site in SITES:
            assert agents[site].terminate(timeout=15) == 0
        _wait("the records of the clean stops", complete, 20)
        _wait("every station offline", lambda: conn.execute(
            "SELECT count(*) FROM station WHERE state = 'offline'").fetchone() == (len(SITES),), 20)
        meta = conn.execute("SELECT site, meta->>'profile' FROM device ORDER BY site").fetchall()
        assert meta == [(s, "huawei-sun2000") for s in sorted(SITES)]
        assert conn.execute("SELECT count(*) FROM health").fetchone() == (len(SITES),)
        _check(conn, tmp_path, forced)
    finally:
        conn.close()
    for proc in workers.values():
        assert proc.terminate(timeout=15) == 0
    assert validate_all(col.messages(), requests=True) > 0  # the center's resend requests too


def _check(conn: Any, tmp_path: Path, forced: tuple[int, int]) -> None:
    for site in SITES:
        kept = _buffer(tmp_path / site / "buffer.sqlite")
        stored = _stored(conn, site)
        assert set(stored) == set(kept), f"{site}: extra {sorted(set(stored) - set(kept))[:10]}"
        for seq, (kind, body) in kept.items():  # the same content, once (the key forbids twice)
            if stored[seq] is not None:
                assert stored[seq] == json.loads(body)["values"], (site, seq)
        epochs = conn.execute("SELECT count(DISTINCT epoch) FROM reading WHERE site = %s", (site,)).fetchone()
        assert epochs == (1,)
    reason = conn.execute("SELECT reason FROM gap WHERE site = %s AND first_seq = %s AND last_seq = %s",
                          (FORCED, *forced)).fetchone()
    assert reason is not None and "no records kept" in reason[0], reason
    other = conn.execute("SELECT site, first_seq, last_seq, state, reason FROM gap WHERE state <> 'lost' "
                         "OR site <> %s OR first_seq <> %s", (FORCED, forced[0])).fetchall()
    assert other == [], f"gaps left open: {other}"
    shares = dict(conn.execute("SELECT worker, count(*) FROM reading GROUP BY worker").fetchall())
    assert set(shares) == {"center-a", "center-b"} and min(shares.values()) > 0, shares
