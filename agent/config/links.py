"""The site file's links and devices sections: every link and device checked, with file:line."""

from __future__ import annotations

from pathlib import Path

from agent.config.mqtt import check_host
from drivers.devicemap import ID_RE, ProfileLibrary
from drivers.errors import N_, ConfigError, Msg
from drivers.model import Device, Link, LinkType, Nameplate, SerialSettings
from drivers.yamlsrc import Checker, LDict

LINK_KEYS = ("id", "type", "host", "port", "baudrate", "parity", "stopbits", "bytesize",
             "timeout", "retries", "inter_frame")
DEVICE_KEYS = ("id", "link", "unit", "profile", "interval", "timeout", "retries",
               "offline_after", "backoff_max", "invert_power", "name", "expect")
EXPECT_KEYS = ("model", "serial", "rated_kw")


def links_section(root: LDict, chk: Checker) -> tuple[list[Link], set[str] | None]:
    """The valid links, and every id declared (None when the section itself is unusable)."""
    out: list[Link] = []
    seen: dict[str, int] = {}
    if "links" not in root:
        return out, None
    items = list(chk.sequence(root["links"], "links", chk.line_of(root, "links")))
    if not isinstance(root["links"], list):
        return out, None
    if not items:
        chk.problem(chk.line_of(root, "links"), "links", N_("at least one link is required"))
    for i, item, line in items:
        path = f"links[{i}]"
        node = chk.mapping(item, path, line, LINK_KEYS)
        if node is None:
            continue
        link_id = chk.get(node, "id", path, str, None, required=True)
        if link_id is None:
            continue
        if not ID_RE.match(link_id):
            chk.problem(chk.line_of(node, "id"), f"{path}.id", N_("{id!r}: use lower-case letters, digits and '-'"), id=link_id)
        if link_id in seen:
            chk.problem(chk.line_of(node, "id"), f"{path}.id", N_("duplicate link id {id!r} (first at line {first})"),
                        id=link_id, first=seen[link_id])
            continue
        seen[link_id] = line
        link = _link(node, path, link_id, chk)
        if link is not None:
            out.append(link)
    return out, set(seen)


def _link(node: LDict, path: str, link_id: str, chk: Checker) -> Link | None:
    kind = chk.choice(node, "type", path, [t.value for t in LinkType], None)
    if kind is None:
        if "type" not in node:
            chk.problem(node.line, f"{path}.type", N_("required key is missing; one of tcp, rtu, rtu-over-tcp"))
        return None
    ltype = LinkType(kind)
    timeout = chk.duration(node, "timeout", path, 0.5 if ltype is not LinkType.TCP else 1.0, 0.01)
    retries = chk.get(node, "retries", path, int, 1)
    if not 0 <= retries <= 10:
        chk.problem(chk.line_of(node, "retries"), f"{path}.retries", N_("expected 0..10"))
    inter_frame = chk.duration(node, "inter_frame", path, 0.05 if ltype is not LinkType.TCP else 0.0)
    if ltype is LinkType.RTU:
        if "host" in node:
            # Ignoring it would hide a link meant as rtu-over-tcp (a DTU) behind a serial port.
            chk.problem(chk.line_of(node, "host"), f"{path}.host",
                        N_("only for tcp and rtu-over-tcp; an rtu link names its serial port in port"))
        port = chk.get(node, "port", path, str, None, required=True, expected=Msg(N_("a serial device such as /dev/ttyUSB0")))
        baud = chk.get(node, "baudrate", path, int, 9600)
        if baud not in (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200):
            chk.problem(chk.line_of(node, "baudrate"), f"{path}.baudrate", N_("expected 1200..115200 (a standard rate)"))
        parity = chk.choice(node, "parity", path, ("N", "E", "O"), "N") or "N"
        stop = chk.get(node, "stopbits", path, int, 1)
        if stop not in (1, 2):
            chk.problem(chk.line_of(node, "stopbits"), f"{path}.stopbits", N_("expected 1 or 2"))
        size = chk.get(node, "bytesize", path, int, 8)
        if size != 8:
            # 7 data bits is Modbus ASCII; RTU frames are binary and need all 8.
            chk.problem(chk.line_of(node, "bytesize"), f"{path}.bytesize", N_("expected 8 (Modbus RTU uses 8 data bits)"))
        serial = SerialSettings(port or "", baud, parity, stop, size)
        return Link(link_id, ltype, serial=serial, timeout=timeout, retries=retries, inter_frame_s=inter_frame)
    for key in ("baudrate", "parity", "stopbits", "bytesize"):
        if key in node:
            chk.problem(chk.line_of(node, key), f"{path}.{key}", N_("only for type rtu, not {kind}"), kind=kind)
    host = chk.get(node, "host", path, str, None, required=True)
    if host:
        check_host(host, node, path, chk)
    elif host is not None:
        chk.problem(chk.line_of(node, "host"), f"{path}.host", N_("expected a host name or IP address, got nothing"))
    port = chk.get(node, "port", path, int, 502)
    if not 1 <= port <= 65535:
        chk.problem(chk.line_of(node, "port"), f"{path}.port", N_("expected a TCP port 1..65535"))
    return Link(link_id, ltype, host=host or "", port=port, timeout=timeout, retries=retries,
                inter_frame_s=inter_frame)


