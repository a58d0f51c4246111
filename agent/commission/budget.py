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
from agent.i18n import _
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
        return _("{baud} baud").format(baud=link.serial.baudrate)
    return _("{baud} baud (assumed for the DTU's serial side)").format(baud=DTU_BAUD)


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
        for d, _s in self.devices:
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
        text = (_("link {link}: the poll intervals cannot be met: the bus is too slow for them — they need "
                  "{load:.0%} of the bus time at {baud}; one full cycle of its {n} device(s) takes at least "
                  "{cycle:.2f} s on the wire (shortest interval {shortest:g} s). Lengthen the intervals (all "
                  "devices at {fits:d} s or more would fit), raise the baud rate, or move devices to another "
                  "bus; `pvgate plan` shows every read") if b.load > 1.0 else
                _("link {link}: the poll intervals leave less than {spare:.0%} of the bus for retries and probes "
                  "of dead devices — they need {load:.0%} of the bus time at {baud}; one full cycle of its {n} "
                  "device(s) takes at least {cycle:.2f} s on the wire (shortest interval {shortest:g} s). "
                  "Lengthen the intervals (all devices at {fits:d} s or more would fit), raise the baud rate, or "
                  "move devices to another bus; `pvgate plan` shows every read"))
        out.append(text.format(link=link.id, spare=1 - WARN_LOAD, load=b.load, baud=baud_text(link),
                               n=len(b.devices), cycle=b.cycle_s, shortest=b.shortest_interval_s,
                               fits=math.ceil(fits)))
    return out


def format_plan(cfg: SiteConfig, turnaround_s: float = TURNAROUND_S) -> str:
    lines = []
    for link in cfg.links:
        devices = cfg.devices_on(link.id)
        cs = char_seconds(link)
        lines.append(_("link {link} ({type} {endpoint})").format(link=link.id, type=link.type.value,
                                                                  endpoint=link.endpoint))
        for d in devices:
            blocks = plan_device(d.profile)
            wire = _(", {ms:.0f} ms on the wire").format(ms=device_cycle_seconds(d, link, turnaround_s) * 1000)
            lines.append(_("  {device} (unit {unit}, {profile}, every {interval:g}s): {reads} read(s), "
                           "{registers} registers{wire}").format(
                device=d.id, unit=d.unit, profile=d.profile.id, interval=d.interval_s, reads=len(blocks),
                registers=sum(b.count for b in blocks), wire=wire if cs else ""))
            for b in blocks:
                keys = ", ".join(p.key for p in b.points)
                ms = f" {transaction_seconds(b, cs, turnaround_s) * 1000:4.0f} ms" if cs else ""
                lines.append(f"    {b.table.name.lower():8} {b.start:5d} +{b.count:<3d}{ms}  {keys}")
        if not devices:
            lines.append(_("  (no devices)"))
            continue
        if not cs:
            lines.append(_("  Modbus TCP: not limited by a serial wire"))
            continue
        lines += _budget_lines(cfg, link, devices, turnaround_s)
    lines += [_("warning: {warning}").format(warning=w) for w in budget_warnings(cfg, turnaround_s)]
    return "\n".join(lines)


def _budget_lines(cfg: SiteConfig, link: Link, devices: list[Device], turnaround_s: float) -> list[str]:
    budget = link_budget(cfg, link, turnaround_s)
    return [
        _("  budget at {baud}, {ms:.0f} ms turnaround per answer:").format(baud=baud_text(link),
                                                                           ms=turnaround_s * 1000),
        _("    minimum full cycle: {cycle:.2f} s for {n} device(s), {reads} reads").format(
            cycle=budget.cycle_s, n=len(devices), reads=sum(len(plan_device(d.profile)) for d in devices)),
        _("    bus load at the configured intervals: {load:.0%} (shortest interval {shortest:g} s)").format(
            load=budget.load, shortest=budget.shortest_interval_s),
        _("    a device that stops answering costs up to {dead:.2f} s per poll until it is offline, then one "
          "timeout per probe (backoff up to each device's backoff_max)").format(dead=budget.dead_device_s()),
    ]
