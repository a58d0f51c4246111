"""`pvgate` command line (Contract 3). User mistakes end in a message and an exit code, never a traceback."""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from agent import __version__
from agent import i18n
from agent.config import DEFAULT_SITE_FILE, EX_CONFIG, SiteConfig, format_problems, load_site, site_language
from agent.i18n import _
from agent.logutil import setup as setup_logging
from drivers.errors import ConfigError, PvgateError, StorageError

EX_OK = 0
EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CANTCREAT = 73


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _early_language(argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return EX_USAGE
    choose_language(args)
    try:
        code: int = args.func(args)
        return code
    except ConfigError as err:
        # `run` writes to the journal, which stays English (what a developer greps) unless --lang says otherwise.
        journal = args.func is cmd_run and args.lang is None
        print(format_problems(err, "en" if journal else None), file=sys.stderr)
        return EX_CONFIG
    except StorageError as err:
        print(f"pvgate: {err}", file=sys.stderr)
        return EX_CANTCREAT
    except PvgateError as err:
        print(f"pvgate: {err}", file=sys.stderr)
        return EX_UNAVAILABLE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `pvgate check ... | head`: the reader left; no traceback, and none at exit either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EX_OK


def choose_language(args: argparse.Namespace) -> str:
    """What the command speaks: --lang, else the site file's site.language, else the locale.

    The site file is read leniently for it, before the command loads it: `check` of a file with
    problems reports them in the file's language too."""
    lang: str | None = getattr(args, "lang", None)
    config = getattr(args, "config", None)
    if lang is None and isinstance(config, str) and config:
        lang = site_language(config)
    return i18n.set_language(lang)


def _early_language(argv: list[str]) -> None:
    """The language of --help and of argparse's own errors, before argparse has read the line:
    --lang or the site file's site.language, as choose_language decides after parsing."""
    lang = config = None
    for i, arg in enumerate(argv):
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if arg == "--lang" or arg.startswith("--lang="):
            lang = arg.partition("=")[2] or nxt
        elif arg in ("-c", "--config") or arg.startswith("--config="):
            config = arg.partition("=")[2] or nxt
    if i18n.normalize(lang) is None and config:
        lang = site_language(config)
    i18n.set_language(lang)


def _lang(text: str) -> str:
    lang = i18n.normalize(text)
    if lang is None:
        raise argparse.ArgumentTypeError(f"{text!r}: expected one of {', '.join(i18n.LANGUAGES)}")
    return lang


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pvgate", description=_("Edge data logger for PV stations: Modbus -> buffer -> MQTT"))
    p.add_argument("--version", action="version", version=f"pvgate {__version__}")
    p.add_argument("--lang", type=_lang, default=None, metavar="LANG",
                   help=_("language of what the command prints: zh-CN or en (default: the site file's "
                          "site.language, else the locale)"))
    sub = p.add_subparsers(metavar="COMMAND")

    run = sub.add_parser("run", help=_("run the agent (what systemd starts)"))
    run.add_argument("-c", "--config", default=DEFAULT_SITE_FILE, help=f"site file (default {DEFAULT_SITE_FILE})")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help=_("validate the site file and its device maps"))
    check.add_argument("-c", "--config", default=DEFAULT_SITE_FILE,
                       help=_("site file (default {path})").format(path=DEFAULT_SITE_FILE))
    check.add_argument("-q", "--quiet", action="store_true", help=_("print nothing when the file is valid"))
    check.set_defaults(func=cmd_check)

    buf = sub.add_parser("buffer", help=_("buffer statistics, CSV export, salvage of a damaged file"))
    buf.add_argument("-c", "--config", default=DEFAULT_SITE_FILE, help=f"site file (default {DEFAULT_SITE_FILE})")
    bsub = buf.add_subparsers(metavar="ACTION")
    stats = bsub.add_parser("stats", help="rows, unsent, oldest unsent, size (read-only)")
    stats.set_defaults(func=cmd_buffer_stats)
    export = bsub.add_parser("export", help="readings of a time range as CSV (read-only)")
    export.add_argument("--since", required=True, help="UTC time, e.g. 2026-11-29T08:00 or epoch ms")
    export.add_argument("--until", default=None, help="UTC time (default: now)")
    export.add_argument("-o", "--output", default="-", help="file (default: standard output)")
    export.set_defaults(func=cmd_buffer_export)
    salvage = bsub.add_parser("salvage", help="copy what is readable of a damaged buffer file (*.corrupt-*) "
                                              "into the buffer as unsent records, or export it as CSV")
    salvage.add_argument("file", help="the damaged file, e.g. buffer.sqlite.corrupt-20261203T081500Z")
    salvage.add_argument("--csv", default=None, metavar="OUT", help="write CSV to OUT ('-': standard output) "
                                                                    "instead of copying into the buffer")
    salvage.add_argument("--all", action="store_true", help="also rows that were already sent")
    salvage.set_defaults(func=cmd_buffer_salvage)
    buf.set_defaults(func=cmd_buffer_stats)

    demo = sub.add_parser("demo", help=_("simulator + agent + broker + live view, on this machine"))
    demo.add_argument("--seconds", type=float, default=0, help="stop after this long (default: until Ctrl-C)")
    demo.add_argument("--speed", type=float, default=60.0, help="simulator clock speed (default 60x)")
    demo.add_argument("--dir", default=None, help="working directory (default: a temporary one)")
    demo.add_argument("--broker", choices=("auto", "mosquitto", "embedded"), default="auto",
                      help="mosquitto if installed (auto), or the embedded amqtt broker (pip install 'pvgate[demo]')")
    demo.set_defaults(func=cmd_demo)

    from agent.commission import commissioning  # the commissioning commands live in their own module

    commissioning.add_commands(sub)
    from agent.service import status  # `pvgate status` lives beside the agent's status socket

    status.add_command(sub)
    from agent.commission import scan  # `pvgate scan` and `pvgate read`, for commissioning

    scan.add_commands(sub)
    from agent.service import reportcmd  # `pvgate report`: the daily energy report from the buffer

    reportcmd.add_command(sub)
    return p


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_site(args.config)
    setup_logging(cfg.agent.log_level)
    from agent.service.runtime import Agent

    agent = Agent(cfg)
    return asyncio.run(agent.run())


