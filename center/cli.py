"""``pvgate-center``: the reference ingest's command line.

    pvgate-center run -c center.yaml       one worker (start several with one share_group)
    pvgate-center check -c center.yaml     validate the file: exit 0, or errors and exit 78
    pvgate-center migrate -c center.yaml   bring the database schema up to date and exit
    pvgate-center gaps -c center.yaml      the gaps still open or recorded as lost, per station
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from types import FrameType

import psycopg

from center.config import EX_CONFIG, CenterConfig, ConfigError, load
from center.schema import migrate

log = logging.getLogger("center")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pvgate-center", description="Reference ingest for pvgate stations: "
                                     "MQTT 5 shared subscription to PostgreSQL")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "run one ingest worker"), ("check", "validate the configuration file"),
                       ("migrate", "apply database migrations and exit"), ("gaps", "list unfinished and lost gaps")):
        p = sub.add_parser(name, help=text)
        p.add_argument("-c", "--config", required=True, help="center.yaml")
        p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load(args.config)
    except ConfigError as err:
        for problem in err.problems:
            print(problem, file=sys.stderr)
        return EX_CONFIG
    if args.command == "check":
        print(f"{cfg.file}: ok (broker {cfg.mqtt.host}:{cfg.mqtt.port}, prefix {cfg.mqtt.topic_prefix}, "
              f"share group {cfg.mqtt.share_group})")
        return 0
    try:
        return _command(args.command, cfg)
    except psycopg.OperationalError as err:
        log.error("cannot reach PostgreSQL (postgres.dsn in %s): %s", cfg.file, str(err).strip().splitlines()[0])
        return 69  # EX_UNAVAILABLE


def _command(command: str, cfg: CenterConfig) -> int:
    if command == "migrate":
        with psycopg.connect(cfg.dsn, autocommit=True) as conn:
            applied = migrate(conn)
        print(f"schema up to date ({'applied ' + ', '.join(map(str, applied)) if applied else 'nothing to do'})")
        return 0
    if command == "gaps":
        with psycopg.connect(cfg.dsn, autocommit=True) as conn:
            rows = conn.execute("SELECT site, epoch, first_seq, last_seq, state, requests, coalesce(reason, '') "
                                "FROM gap ORDER BY site, epoch, first_seq").fetchall()
        for row in rows:
            print("\t".join(map(str, row)))
        return 0
    from center.ingest import Worker  # paho only where it is needed

    worker = Worker(cfg)

    def _stop(signum: int, frame: FrameType | None) -> None:
        worker.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
