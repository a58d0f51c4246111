"""The device checks of `pvgate commission`: does every device answer, is it the unit the site file
says it is, and do its readings make sense.

One link is read by one task, device after device, as the agent would: first each device's
nameplate (identity points; a SunSpec device's model chain first), then every published point
`samples` times, spread over the check's duration. A unit that is silent on a sample's first
read costs one timeout for that sample, not one per block.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import replace

from agent.commission.acceptance_model import FAIL, PASS, WARN, Check, DeviceResult, Sample
from agent.commission.probe import Probe, format_value, read_points
from agent.commission.scan import plausibility
from agent.i18n import _
from drivers.errors import DeviceError, LinkError
from drivers.link import LinkClient
from drivers.model import Device, Link, LinkType, Point, Value
from drivers.sunspec import DiscoveryError, device_map, discover, without_scale_factors

POWER_MARGIN = 1.5  # an inverter may briefly exceed its rating; 1.5 x rated is a wrong scale or register
RATED_TOLERANCE = 0.02  # the nameplate's rated power vs the device's register: rounding only


async def read_link(link: Link, devices: list[Device], duration_s: float, samples: int,
                    blocked: str = "") -> list[DeviceResult]:
    """Every device of one link, read `samples` times over `duration_s`; `blocked` says why the link
    must not be opened at all (its serial port is held by the running agent)."""
    results = [DeviceResult(d) for d in devices]
    if blocked:
        for r in results:
            r.error = blocked
        return results
    client = LinkClient(replace(link, retries=0))
    try:
        t0 = time.monotonic()
        try:
            await client.connect()
        except LinkError as err:  # every device's reason, unless one of them gets through later
            for r in results:
                r.error = _why(err, link)
        for r in results:
            await _identify(client, link, r)
        step = duration_s / max(samples - 1, 1)
        for k in range(samples):
            delay = t0 + k * step - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            for r in results:
                await _sample(client, link, r, time.monotonic() - t0)
    finally:
        client.close()
    return results


def _probe(client: LinkClient, link: Link, device: Device) -> Probe:
    return Probe(client, device.unit, device.timeout if device.timeout is not None else link.timeout)


async def _identify(client: LinkClient, link: Link, r: DeviceResult) -> None:
    dmap = r.device.profile
    r.attempts += 1
    try:
        await client.connect()
        probe = _probe(client, link, r.device)
        if dmap.sunspec:
            disc = await discover(probe.holding)
            dmap = device_map(disc, dmap.name, dmap.id)
        r.dmap = dmap
        if dmap.identity:
            values, _flags = await read_points(probe, without_scale_factors(dmap.identity), dmap)
            r.identity = values
        r.answers += 1
    except (DeviceError, LinkError, DiscoveryError) as err:
        _failed(r, err, link)


async def _sample(client: LinkClient, link: Link, r: DeviceResult, t_s: float) -> None:
    dmap = r.dmap or r.device.profile
    if not dmap.points:
        return  # a SunSpec device whose model chain could not be read: _identify said why
    r.attempts += 1
    start = time.monotonic()
    try:
        await client.connect()
        values, flags = await read_points(_probe(client, link, r.device), [p for p in dmap.points if p.publish], dmap)
    except (DeviceError, LinkError) as err:
        _failed(r, err, link)
        return
    r.answers += 1
    r.poll_ms.append((time.monotonic() - start) * 1000.0)
    r.samples.append(Sample(t_s, values))
    r.flags.update(flags)


def _failed(r: DeviceResult, err: Exception, link: Link) -> None:
    # "unavailable, next try in" only says the link is still backing off: the first reason stays.
    if not r.error or "next try in" not in str(err) or "cannot open" in str(err):
        r.error = _why(err, link)


def _why(err: Exception, link: Link) -> str:
    # The agent's reconnect backoff ("next try in ...") means nothing to a one-shot check.
    text = re.sub(r",? \(?next try in [^)]*\)?", "", str(err))
    if isinstance(err, DeviceError) and err.exception_code is None and link.type is not LinkType.TCP:
        return _("{error} (check the wiring, the unit address on the device and the baud rate)").format(error=text)
    return text


# --- verdicts -----------------------------------------------------------------------------------


def judge(r: DeviceResult, capacity_kwp: float | None) -> None:
    """The device's checks from what was read."""
    who = r.device.id
    if not r.answered:
        r.checks.append(Check(_("Device answers"), FAIL, _("no answer: {error}").format(error=r.error or "?"), who))
        return
    if r.answers < r.attempts:
        r.checks.append(Check(_("Device answers"), WARN, _("answered {n} of {m} reads; last failure: {error}").format(
            n=r.answers, m=r.attempts, error=r.error), who))
    else:
        text = _("answered {n} of {m} reads").format(n=r.answers, m=r.attempts)
        if r.poll_ms:
            ms = sum(r.poll_ms) / len(r.poll_ms)
            text += _(", {ms:.0f} ms per full read").format(ms=ms)
        r.checks.append(Check(_("Device answers"), PASS, text, who))
    r.checks.append(_identity_check(r))
    r.checks.append(_readings_check(r, capacity_kwp))


