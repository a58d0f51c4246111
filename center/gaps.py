"""Gaps per (site, epoch): found, announced, asked for again, repaired or recorded as lost.

One worker at a time runs the check (it holds a PostgreSQL advisory lock on its own connection;
if it dies, the lock goes with its connection and another worker takes over). Each check:

1. re-examines the gaps already known: seqs that arrived since shrink or close them (a closed
   gap moves to ``gap_closed`` with how it closed: ``resent`` or ``late``);
2. looks for new holes above the stream's watermark (every seq up to it is stored or in ``gap``);
3. marks holes covered by a ``dropped`` event as ``dropped`` (announced: never asked for);
4. asks a station for its oldest open gap older than ``resend_after`` (``cmd/resend``, at most one
   request per station per ``resend_every``); a request unanswered within ``answer_within`` is
   asked again, up to ``max_requests``, then the gap is ``lost``.

Replies (handled by whichever worker receives them): ``ok: false`` with "no records kept" — the
station no longer keeps the range — records the gap as lost with the station's error as reason
(other refusals, busy or abandoned, leave it open to be asked again); ``done: true`` notes the
time; what is still missing a few seconds later is asked for once more, exactly (the station then
answers that it keeps none of it), or, if it was asked exactly, recorded as lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import psycopg

from center.config import GapSettings

log = logging.getLogger(__name__)

LOCK_ID = 7710014
DONE_GRACE_S = 5.0  # after a done reply, resent records may still be on their way
MAX_SEQS = 100_000  # what one resend request of pvgate covers
Conn = psycopg.Connection[tuple[Any, ...]]
Publish = Callable[[str, str, dict[str, Any]], None]  # (site, command, request)

SEQS = """SELECT seq FROM reading WHERE site = %(site)s AND epoch = %(epoch)s AND seq BETWEEN %(lo)s AND %(hi)s
    UNION ALL SELECT seq FROM event WHERE site = %(site)s AND epoch = %(epoch)s AND seq BETWEEN %(lo)s AND %(hi)s
    UNION ALL SELECT seq FROM report_daily WHERE site = %(site)s AND epoch = %(epoch)s AND seq BETWEEN %(lo)s AND %(hi)s"""
HOLES = f"""SELECT seq + 1, nxt - 1 FROM (SELECT seq, lead(seq) OVER (ORDER BY seq) AS nxt FROM ({SEQS}) s) o
    WHERE nxt > seq + 1 ORDER BY 1"""


def holes(conn: Conn, site: str, epoch: str, lo: int, hi: int) -> list[tuple[int, int]]:
    """Missing seq ranges in lo..hi (the caller knows lo and hi belong to the stream: a stored
    seq, the epoch's first seq, or the bounds of a known gap)."""
    args = {"site": site, "epoch": epoch, "lo": lo, "hi": hi}
    found = [(int(a), int(b)) for a, b in conn.execute(HOLES.encode(), args)]
    ends = conn.execute(f"SELECT min(seq), max(seq) FROM ({SEQS}) s".encode(), args).fetchone()
    if ends is None or ends[0] is None:
        return [(lo, hi)]
    if ends[0] > lo:
        found.insert(0, (lo, int(ends[0]) - 1))
    if ends[1] < hi:
        found.append((int(ends[1]) + 1, hi))
    return found


class GapKeeper:
    def __init__(self, settings: GapSettings, publish: Publish) -> None:
        self.settings = settings
        self.publish = publish
        self.requests_sent = 0

    def check(self, conn: Conn) -> None:
        """One pass over every stream with new records or unfinished gaps."""
        with conn.transaction():
            streams = conn.execute("""SELECT site, epoch, first_seq, max_seq, checked_seq FROM stream
                WHERE dirty OR EXISTS (SELECT 1 FROM gap g WHERE g.site = stream.site AND g.epoch = stream.epoch
                                       AND g.state <> 'lost') ORDER BY site, epoch""").fetchall()
        for site, epoch, first_seq, max_seq, checked in streams:
            with conn.transaction():
                self._stream(conn, site, epoch, first_seq, max_seq, checked)
        with conn.transaction():
            self._resend(conn)

    def _stream(self, conn: Conn, site: str, epoch: str, first_seq: int | None, max_seq: int,
                checked: int | None) -> None:
        conn.execute("UPDATE stream SET dirty = false WHERE site = %s AND epoch = %s", (site, epoch))
        for a, b, state, reason, found, requested, requests, rid, done in conn.execute(
                "SELECT first_seq, last_seq, state, reason, found_at, requested_at, requests, request_id, done_at "
                "FROM gap WHERE site = %s AND epoch = %s AND state <> 'lost' ORDER BY first_seq",
                (site, epoch)).fetchall():
            left = holes(conn, site, epoch, a, b)
            if left == [(a, b)]:
                continue
            conn.execute("DELETE FROM gap WHERE site = %s AND epoch = %s AND first_seq = %s", (site, epoch, a))
            for x, y in left:
                conn.execute("""INSERT INTO gap (site, epoch, first_seq, last_seq, state, reason, found_at,
                    requested_at, requests, request_id, done_at) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)""",
                             (site, epoch, x, y, state, reason, found, requested, requests, rid, done))
            if not left:
                conn.execute("""INSERT INTO gap_closed (site, epoch, first_seq, last_seq, how, requests, found_at)
                    VALUES (%s, %s, %s, %s, %s, %s, %s)""",
                             (site, epoch, a, b, "resent" if requests else "late", requests, found))
                log.info("site=%s epoch=%s gap %d..%d closed (%s)", site, epoch, a, b,
                         "resent" if requests else "late")
        lo = checked if checked is not None else (first_seq if first_seq is not None else None)
        if lo is None:
            row = conn.execute(f"SELECT min(seq) FROM ({SEQS}) s".encode(),
                               {"site": site, "epoch": epoch, "lo": 0, "hi": max_seq}).fetchone()
            lo = int(row[0]) if row is not None and row[0] is not None else max_seq
        for x, y in holes(conn, site, epoch, lo, max_seq):
            conn.execute("""INSERT INTO gap (site, epoch, first_seq, last_seq, state) VALUES (%s,%s,%s,%s,'open')
                ON CONFLICT DO NOTHING""", (site, epoch, x, y))
            log.warning("site=%s epoch=%s gap found: seq %d..%d", site, epoch, x, y)
        conn.execute("UPDATE stream SET checked_seq = %s WHERE site = %s AND epoch = %s", (max_seq, site, epoch))
        self._announced(conn, site, epoch)
        self._expired(conn, site, epoch)

    @staticmethod
    def _announced(conn: Conn, site: str, epoch: str) -> None:
        """Open or asked-for gaps inside a `dropped` event's range: the station said why."""
        conn.execute("""UPDATE gap g SET state = 'dropped', reason = 'dropped by the station: ' || (e.body->>'reason')
            FROM event e WHERE g.site = %s AND g.epoch = %s AND g.state IN ('open', 'requested')
              AND e.site = g.site AND e.kind = 'dropped'
              AND (e.body->>'first_seq')::bigint <= g.first_seq AND (e.body->>'last_seq')::bigint >= g.last_seq""",
                     (site, epoch))

    def _expired(self, conn: Conn, site: str, epoch: str) -> None:
        s = self.settings
        # Done, and still missing: a request that covered more than what is left asks once more for
        # exactly the rest, so that the station says in its own words what it no longer keeps.
        conn.execute("""UPDATE gap SET state = 'open', done_at = NULL WHERE site = %s AND epoch = %s
                AND state = 'requested' AND done_at < now() - make_interval(secs => %s)
                AND request_id NOT LIKE 'gap/' || epoch || '/' || first_seq || '/' || last_seq || '/%%'""",
                     (site, epoch, DONE_GRACE_S))
        conn.execute("""UPDATE gap SET state = 'lost', reason = coalesce(reason, 'resend done') ||
                '; not kept by the station' WHERE site = %s AND epoch = %s AND state = 'requested'
                AND done_at < now() - make_interval(secs => %s)""", (site, epoch, DONE_GRACE_S))
        conn.execute("""UPDATE gap SET state = CASE WHEN requests >= %s THEN 'lost' ELSE 'open' END,
                reason = CASE WHEN requests >= %s THEN 'no answer to ' || requests || ' resend requests' END
            WHERE site = %s AND epoch = %s AND state = 'requested' AND done_at IS NULL
              AND requested_at < now() - make_interval(secs => %s)""",
                     (s.max_requests, s.max_requests, site, epoch, s.answer_within_s))

    def _resend(self, conn: Conn) -> None:
        """The oldest open gap of each station that may be asked now."""
        s = self.settings
        due = conn.execute("""SELECT DISTINCT ON (g.site) g.site, g.epoch, g.first_seq, g.last_seq, g.requests
            FROM gap g LEFT JOIN station st ON st.site = g.site
            WHERE g.state = 'open' AND g.found_at < now() - make_interval(secs => %s)
              AND (st.last_resend_at IS NULL OR st.last_resend_at < now() - make_interval(secs => %s))
            ORDER BY g.site, g.found_at, g.first_seq""", (s.resend_after_s, s.resend_every_s)).fetchall()
        for site, epoch, a, b, requests in due:
            last = min(b, a + MAX_SEQS - 1)
            rid = f"gap/{epoch}/{a}/{last}/{requests + 1}"
            conn.execute("""UPDATE gap SET state = 'requested', requested_at = now(), requests = requests + 1,
                request_id = %s, done_at = NULL WHERE site = %s AND epoch = %s AND first_seq = %s""",
                         (rid, site, epoch, a))
            conn.execute("""INSERT INTO station (site, state, ts, last_resend_at) VALUES (%s, 'unknown', 0, now())
                ON CONFLICT (site) DO UPDATE SET last_resend_at = now()""", (site,))
            self.publish(site, "resend", {"id": rid, "first_seq": a, "last_seq": last})
            self.requests_sent += 1
            log.info("site=%s epoch=%s asked to resend seq %d..%d (request %s)", site, epoch, a, last, rid)


def on_reply(conn: Conn, site: str, reply: dict[str, Any]) -> None:
    """A station's answer to a resend request of ours (ids `gap/<epoch>/<first>/<last>/<n>`)."""
    rid = reply.get("id")
    if not isinstance(rid, str) or not rid.startswith("gap/"):
        return  # someone else's request
    parts = rid.split("/")
    if len(parts) != 5 or not parts[2].isdigit() or not parts[3].isdigit():
        return
    epoch, a, b = parts[1], int(parts[2]), int(parts[3])
    where = "site = %s AND epoch = %s AND first_seq BETWEEN %s AND %s AND state = 'requested' AND request_id = %s"
    args = (site, epoch, a, b, rid)
    error = str(reply.get("error") or "")
    if reply.get("ok") is False and not error.startswith("no records kept"):
        conn.execute(f"UPDATE gap SET state = 'open' WHERE {where}".encode(), args)  # busy, abandoned: ask again
        log.info("site=%s epoch=%s resend %s not served (%s): asked again later", site, epoch, rid, error)
    elif reply.get("ok") is False:
        conn.execute(f"UPDATE gap SET state = 'lost', reason = %s WHERE {where}".encode(),
                     (f"station: {error}"[:500], *args))
        log.warning("site=%s epoch=%s seq %d..%d lost: %s", site, epoch, a, b, error)
    elif reply.get("done") is True:
        records = (reply.get("result") or {}).get("records")
        conn.execute(f"UPDATE gap SET done_at = now(), reason = %s WHERE {where}".encode(),
                     (f"resend done: {records} records", *args))
