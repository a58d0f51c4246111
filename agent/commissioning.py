"""Commissioning commands for the technician on site: plan (and read/scan, added by later work)."""

from __future__ import annotations

import argparse
from typing import Any


def add_commands(sub: Any) -> None:
    plan = sub.add_parser("plan", help="each device's planned reads and the bus time budget per link")
    plan.add_argument("-c", "--config", required=True)
    plan.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    from agent.budget import format_plan
    from agent.config import load_site

    print(format_plan(load_site(args.config)))
    return 0
