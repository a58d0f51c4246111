"""The center's PostgreSQL schema, as numbered migrations applied once each, in order.

Every record a station sends (reading, event, daily report) is keyed by (site, epoch, seq): a
duplicate (QoS 1 redelivery, a replay, a resend) is ignored by the key. ``stream`` is one
(site, epoch) with its highest seq and how far gaps were checked; ``gap`` is the center's view of what is
missing per (site, epoch); settlement and ranking are views over the latest report revisions.
"""

from __future__ import annotations

import logging

import psycopg

log = logging.getLogger(__name__)

MIGRATIONS: list[tuple[int, str, str]] = [
    (1, "records, gaps, stations", """
CREATE TABLE reading (
    site text NOT NULL, epoch text NOT NULL, seq bigint NOT NULL,
    device text NOT NULL, ts bigint NOT NULL, vals jsonb NOT NULL, q jsonb NOT NULL DEFAULT '[]',
    replay boolean NOT NULL DEFAULT false, worker text NOT NULL, received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (site, epoch, seq)
);
CREATE INDEX reading_device_ts ON reading (site, device, ts);
CREATE TABLE event (
    site text NOT NULL, epoch text NOT NULL, seq bigint NOT NULL,
    device text NOT NULL, ts bigint NOT NULL, kind text NOT NULL, body jsonb NOT NULL,
    worker text NOT NULL, received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (site, epoch, seq)
);
CREATE INDEX event_kind ON event (site, kind, ts);
CREATE TABLE stream (
    site text NOT NULL, epoch text NOT NULL,
    first_seq bigint, max_seq bigint NOT NULL, checked_seq bigint, dirty boolean NOT NULL DEFAULT true,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (site, epoch)
);
CREATE TABLE gap (
    site text NOT NULL, epoch text NOT NULL, first_seq bigint NOT NULL, last_seq bigint NOT NULL,
    state text NOT NULL CHECK (state IN ('open', 'dropped', 'requested', 'lost')),
    reason text, found_at timestamptz NOT NULL DEFAULT now(), requested_at timestamptz,
    requests integer NOT NULL DEFAULT 0, request_id text, done_at timestamptz,
    PRIMARY KEY (site, epoch, first_seq)
);
CREATE TABLE gap_closed (
    site text NOT NULL, epoch text NOT NULL, first_seq bigint NOT NULL, last_seq bigint NOT NULL,
    how text NOT NULL, requests integer NOT NULL, found_at timestamptz NOT NULL,
    closed_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE station (
    site text PRIMARY KEY, state text NOT NULL, ts bigint NOT NULL, version text,
    last_resend_at timestamptz, updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE device (
    site text NOT NULL, device text NOT NULL, meta jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (site, device)
);
CREATE TABLE health (
    site text PRIMARY KEY, ts bigint NOT NULL, body jsonb NOT NULL, updated_at timestamptz NOT NULL DEFAULT now()
);
"""),
    (2, "daily reports, settlement and ranking views", """
CREATE TABLE report_daily (
    site text NOT NULL, epoch text NOT NULL, seq bigint NOT NULL,
    day date NOT NULL, revision integer NOT NULL, body jsonb NOT NULL,
    worker text NOT NULL, received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (site, epoch, seq)
);
CREATE INDEX report_daily_day ON report_daily (site, day, revision);
CREATE VIEW report_latest AS
    SELECT DISTINCT ON (site, day) site, day, revision, body
    FROM report_daily ORDER BY site, day, revision DESC, seq DESC;
CREATE VIEW settlement_daily AS
    SELECT site, day, revision, (body->'station'->>'yield_kwh')::numeric AS yield_kwh,
           (body->'station'->>'export_kwh')::numeric AS export_kwh,
           (body->'station'->>'completeness')::numeric AS completeness
    FROM report_latest;
CREATE VIEW settlement_monthly AS
    SELECT site, date_trunc('month', day)::date AS month, sum(yield_kwh) AS yield_kwh,
           sum(export_kwh) AS export_kwh, count(*) AS days, min(completeness) AS worst_completeness
    FROM settlement_daily GROUP BY site, date_trunc('month', day);
CREATE VIEW ranking_daily AS
    SELECT site, day, (body->'station'->>'specific_yield')::numeric AS specific_yield,
           rank() OVER (PARTITION BY day ORDER BY (body->'station'->>'specific_yield')::numeric DESC NULLS LAST) AS rank
    FROM report_latest;
"""),
    (3, "per-stream summary", """
CREATE VIEW stream_status AS
    SELECT s.site, s.epoch, s.first_seq, s.max_seq, s.checked_seq,
           (SELECT count(*) FROM reading r WHERE r.site = s.site AND r.epoch = s.epoch)
         + (SELECT count(*) FROM event e WHERE e.site = s.site AND e.epoch = s.epoch)
         + (SELECT count(*) FROM report_daily d WHERE d.site = s.site AND d.epoch = s.epoch) AS seqs_seen,
           coalesce(sum(g.last_seq - g.first_seq + 1) FILTER (WHERE g.state IN ('open', 'requested')), 0)::bigint AS seqs_open,
           coalesce(sum(g.last_seq - g.first_seq + 1) FILTER (WHERE g.state = 'dropped'), 0)::bigint AS seqs_dropped,
           coalesce(sum(g.last_seq - g.first_seq + 1) FILTER (WHERE g.state = 'lost'), 0)::bigint AS seqs_lost,
           count(g.*) AS gaps
    FROM stream s LEFT JOIN gap g ON g.site = s.site AND g.epoch = s.epoch
    GROUP BY s.site, s.epoch, s.first_seq, s.max_seq, s.checked_seq;
"""),
]


def migrate(conn: psycopg.Connection[tuple[object, ...]]) -> list[int]:
    """Apply what is missing, each migration in its own transaction; returns the versions applied.
    Several workers starting at once serialise on an advisory lock."""
    applied: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(7710013)")
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migration (version integer PRIMARY KEY, "
                     "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        done = {row[0] for row in conn.execute("SELECT version FROM schema_migration")}
        for version, name, sql in MIGRATIONS:
            if version in done:
                continue
            conn.execute(sql.encode())
            conn.execute("INSERT INTO schema_migration (version, name) VALUES (%s, %s)", (version, name))
            applied.append(version)
            log.info("database schema migrated to %d (%s)", version, name)
    return applied