def devices_section(root: LDict, chk: Checker, links: dict[str, Link], declared: set[str] | None,
             library: ProfileLibrary, site_dir: Path) -> list[Device]:
    out: list[Device] = []
    seen: dict[str, int] = {}
    units: dict[tuple[str, int], str] = {}
    items = list(chk.sequence(root["devices"], "devices", chk.line_of(root, "devices"))) if "devices" in root else []
    if "devices" in root and not items and isinstance(root["devices"], list):
        chk.problem(chk.line_of(root, "devices"), "devices", N_("at least one device is required"))
    for i, item, line in items:
        path = f"devices[{i}]"
        node = chk.mapping(item, path, line, DEVICE_KEYS)
        if node is None:
            continue
        dev_id = chk.get(node, "id", path, str, None, required=True)
        if dev_id == "_site":
            chk.problem(chk.line_of(node, "id"), f"{path}.id",
                        N_("'_site' is reserved for the station's own events (P/S/events/_site)"))
        elif dev_id is not None and not ID_RE.match(dev_id):
            chk.problem(chk.line_of(node, "id"), f"{path}.id",
                        N_("{id!r}: use lower-case letters, digits and '-' (part of MQTT topics)"), id=dev_id)
        duplicate = dev_id is not None and dev_id in seen
        if duplicate:
            chk.problem(chk.line_of(node, "id"), f"{path}.id", N_("duplicate device id {id!r} (first at line {first})"),
                        id=dev_id, first=seen[dev_id or ''])
        # A duplicate is still checked through, so its other mistakes show in the same run.
        device = _device(node, path, dev_id, chk, links, declared, library, site_dir)
        if device is None or dev_id is None or duplicate:
            continue
        seen[dev_id] = line
        other = units.get((device.link, device.unit))
        if other is not None:
            chk.problem(chk.line_of(node, "unit"), f"{path}.unit",
                        N_("unit {unit} on link {link!r} is already used by device {other!r}"),
                        unit=device.unit, link=device.link, other=other)
        units[(device.link, device.unit)] = dev_id
        out.append(device)
    return out


def _device(node: LDict, path: str, dev_id: str | None, chk: Checker, links: dict[str, Link],
            declared: set[str] | None, library: ProfileLibrary, site_dir: Path) -> Device | None:
    link_id = chk.get(node, "link", path, str, None, required=True)
    # Only for a link never declared: one that is declared but wrong has its own message already.
    if link_id is not None and link_id not in links and declared is not None and link_id not in declared:
        known = ", ".join(sorted(declared)) or Msg(N_("none defined"))
        chk.problem(chk.line_of(node, "link"), f"{path}.link", N_("no link {id!r}; links: {known}"),
                    id=link_id, known=known)
    unit = chk.get(node, "unit", path, int, 1)
    link = links.get(link_id or "")
    if link is not None and link.type is not LinkType.TCP:
        # On a serial bus 0 is the broadcast address: every device listens, none answers.
        if not 1 <= unit <= 247:
            chk.problem(chk.line_of(node, "unit"), f"{path}.unit",
                        N_("expected a Modbus unit id 1..247 on {type} link {link!r} (0 is broadcast)"),
                        type=link.type.value, link=link.id)
    elif not 0 <= unit <= 255:
        # Modbus TCP devices often answer on 0, 1 or 255 whatever the serial range says.
        chk.problem(chk.line_of(node, "unit"), f"{path}.unit", N_("expected a Modbus unit id 0..255"))
    profile_id = chk.get(node, "profile", path, str, None, required=True)
    profile = None
    if profile_id is not None:
        try:
            profile = library.get(profile_id)
        except KeyError:
            chk.problem(chk.line_of(node, "profile"), f"{path}.profile",
                        N_("unknown device map {id!r}; known: {known} (a map of your own goes in {where})"),
                        id=profile_id, known=", ".join(library.ids()),
                        where=site_dir / 'profiles' / (profile_id + '.yaml'))
        except ConfigError as err:
            # Several devices share a map: its mistakes are listed once.
            chk.problems.extend(p for p in err.problems if p not in chk.problems)
            chk.problem(chk.line_of(node, "profile"), f"{path}.profile", N_("device map {id!r} has errors (above)"),
                        id=profile_id)
    interval = chk.duration(node, "interval", path, 10.0, 0.1)
    timeout = chk.duration(node, "timeout", path, 0.0, 0.01) if "timeout" in node else None
    retries = chk.get(node, "retries", path, int, None)
    if retries is not None and not 0 <= retries <= 10:
        chk.problem(chk.line_of(node, "retries"), f"{path}.retries", N_("expected 0..10"))
    offline_after = chk.get(node, "offline_after", path, int, 3)
    if not 1 <= offline_after <= 1000:
        chk.problem(chk.line_of(node, "offline_after"), f"{path}.offline_after", N_("expected 1..1000 failed polls"))
    backoff = chk.duration(node, "backoff_max", path, 300.0, 1.0)
    invert = chk.get(node, "invert_power", path, bool, False)
    name = chk.get(node, "name", path, str, "")
    expect = _expect(node, path, chk) if "expect" in node else None
    if dev_id is None or link is None or profile is None:
        return None
    return Device(dev_id, link.id, unit, profile, interval, timeout, retries, offline_after, backoff, invert,
                  name.strip(), expect)


def _expect(node: LDict, path: str, chk: Checker) -> Nameplate | None:
    """devices[].expect: the nameplate `pvgate commission` compares with what the device reports."""
    path = f"{path}.expect"
    exp = chk.mapping(node["expect"], path, chk.line_of(node, "expect"), EXPECT_KEYS)
    if exp is None:
        return None
    # A serial of digits only is read by YAML as a number: it is still the text on the nameplate.
    model, serial = (chk.get(exp, k, path, (str, int), None, expected="text") for k in ("model", "serial"))
    rated = chk.get(exp, "rated_kw", path, float, None)
    if rated is not None and not 0 < rated <= 100_000:
        chk.problem(chk.line_of(exp, "rated_kw"), f"{path}.rated_kw", N_("expected the rated AC power in kW, above 0"))
        rated = None
    return Nameplate(None if model is None else str(model).strip(), None if serial is None else str(serial).strip(),
                     rated)