def identity_text(value: Value | None, point: Point | None) -> str:
    """A nameplate value as the technician compares it: a model code as its name too."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value.strip()
    return format_value(point, value)


def _identity_check(r: DeviceResult) -> Check:
    name, who = _("Identity (model, serial, rated power)"), r.device.id
    dmap = r.dmap or r.device.profile
    points = {p.key: p for p in dmap.identity}
    read = ", ".join(f"{_label(k)} {identity_text(r.identity.get(k), points.get(k))}"
                     + (" kW" if k == "rated_power_kw" else "")
                     for k in ("model", "serial", "rated_power_kw") if k in r.identity)
    exp = r.device.expect
    if exp is None and not points:
        return Check(name, PASS, _("the device map has no nameplate registers; nothing to compare"), who)
    if exp is None:
        text = _("not declared in the site file (expect:); the device reports: {read}")
        return Check(name, WARN if not read else PASS, text.format(read=read or "-"), who)
    wrong: list[str] = []
    missing: list[str] = []
    for key, want in (("model", exp.model), ("serial", exp.serial)):
        if want is None:
            continue
        got = r.identity.get(key)
        if got is None:
            missing.append(_label(key))
        elif not _same_text(want, got, points.get(key)):
            wrong.append(_("{key}: site file {want!r}, device {got!r}").format(
                key=_label(key), want=want, got=identity_text(got, points.get(key))))
    if exp.rated_kw is not None:
        got = r.identity.get("rated_power_kw")
        if not isinstance(got, (int, float)) or isinstance(got, bool):
            missing.append(_label("rated_power_kw"))
        elif abs(got - exp.rated_kw) > max(0.1, RATED_TOLERANCE * exp.rated_kw):
            wrong.append(_("rated power: site file {want:g} kW, device {got:g} kW").format(want=exp.rated_kw, got=got))
    if wrong:
        return Check(name, FAIL, _("does not match: {what}").format(what="; ".join(wrong)), who)
    if missing:
        return Check(name, WARN, _("matches where readable; the device (or its map) does not report: {keys}").format(
            keys=", ".join(missing)), who)
    return Check(name, PASS, _("matches the site file: {read}").format(read=read), who)


def _label(key: str) -> str:
    return {"model": _("model"), "serial": _("serial number"), "rated_power_kw": _("rated power")}.get(key, key)


def _same_text(want: str, got: Value, point: Point | None) -> bool:
    """Case and surrounding blanks aside; a model given as a code number or as the code's name."""
    texts = {identity_text(got, point).casefold()}
    if isinstance(got, int) and not isinstance(got, bool):
        texts.add(str(got))
        if point is not None and point.enum:
            texts.add(dict(point.enum).get(got, "").casefold())
    return want.strip().casefold() in texts


def rated_kw(r: DeviceResult, capacity_kwp: float | None) -> float | None:
    """What the device's power is judged against: its nameplate, else for a meter the station."""
    if r.device.expect is not None and r.device.expect.rated_kw:
        return r.device.expect.rated_kw
    got = r.identity.get("rated_power_kw")
    if isinstance(got, (int, float)) and not isinstance(got, bool) and got > 0:
        return float(got)
    return capacity_kwp if r.meter else None


def _readings_check(r: DeviceResult, capacity_kwp: float | None) -> Check:
    name, who = _("Readings plausible"), r.device.id
    dmap = r.dmap or r.device.profile
    if not dmap.points:
        return Check(name, WARN, _("SunSpec model chain read; its points are judged by the agent at run time"), who)
    points = {p.key: p for p in dmap.points}
    read = {k for s in r.samples for k in s.values}
    if not read:
        return Check(name, FAIL, _("no point could be read"), who)
    bad: dict[str, str] = {}
    rated = rated_kw(r, capacity_kwp)
    for s in r.samples:
        for key, value in s.values.items():
            point = points.get(key)
            if point is not None and plausibility(point, value) < 0:
                bad[key] = f"{format_value(point, value)} {point.unit}".strip()
            elif key == "ac_power" and rated and isinstance(value, (int, float)) and _beyond(value, rated, r.meter):
                bad[key] = _("{value:g} kW, beyond {limit:g} kW (1.5 x {rated:g} kW)").format(
                    value=value, limit=POWER_MARGIN * rated, rated=rated)
    undecodable = sorted(f.split(":", 1)[1] for f in r.flags if f.startswith("decode:"))
    # A point that only means something in some states (a fault code without a fault) is absent otherwise.
    conditional = {p.key for p in dmap.points if p.valid_when is not None}
    unavailable = sorted({f.split(":", 1)[1] for f in r.flags if f.startswith(("invalid:", "refused:"))}
                         - read - conditional)
    if bad or undecodable:
        what = [f"{k} {v}" for k, v in sorted(bad.items())]
        what += [_("{key} undecodable").format(key=k) for k in undecodable]
        return Check(name, FAIL, _("implausible: {what}").format(what="; ".join(what)), who)
    if unavailable:
        return Check(name, WARN, _("{n} points plausible; not available from the device: {keys}").format(
            n=len(read), keys=", ".join(unavailable)), who)
    return Check(name, PASS, _("{n} points read, all plausible").format(n=len(read)), who)


def _beyond(value: float, rated: float, meter: bool) -> bool:
    # A meter measures both ways; an inverter draws a little at night, never its rating.
    low = -POWER_MARGIN * rated if meter else -0.1 * rated
    return not low <= value <= POWER_MARGIN * rated
