"""Commissioning commands for the technician on site: plan and commission (read/scan live in scan.py).

Each command registers itself in `add_commands`; `agent.cli` calls it with its subparsers.
"""

from __future__ import annotations

import argparse
from typing import Any

from agent.config import DEFAULT_SITE_FILE
from agent.i18n import _


def add_commands(sub: Any) -> None:
    add_plan(sub)
    from agent.commission.acceptance import add_commission  # `pvgate commission`: the acceptance report

    add_commission(sub)


def add_plan(sub: Any) -> None:
    plan = sub.add_parser(
        "plan", help=_("each device's planned reads and the bus time budget per link"),
        description=_("Print every device's planned reads (table, address, count, points) and, per RS-485 "
                      "link, the minimum time one full poll cycle takes on the wire, the bus load the "
                      "configured intervals ask for, and a warning when they cannot be met."))
    plan.add_argument("-c", "--config", default=DEFAULT_SITE_FILE,
                      help=_("site file (default {path})").format(path=DEFAULT_SITE_FILE))
    plan.add_argument("--turnaround-ms", type=float, default=None, metavar="MS",
                      help=_("time a device takes to start answering (default 20 ms, a typical inverter)"))
    plan.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    from agent.commission.budget import TURNAROUND_S, format_plan
    from agent.config import load_site

    turnaround = TURNAROUND_S if args.turnaround_ms is None else max(0.0, args.turnaround_ms) / 1000.0
    print(format_plan(load_site(args.config), turnaround))
    return 0