def cmd_check(args: argparse.Namespace) -> int:
    cfg = load_site(args.config)
    if not args.quiet:
        _print_summary(cfg)
    return EX_OK


def _print_summary(cfg: SiteConfig) -> None:
    print(_("{file}: OK — site {site} ({name}), broker {host}:{port}{tls}, buffer {buffer} (max {max_mb:g} MB)")
          .format(file=cfg.file, site=cfg.site.id, name=cfg.site.name, host=cfg.mqtt.host, port=cfg.mqtt.port,
                  tls=" TLS" if cfg.mqtt.tls else "", buffer=cfg.buffer.path, max_mb=cfg.buffer.max_mb))
    for link in cfg.links:
        devs = cfg.devices_on(link.id)
        print(_("  link {link} ({type} {endpoint}): {n} device(s)").format(
            link=link.id, type=link.type.value, endpoint=link.endpoint, n=len(devs)))
        for d in devs:
            print(_("    {device}: unit {unit}, {profile}, every {interval:g}s, {n} points").format(
                device=d.id, unit=d.unit, profile=d.profile.id, interval=d.interval_s, n=len(d.profile.points)))
    from agent.commission.budget import budget_warnings

    for warning in budget_warnings(cfg):
        print(_("  warning: {warning}").format(warning=warning))


def _open_buffer(args: argparse.Namespace) -> "tuple[SiteConfig, sqlite3.Connection]":
    """Read-only (mode=ro): the tools never prune, vacuum, checkpoint or migrate the live buffer."""
    from agent.store import readonly

    cfg = load_site(args.config)
    path = Path(cfg.buffer.path)
    if not path.exists():
        raise StorageError(f"no buffer at {path} (has the agent run yet?)")
    try:
        return cfg, readonly.connect_ro(path)
    except sqlite3.Error as err:
        raise StorageError(f"cannot read buffer {path}: {err}") from err


