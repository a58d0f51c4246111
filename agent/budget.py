"""Bus time budget: how long one full poll cycle of a link takes at least, from the wire alone.

One RTU transaction = request (8 chars) + 3.5 chars of silence + device turnaround + response
(5 + 2N chars for N registers) + 3.5 chars of silence (limits.md §1). A char is 11 bits with
parity or two stop bits, 10 bits for 8N1. TCP links are not wire-limited and get no budget.
"""

from __future__ import annotations

from agent.config import SiteConfig
from drivers.model import Block, Device, Link, LinkType
from drivers.plan import plan_device

TURNAROUND_S = 0.020  # a typical string inverter; the simulator's is configurable


def char_seconds(link: Link) -> float:
    if link.serial is None:
        return 0.0
    s = link.serial
    bits = 1 + s.bytesize + (1 if s.parity != "N" else 0) + s.stopbits
    return bits / s.baudrate


def transaction_seconds(block: Block, char_s: float, turnaround_s: float = TURNAROUND_S) -> float:
    data_chars = 2 * block.count if not block.table.is_bit else (block.count + 7) // 8
    return (8 + 3.5 + 5 + data_chars + 3.5) * char_s + turnaround_s


def device_cycle_seconds(device: Device, link: Link, turnaround_s: float = TURNAROUND_S) -> float:
    cs = char_seconds(link)
    return sum(transaction_seconds(b, cs, turnaround_s) for b in plan_device(device.profile))


def link_cycle_seconds(cfg: SiteConfig, link: Link, turnaround_s: float = TURNAROUND_S) -> float:
    return sum(device_cycle_seconds(d, link, turnaround_s) for d in cfg.devices_on(link.id))


def wire_limited(link: Link) -> bool:
    return link.type is LinkType.RTU or (link.type is LinkType.RTU_OVER_TCP)


def budget_warnings(cfg: SiteConfig) -> list[str]:
    """Links whose devices ask for more bus time than their intervals allow."""
    out = []
    for link in cfg.links:
        if link.serial is None:
            continue
        # Bus load = sum over devices of (time per poll / interval); above 1 the bus cannot keep up.
        load = sum(device_cycle_seconds(d, link) / d.interval_s for d in cfg.devices_on(link.id))
        if load > 0.8:
            out.append(f"link {link.id}: the configured intervals need {load:.0%} of the bus time at "
                       f"{link.serial.baudrate} baud (more than 80%); lengthen intervals or raise the baud rate")
    return out


def format_plan(cfg: SiteConfig) -> str:
    lines = []
    for link in cfg.links:
        devices = cfg.devices_on(link.id)
        cs = char_seconds(link)
        lines.append(f"link {link.id} ({link.type.value} {link.endpoint})")
        for d in devices:
            blocks = plan_device(d.profile)
            regs = sum(b.count for b in blocks)
            lines.append(f"  {d.id} (unit {d.unit}, {d.profile.id}, every {d.interval_s:g}s): "
                         f"{len(blocks)} read(s), {regs} registers")
            for b in blocks:
                keys = ", ".join(p.key for p in b.points)
                t = f" {transaction_seconds(b, cs) * 1000:.0f} ms" if cs else ""
                lines.append(f"    {b.table.name.lower():8} {b.start:5d} +{b.count:<3d}{t}  {keys}")
        if cs:
            cycle = link_cycle_seconds(cfg, link)
            lines.append(f"  minimum full cycle on the wire: {cycle:.2f} s "
                         f"(at {link.serial.baudrate if link.serial else 0} baud, {TURNAROUND_S * 1000:.0f} ms turnaround)")
    lines += [f"warning: {w}" for w in budget_warnings(cfg)]
    return "\n".join(lines)
