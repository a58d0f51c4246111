"""`pvgate commission`: the acceptance check a county inspector asks for, and its report.

Without the agent (it talks to the devices and the broker itself, like `scan` and `read`):
every device answers and reports the model, serial number and rated power the site file
declares (`devices[].expect`); every point decodes to a plausible value; each RS-485 bus keeps up
with its intervals; the broker takes the configured TLS and login and acknowledges a test
message; the clock is synchronised. The readings taken meanwhile are plotted in the report, which
is written as Markdown and as one self-contained HTML file for the technician to hand over.

Exit codes: 0 every check passed (warnings allowed), 1 a check failed, 64 usage, 73 the report
cannot be written, 78 a bad site file. docs/commissioning.md, "Acceptance report".
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Any

from agent import __version__, i18n
from agent.commission.acceptance_devices import judge, read_link
from agent.commission.acceptance_model import FAIL, PASS, WARN, Acceptance, Check
from agent.commission.acceptance_station import blocked_links, check_agent, check_broker, check_budget, check_clock
from agent.config import DEFAULT_SITE_FILE, SiteConfig
from agent.i18n import _

EX_OK, EX_FAILED, EX_USAGE, EX_CANTCREAT = 0, 1, 64, 73
DEFAULT_DURATION_S = 30.0
MAX_SAMPLES = 12


def add_commission(sub: Any) -> None:
    p = sub.add_parser(
        "commission", help="acceptance check of the station, written as a report to hand over",
        description="Check every device (answers, identity as the site file declares it, plausible readings), "
                    "the bus budget, the broker (TLS, login, a test message acknowledged) and the clock, and "
                    "write the acceptance report as Markdown and HTML. Stop the agent first. Exit 0 when every "
                    "check passed, 1 when one failed, 78 for a bad site file.")
    p.add_argument("-c", "--config", default=DEFAULT_SITE_FILE, help=f"site file (default {DEFAULT_SITE_FILE})")
    p.add_argument("-o", "--output", default=".", metavar="DIR", help="where the report goes (default: here)")
    p.add_argument("--lang", choices=i18n.LANGUAGES, default=None,
                   help="language of the report (default: the site file's site.language, else the locale)")
    p.add_argument("--duration", type=_duration, default=DEFAULT_DURATION_S, metavar="S",
                   help=f"seconds of readings for the plot (default {DEFAULT_DURATION_S:g})")
    p.add_argument("-v", "--verbose", action="store_true", help="show pymodbus's own messages")
    p.set_defaults(func=cmd_commission)


def _duration(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds, e.g. 30") from None
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text}: expected 0..3600 seconds")
    return value


def cmd_commission(args: argparse.Namespace) -> int:
    from agent.commission.acceptance_report import write_reports
    from agent.config import load_site

    cfg = load_site(args.config)  # a bad file: ConfigError, which `pvgate` turns into exit 78
    i18n.set_language(args.lang or cfg.site.language)
    if not args.verbose:
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
        logging.getLogger("drivers").setLevel(logging.CRITICAL)  # the report says it, once
    out = Path(args.output)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"pvgate: {out}: {err.strerror}", file=sys.stderr)
        return EX_CANTCREAT
    print(_("Acceptance check of {name} ({id}): {n} devices, {s:g} s of readings ...").format(
        name=cfg.site.name, id=cfg.site.id, n=len(cfg.devices), s=args.duration), file=sys.stderr, flush=True)
    result = asyncio.run(run_acceptance(cfg, args.duration))
    try:
        paths = write_reports(result, out)
    except OSError as err:
        print(f"pvgate: {out}: {err.strerror}", file=sys.stderr)
        return EX_CANTCREAT
    print(console_summary(result))
    for path in paths:
        print(_("report: {path}").format(path=path))
    return EX_OK if result.passed else EX_FAILED


async def run_acceptance(cfg: SiteConfig, duration_s: float) -> Acceptance:
    """Every check; the links are read side by side while the broker is tried in a thread."""
    loc = (cfg.site.lat, cfg.site.lon) if cfg.site.lat is not None and cfg.site.lon is not None else None
    result = Acceptance(cfg.file, cfg.site.id, cfg.site.name, cfg.site.capacity_kwp, cfg.site.timezone, loc,
                        int(time.time() * 1000), duration_s, __version__, i18n.language())
    result.station_checks.append(check_agent(cfg))
    blocked = blocked_links(cfg)
    samples = max(1, min(MAX_SAMPLES, int(duration_s // 2.5) + 1))
    broker = asyncio.create_task(asyncio.to_thread(check_broker, cfg))
    links = [read_link(link, cfg.devices_on(link.id), duration_s, samples, blocked.get(link.id, ""))
             for link in cfg.links]
    per_link = await asyncio.gather(*links)
    by_id = {r.device.id: r for rs in per_link for r in rs}
    result.devices = [by_id[d.id] for d in cfg.devices]
    for r in result.devices:
        judge(r, cfg.site.capacity_kwp)
    result.station_checks += await broker
    result.station_checks.append(check_clock(cfg))
    result.station_checks += check_budget(cfg, measured_load(result))
    return result


def measured_load(result: Acceptance) -> dict[str, float]:
    """Per link, the share of its time the devices' measured full reads take at their intervals."""
    out: dict[str, float] = {}
    for r in result.devices:
        if r.poll_ms:
            mean_s = sum(r.poll_ms) / len(r.poll_ms) / 1000.0
            out[r.device.link] = out.get(r.device.link, 0.0) + mean_s / r.device.interval_s
    return out


def status_text(status: str) -> str:
    return {PASS: _("PASS"), WARN: _("WARN"), FAIL: _("FAIL")}[status]


def check_line(c: Check) -> str:
    who = f"{c.subject}: " if c.subject else ""
    return f"[{status_text(c.status)}] {who}{c.name} — {c.detail}"


def console_summary(result: Acceptance) -> str:
    lines = [check_line(c) for c in result.all_checks()]
    verdict = _("PASSED") if result.passed else _("FAILED")
    lines.append(_("Acceptance {verdict}: {p} passed, {w} warnings, {f} failed").format(
        verdict=verdict, p=result.count(PASS), w=result.count(WARN), f=result.count(FAIL)))
    return "\n".join(lines)