def cmd_buffer_stats(args: argparse.Namespace) -> int:
    from agent.store import readonly

    cfg, db = _open_buffer(args)
    try:
        s = readonly.stats(db, Path(cfg.buffer.path), int(cfg.buffer.max_mb * 1024 * 1024))
    except sqlite3.Error as err:
        raise StorageError(f"cannot read buffer {cfg.buffer.path}: {err}") from err
    finally:
        db.close()
    age = f"{(time.time() * 1000 - s.oldest_unsent_ts) / 1000:.0f}s" if s.oldest_unsent_ts else "-"
    print(f"buffer {cfg.buffer.path}")
    print(f"  epoch          {s.epoch or '-'}")
    print(f"  rows kept      {s.total}")
    print(f"  unsent         {s.unsent} (oldest {age} ago)")
    print(f"  last seq       {s.last_seq}")
    print(f"  dropped unsent {s.dropped_unsent}")
    print(f"  size           {s.size_bytes / 1e6:.2f} MB of {s.budget_bytes / 1e6:.2f} MB")
    return EX_OK


def _parse_time(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        dt = datetime.fromisoformat(text)
    except ValueError as err:
        raise PvgateError(f"not a time: {text!r}; expected e.g. 2026-11-29T08:00 (UTC) or epoch ms") from err
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp() * 1000)


def cmd_buffer_export(args: argparse.Namespace) -> int:
    from agent.store import readonly

    cfg, db = _open_buffer(args)
    since = _parse_time(args.since)
    until = _parse_time(args.until) if args.until else int(time.time() * 1000)
    try:
        if args.output == "-":
            n = readonly.export_csv(readonly.iter_data(db, since, until), sys.stdout)
        else:
            with open(args.output, "w", encoding="utf-8", newline="") as fh:
                n = readonly.export_csv(readonly.iter_data(db, since, until), fh)
    except sqlite3.Error as err:
        raise StorageError(f"cannot read buffer {cfg.buffer.path}: {err}") from err
    finally:
        db.close()
    print(f"{n} readings exported", file=sys.stderr)
    return EX_OK


def cmd_buffer_salvage(args: argparse.Namespace) -> int:
    """A damaged file's readable rows: as CSV, or into the buffer (with the agent stopped: the
    buffer has one writer, limits.md §3)."""
    from agent.store import salvage

    cfg = load_site(args.config)
    damaged = Path(args.file)
    if not damaged.is_file():
        raise StorageError(f"no file {damaged}")
    if args.csv:
        if args.csv == "-":
            got = salvage.to_csv(damaged, sys.stdout, args.all)
        else:
            with open(args.csv, "w", encoding="utf-8", newline="") as fh:
                got = salvage.to_csv(damaged, fh, args.all)
        print(f"{got.rows} records exported from {damaged} ({got.skipped} unreadable seqs skipped)", file=sys.stderr)
        return EX_OK
    if _agent_running(cfg):
        raise StorageError("the agent is running: stop it first (systemctl stop pvgate), salvage, then start it")
    from agent.store.buffer import Buffer

    buf = Buffer(cfg.buffer.path, cfg.buffer.max_mb, cfg.buffer.keep_sent_days, cfg.buffer.min_free_mb)
    try:
        got, seqs = salvage.into_buffer(buf, damaged, args.all)
    finally:
        buf.close()
    what = "unsent records" if got.only_unsent else "records"
    span = f" as seq {seqs[0]}..{seqs[-1]}" if seqs else ""
    print(f"{got.rows} {what} salvaged from {damaged} (its seq {got.first_seq}..{got.last_seq}){span}, "
          f"{got.skipped} unreadable seqs skipped; they are published with the backlog", file=sys.stderr)
    return EX_OK


def _agent_running(cfg: SiteConfig) -> bool:
    import socket

    from agent.service.status import find_socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(find_socket(cfg.agent.state_dir)))
            return True
        except OSError:
            return False


def cmd_demo(args: argparse.Namespace) -> int:
    from agent.commission.demo import run_demo

    return run_demo(seconds=args.seconds, speed=args.speed, workdir=args.dir, broker=args.broker)


if __name__ == "__main__":
    sys.exit(main())
