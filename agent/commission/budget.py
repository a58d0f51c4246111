"""Bus time budget: how long one full poll cycle of a link takes at least, from the wire alone.

One RTU transaction = request (8 chars) + 3.5 chars of silence + device turnaround + response
(5 + 2N chars for N registers) + 3.5 chars of silence (limits.md §1). A char is 11 bits with
parity or two stop bits, 10 bits for 8N1. Modbus TCP links are not wire-limited and get no
budget. An RTU-over-TCP link (a DTU) is limited by the DTU's serial side, whose baud rate the
site file does not give: it is budgeted at 9600 baud 8N1, the usual setting, and says so.

`pvgate check` prints the warnings; `pvgate plan` prints every device's reads and the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from agent.config import SiteConfig
from drivers.link import char_seconds as _char_seconds
from drivers.link import data_chars
from drivers.model import Block, Device, Link, LinkType
from drivers.plan import plan_device

TURNAROUND_S = 0.020  # a typical string inverter's time to start answering; the simulator's is configurable
DTU_BAUD = 9600  # assumed serial side of an RTU-over-TCP link
WARN_LOAD = 0.8  # above this share of bus time, retries and dead-device probes push polls past their interval


def char_seconds(link: Link) -> float:
    """Seconds per character on the link's wire; 0 for Modbus TCP (not wire-limited)."""
    if link.serial is not None:
        s = link.serial
        return _char_seconds(s.baudrate, s.parity, s.stopbits, s.bytesize)
    if link.type is LinkType.RTU_OVER_TCP:
        return _char_seconds(DTU_BAUD)
    return 0.0


def baud_text(link: Link) -> str:
    if link.serial is not None:
        return f"{link.serial.baudrate} baud"
    return f"{DTU_BAUD} baud (assumed for the DTU's serial side)"


def transaction_seconds(block: Block, char_s: float, turnaround_s: float = TURNAROUND_S) -> float:
    """The wire time of one read (limits.md §1), plus the device's turnaround."""
    return (8 + 3.5 + 5 + data_chars(block.table, block.count) + 3.5) * char_s + turnaround_s


def device_cycle_seconds(device: Device, link: Link, turnaround_s: float = TURNAROUND_S) -> float:
    cs = char_seconds(link)
    return sum(transaction_seconds(b, cs, turnaround_s) for b in plan_device(device.profile))


def link_cycle_seconds(cfg: SiteConfig, link: Link, turnaround_s: float = TURNAROUND_S) -> float:
    return sum(device_cycle_seconds(d, link, turnaround_s) for d in cfg.devices_on(link.id))


def wire_limited(link: Link) -> bool:
    return link.type is LinkType.RTU or link.type is LinkType.RTU_OVER_TCP


@dataclass(frozen=True)
class LinkBudget:
    link: Link
    devices: tuple[tuple[Device, float], ...]  # each device with its poll's wire time
    cycle_s: float  # all devices once, back to back
    load: float  # share of bus time the configured intervals ask for (1.0 = all of it)

    @property
    def shortest_interval_s(self) -> float:
        return min((d.interval_s for d, _ in self.devices), default=0.0)

    def dead_device_s(self) -> float:
        """What one device that stopped answering costs per poll before it is offline (worst case)."""
        worst = 0.0
        for d, _ in self.devices:
            timeout = d.timeout if d.timeout is not None else self.link.timeout
            retries = d.retries if d.retries is not None else self.link.retries
            worst = max(worst, (1 + retries) * (timeout + self.link.inter_frame_s))
        return worst


def link_budget(cfg: SiteConfig, link: Link, turnaround_s: float = TURNAROUND_S) -> LinkBudget:
    per_device = tuple((d, device_cycle_seconds(d, link, turnaround_s)) for d in cfg.devices_on(link.id))
    cycle = sum(s for _, s in per_device)
    load = sum(s / d.interval_s for d, s in per_device)
    return LinkBudget(link, per_device, cycle, load)


def budget_warnings(cfg: SiteConfig, turnaround_s: float = TURNAROUND_S) -> list[str]:
    """Links whose devices ask for more bus time than their intervals allow."""
    out = []
    for link in cfg.links:
        if not wire_limited(link) or not cfg.devices_on(link.id):
            continue
        b = link_budget(cfg, link, turnaround_s)
        if b.load <= WARN_LOAD:
            continue
        # The shortest interval every device could share with 20 % of the bus left over.
        fits = b.cycle_s / WARN_LOAD
        what = ("cannot be met: the bus is too slow for them" if b.load > 1.0 else
                f"leave less than {1 - WARN_LOAD:.0%} of the bus for retries and probes of dead devices")
        out.append(
            f"link {link.id}: the poll intervals {what} — they need {b.load:.0%} of the bus time at "
            f"{baud_text(link)}; one full cycle of its {len(b.devices)} device(s) takes at least "
            f"{b.cycle_s:.2f} s on the wire (shortest interval {b.shortest_interval_s:g} s). Lengthen the "
            f"intervals (all devices at {math.ceil(fits):d} s or more would fit), raise the baud rate, or move "
            f"devices to another bus; `pvgate plan` shows every read")
    return out


def format_plan(cfg: SiteConfig, turnaround_s: float = TURNAROUND_S) -> str:
    lines = []
    for link in cfg.links:
        devices = cfg.devices_on(link.id)
        cs = char_seconds(link)
        lines.append(f"link {link.id} ({link.type.value} {link.endpoint})")
        for d in devices:
            blocks = plan_device(d.profile)
            regs = sum(b.count for b in blocks)
            t = f", {device_cycle_seconds(d, link, turnaround_s) * 1000:.0f} ms on the wire" if cs else ""
            lines.append(f"  {d.id} (unit {d.unit}, {d.profile.id}, every {d.interval_s:g}s): "
                         f"{len(blocks)} read(s), {regs} registers{t}")
            for b in blocks:
                keys = ", ".join(p.key for p in b.points)
                ms = f" {transaction_seconds(b, cs, turnaround_s) * 1000:4.0f} ms" if cs else ""
                lines.append(f"    {b.table.name.lower():8} {b.start:5d} +{b.count:<3d}{ms}  {keys}")
        if not devices:
            lines.append("  (no devices)")
            continue
        if not cs:
            lines.append("  Modbus TCP: not limited by a serial wire")
            continue
        budget = link_budget(cfg, link, turnaround_s)
        lines.append(f"  budget at {baud_text(link)}, {turnaround_s * 1000:.0f} ms turnaround per answer:")
        lines.append(f"    minimum full cycle: {budget.cycle_s:.2f} s for {len(devices)} device(s), "
                     f"{sum(len(plan_device(d.profile)) for d in devices)} reads")
        lines.append(f"    bus load at the configured intervals: {budget.load:.0%} "
                     f"(shortest interval {budget.shortest_interval_s:g} s)")
        lines.append(f"    a device that stops answering costs up to {budget.dead_device_s():.2f} s per poll until it "
                     f"is offline, then one timeout per probe (backoff up to each device's backoff_max)")
    lines += [f"warning: {w}" for w in budget_warnings(cfg, turnaround_s)]
    return "\n".join(lines)
