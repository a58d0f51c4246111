"""The site file (Contract 1): loaded, checked and turned into typed objects.

Every problem is collected and reported with file:line, the key path and what is allowed, so a
technician fixes all of them in one pass. Nothing here opens a port or a socket.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from drivers.devicemap import ID_RE, ProfileLibrary
from drivers.errors import ConfigError
from drivers.model import Device, Link, LinkType, SerialSettings
from drivers.yamlsrc import Checker, LDict, load_file

EX_CONFIG = 78  # sysexits.h EX_CONFIG: what systemd and the technician see for a bad site file
DEFAULT_STATE_DIR = "/var/lib/pvgate"
SITE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
ENV_RE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")

TOP_KEYS = ("site", "mqtt", "buffer", "links", "devices", "agent")
SITE_KEYS = ("id", "name", "timezone", "capacity_kwp")
MQTT_KEYS = ("host", "port", "tls", "username", "password", "password_file", "topic_prefix",
             "client_id", "keepalive", "batch_max", "inflight")
TLS_KEYS = ("ca_file", "cert_file", "key_file", "key_password", "key_password_file")
BUFFER_KEYS = ("path", "max_mb", "keep_sent_days", "commit_interval", "min_free_mb")
AGENT_KEYS = ("state_dir", "health_interval", "log_level")
LINK_KEYS = ("id", "type", "host", "port", "baudrate", "parity", "stopbits", "bytesize",
             "timeout", "retries", "inter_frame")
DEVICE_KEYS = ("id", "link", "unit", "profile", "interval", "timeout", "retries",
               "offline_after", "backoff_max")


@dataclass(frozen=True)
class SiteInfo:
    id: str
    name: str
    timezone: str
    capacity_kwp: float | None


@dataclass(frozen=True)
class TlsConfig:
    ca_file: str
    cert_file: str | None
    key_file: str | None
    key_password: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class MqttConfig:
    host: str
    port: int
    topic_prefix: str
    tls: TlsConfig | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    client_id: str = ""
    keepalive: int = 60
    batch_max: int = 200  # readings per data message
    inflight: int = 50  # QoS 1 messages awaiting PUBACK (paho is happiest at 20-100)


@dataclass(frozen=True)
class BufferConfig:
    path: str
    max_mb: float = 1024.0
    keep_sent_days: float = 7.0
    commit_interval_s: float = 1.0
    min_free_mb: float = 64.0


@dataclass(frozen=True)
class AgentConfig:
    state_dir: str
    health_interval_s: float = 60.0
    log_level: str = "INFO"


@dataclass(frozen=True)
class SiteConfig:
    file: str
    site: SiteInfo
    mqtt: MqttConfig
    buffer: BufferConfig
    agent: AgentConfig
    links: tuple[Link, ...]
    devices: tuple[Device, ...]

    def link(self, link_id: str) -> Link:
        return next(link for link in self.links if link.id == link_id)

    def devices_on(self, link_id: str) -> list[Device]:
        return [d for d in self.devices if d.link == link_id]


def load_site(path: str | Path, library: ProfileLibrary | None = None) -> SiteConfig:
    """Load and check a site file; raises ConfigError listing every problem found."""
    path = Path(path)
    data = load_file(path)
    chk = Checker(str(path))
    if data is None:
        # Empty or only comments: one message that says what belongs in it, not four.
        chk.problem(1, "", "the file is empty; a site file needs the sections site, mqtt, links "
                           "and devices (see config/examples/site.yaml)")
    root = chk.mapping(data, "", 1, TOP_KEYS) if data is not None else None
    if root is None:
        chk.raise_if_any()
        raise AssertionError("unreachable")
    library = library or ProfileLibrary.default(path.resolve().parent)
    for key in ("site", "mqtt", "links", "devices"):
        if key not in root:
            chk.problem(root.line, key, "required section is missing")
    # A section that is not a mapping is reported once by _section; its keys are then not
    # reported missing one by one as well.
    site = _site(_section(root, "site", SITE_KEYS, chk), chk, _is_mapping(root, "site"))
    mqtt = _mqtt(_section(root, "mqtt", MQTT_KEYS, chk), chk, site.id, _is_mapping(root, "mqtt"))
    agent = _agent(_section(root, "agent", AGENT_KEYS, chk), chk)
    buffer = _buffer(_section(root, "buffer", BUFFER_KEYS, chk), chk, agent.state_dir)
    links, declared = _links(root, chk)
    devices = _devices(root, chk, {link.id: link for link in links}, declared, library,
                       path.resolve().parent)
    chk.raise_if_any()
    return SiteConfig(str(path), site, mqtt, buffer, agent, tuple(links), tuple(devices))


def _is_mapping(root: LDict, key: str) -> bool:
    return isinstance(root.get(key), LDict)


def _section(root: LDict, key: str, allowed: tuple[str, ...], chk: Checker) -> LDict:
    if key not in root:
        return _empty(root.line)
    node = chk.mapping(root[key], key, chk.line_of(root, key), allowed)
    return node if node is not None else _empty(root.line)


def _empty(line: int) -> LDict:
    node = LDict()
    node.line = line
    return node


def _site(node: LDict, chk: Checker, present: bool) -> SiteInfo:
    site_id = chk.get(node, "id", "site", str, "", required=present) or ""
    if site_id and not SITE_ID_RE.match(site_id):
        chk.problem(chk.line_of(node, "id"), "site.id",
                    f"{site_id!r}: use lower-case letters a-z, digits and '-' (it is part of MQTT topics)")
    tz = chk.get(node, "timezone", "site", str, "Asia/Shanghai")
    _check_timezone(tz, node, chk)
    cap = chk.get(node, "capacity_kwp", "site", float, None)
    if cap is not None and cap <= 0:
        chk.problem(chk.line_of(node, "capacity_kwp"), "site.capacity_kwp", "expected a number of kWp above 0")
    return SiteInfo(site_id, chk.get(node, "name", "site", str, site_id), tz, cap)


def _check_timezone(tz: str, node: LDict, chk: Checker) -> None:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a directory such as "Asia"
        chk.problem(chk.line_of(node, "timezone"), "site.timezone",
                    f"unknown time zone {tz!r}; expected an IANA name such as Asia/Shanghai")


def _mqtt(node: LDict, chk: Checker, site_id: str, present: bool) -> MqttConfig:
    host = chk.get(node, "host", "mqtt", str, "", required=present)
    if "host" in node and host:
        _check_host(host, node, "mqtt", chk)
    elif "host" in node and isinstance(node["host"], str):
        chk.problem(chk.line_of(node, "host"), "mqtt.host", "expected the broker's host name or IP address, got nothing")
    tls = _tls(node, chk)
    port = chk.get(node, "port", "mqtt", int, 8883 if tls else 1883)
    if not 1 <= port <= 65535:
        chk.problem(chk.line_of(node, "port"), "mqtt.port", "expected 1..65535")
    prefix = chk.get(node, "topic_prefix", "mqtt", str, "pvgate")
    if not prefix or any(c in prefix for c in "+#") or prefix.startswith("/") or prefix.endswith("/"):
        chk.problem(chk.line_of(node, "topic_prefix"), "mqtt.topic_prefix",
                    "no MQTT wildcards (+ #) and no leading or trailing '/'")
    password = _secret(node, "password", "password_file", "mqtt", chk)
    username = chk.get(node, "username", "mqtt", str, None)
    if username is None and ("password" in node or "password_file" in node) and "username" not in node:
        # paho sends a password only together with a user name; without one it is silently dropped.
        key = "password" if "password" in node else "password_file"
        chk.problem(chk.line_of(node, key), f"mqtt.{key}", "a password needs a username (add mqtt.username)")
    keepalive = chk.get(node, "keepalive", "mqtt", int, 60)
    if not 5 <= keepalive <= 65535:
        chk.problem(chk.line_of(node, "keepalive"), "mqtt.keepalive", "expected 5..65535 seconds")
    batch = chk.get(node, "batch_max", "mqtt", int, 200)
    inflight = chk.get(node, "inflight", "mqtt", int, 50)
    if not 1 <= batch <= 5000:
        chk.problem(chk.line_of(node, "batch_max"), "mqtt.batch_max", "expected 1..5000 readings per message")
    if not 1 <= inflight <= 1000:
        chk.problem(chk.line_of(node, "inflight"), "mqtt.inflight", "expected 1..1000 (20-100 is best)")
    return MqttConfig(
        host=host or "", port=port, topic_prefix=prefix, tls=tls,
        username=username, password=password,
        client_id=chk.get(node, "client_id", "mqtt", str, f"pvgate-{site_id}"),
        keepalive=keepalive, batch_max=batch, inflight=inflight,
    )


def _tls(node: LDict, chk: Checker) -> TlsConfig | None:
    if "tls" not in node:
        return None
    tls = chk.mapping(node["tls"], "mqtt.tls", chk.line_of(node, "tls"), TLS_KEYS)
    if tls is None:
        return None
    files: dict[str, str | None] = {}
    readable: dict[str, bool] = {}
    for key in ("ca_file", "cert_file", "key_file"):
        value = chk.get(tls, key, "mqtt.tls", str, None, required=key == "ca_file")
        readable[key] = value is not None and _readable(value, tls, key, "mqtt.tls", chk)
        files[key] = value
    if (files["cert_file"] is None) != (files["key_file"] is None):
        chk.problem(tls.line, "mqtt.tls", "cert_file and key_file go together (client certificate)")
    key_password = _secret(tls, "key_password", "key_password_file", "mqtt.tls", chk)
    _check_tls_material(tls, files, readable, key_password, chk)
    return TlsConfig(files["ca_file"] or "", files["cert_file"], files["key_file"], key_password)


def _check_tls_material(tls: LDict, files: dict[str, str | None], readable: dict[str, bool],
                        key_password: str | None, chk: Checker) -> None:
    """Load the files the way the publisher will, so a wrong or mismatched file fails `check`, not the first connect."""
    from agent.tls import TlsSetupError, tls_context  # agent.tls imports this module

    if not all(readable[k] for k in ("ca_file", "cert_file", "key_file") if files[k] is not None):
        return  # already reported
    try:
        tls_context(TlsConfig(files["ca_file"] or "", files["cert_file"], files["key_file"], key_password))
    except TlsSetupError as err:
        chk.problem(chk.line_of(tls, err.key), f"mqtt.tls.{err.key}", str(err))


def _readable(value: str, node: LDict, key: str, path: str, chk: Checker) -> bool:
    """Whether the file can be read by this user; a problem naming the cause otherwise."""
    p = Path(value)
    line, where = chk.line_of(node, key), f"{path}.{key}"
    if not p.exists():
        chk.problem(line, where, f"file {value} does not exist")
        return False
    if not p.is_file():
        chk.problem(line, where, f"{value} is not a file (a directory?); give the path of the file itself")
        return False
    # Open it rather than ask os.access: that is the check that counts, also under root with
    # capabilities dropped (systemd) or on file systems with ACLs.
    try:
        with p.open("rb"):
            pass
    except OSError as err:
        chk.problem(line, where, f"file {value} cannot be read by this user: {err.strerror or err}")
        return False
    return True


def _secret(node: LDict, key: str, file_key: str, path: str, chk: Checker) -> str | None:
    """A secret given inline as ${ENV} or in a file; plain text inline is refused (it ends up in backups and screenshots)."""
    if key in node and file_key in node:
        chk.problem(chk.line_of(node, key), f"{path}.{key}", f"give either {key} or {file_key}, not both")
    if file_key in node:
        name = chk.get(node, file_key, path, str, None)
        if name is None or not _readable(name, node, file_key, path, chk):
            return None
        try:
            secret = Path(name).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            chk.problem(chk.line_of(node, file_key), f"{path}.{file_key}", f"file {name} cannot be read as UTF-8 text: {err}")
            return None
        if not secret:
            chk.problem(chk.line_of(node, file_key), f"{path}.{file_key}", f"file {name} is empty")
            return None
        return secret
    if key not in node:
        return None
    value = node[key]
    m = ENV_RE.match(value) if isinstance(value, str) else None
    if not m:
        # Also for a number or an empty value: whatever is written here is a plain-text secret.
        chk.problem(chk.line_of(node, key), f"{path}.{key}",
                    f"write it as ${{ENV_NAME}} or use {file_key}; secrets are not kept in the site file")
        return None
    if m.group(1) not in os.environ:
        chk.problem(chk.line_of(node, key), f"{path}.{key}", f"environment variable {m.group(1)} is not set")
        return None
    if not os.environ[m.group(1)]:
        chk.problem(chk.line_of(node, key), f"{path}.{key}", f"environment variable {m.group(1)} is empty")
        return None
    return os.environ[m.group(1)]


def _check_host(host: str, node: LDict, path: str, chk: Checker) -> None:
    """A host name or an IP address only: 'mqtt://x:1883' or 'x:502' would fail at connect time."""
    line, where = chk.line_of(node, "host"), f"{path}.host"
    if "://" in host or "/" in host:
        chk.problem(line, where, f"{host!r}: give the host name or IP address only, without a scheme or path")
    elif ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            chk.problem(line, where, f"{host!r}: give the host name or IP address only; the port goes in port")
    elif any(c.isspace() for c in host):
        chk.problem(line, where, f"{host!r}: a host name has no spaces")


def _agent(node: LDict, chk: Checker) -> AgentConfig:
    state = chk.get(node, "state_dir", "agent", str, os.environ.get("PVGATE_STATE_DIR", DEFAULT_STATE_DIR))
    if not state:
        chk.problem(chk.line_of(node, "state_dir"), "agent.state_dir", "expected a directory path")
        state = DEFAULT_STATE_DIR
    level = chk.choice(node, "log_level", "agent", ("DEBUG", "INFO", "WARNING", "ERROR"), "INFO")
    return AgentConfig(state, chk.duration(node, "health_interval", "agent", 60.0, 1.0), level or "INFO")


def _buffer(node: LDict, chk: Checker, state_dir: str) -> BufferConfig:
    path = chk.get(node, "path", "buffer", str, str(Path(state_dir) / "buffer.sqlite"))
    max_mb = chk.get(node, "max_mb", "buffer", float, 1024.0)
    if max_mb is not None and max_mb < 0.1:
        chk.problem(chk.line_of(node, "max_mb"), "buffer.max_mb", "expected at least 0.1 (MB)")
    keep = chk.get(node, "keep_sent_days", "buffer", float, 7.0)
    if keep < 0:
        chk.problem(chk.line_of(node, "keep_sent_days"), "buffer.keep_sent_days", "expected 0 or more days")
    commit = chk.duration(node, "commit_interval", "buffer", 1.0, 0.0)
    free = chk.get(node, "min_free_mb", "buffer", float, 64.0)
    if free < 0:
        chk.problem(chk.line_of(node, "min_free_mb"), "buffer.min_free_mb", "expected 0 or more (MB)")
    return BufferConfig(path, max_mb, keep, commit, free)


def _links(root: LDict, chk: Checker) -> tuple[list[Link], set[str] | None]:
    """The valid links, and every id declared (None when the section itself is unusable)."""
    out: list[Link] = []
    seen: dict[str, int] = {}
    if "links" not in root:
        return out, None
    items = list(chk.sequence(root["links"], "links", chk.line_of(root, "links")))
    if not isinstance(root["links"], list):
        return out, None
    if not items:
        chk.problem(chk.line_of(root, "links"), "links", "at least one link is required")
    for i, item, line in items:
        path = f"links[{i}]"
        node = chk.mapping(item, path, line, LINK_KEYS)
        if node is None:
            continue
        link_id = chk.get(node, "id", path, str, None, required=True)
        if link_id is None:
            continue
        if not ID_RE.match(link_id):
            chk.problem(chk.line_of(node, "id"), f"{path}.id", f"{link_id!r}: use lower-case letters, digits and '-'")
        if link_id in seen:
            chk.problem(chk.line_of(node, "id"), f"{path}.id", f"duplicate link id {link_id!r} (first at line {seen[link_id]})")
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
            chk.problem(node.line, f"{path}.type", "required key is missing; one of tcp, rtu, rtu-over-tcp")
        return None
    ltype = LinkType(kind)
    timeout = chk.duration(node, "timeout", path, 0.5 if ltype is not LinkType.TCP else 1.0, 0.01)
    retries = chk.get(node, "retries", path, int, 1)
    if not 0 <= retries <= 10:
        chk.problem(chk.line_of(node, "retries"), f"{path}.retries", "expected 0..10")
    inter_frame = chk.duration(node, "inter_frame", path, 0.05 if ltype is not LinkType.TCP else 0.0)
    if ltype is LinkType.RTU:
        if "host" in node:
            # Ignoring it would hide a link meant as rtu-over-tcp (a DTU) behind a serial port.
            chk.problem(chk.line_of(node, "host"), f"{path}.host",
                        "only for tcp and rtu-over-tcp; an rtu link names its serial port in port")
        port = chk.get(node, "port", path, str, None, required=True, expected="a serial device such as /dev/ttyUSB0")
        baud = chk.get(node, "baudrate", path, int, 9600)
        if baud not in (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200):
            chk.problem(chk.line_of(node, "baudrate"), f"{path}.baudrate", "expected 1200..115200 (a standard rate)")
        parity = chk.choice(node, "parity", path, ("N", "E", "O"), "N") or "N"
        stop = chk.get(node, "stopbits", path, int, 1)
        if stop not in (1, 2):
            chk.problem(chk.line_of(node, "stopbits"), f"{path}.stopbits", "expected 1 or 2")
        size = chk.get(node, "bytesize", path, int, 8)
        if size != 8:
            # 7 data bits is Modbus ASCII; RTU frames are binary and need all 8.
            chk.problem(chk.line_of(node, "bytesize"), f"{path}.bytesize", "expected 8 (Modbus RTU uses 8 data bits)")
        serial = SerialSettings(port or "", baud, parity, stop, size)
        return Link(link_id, ltype, serial=serial, timeout=timeout, retries=retries, inter_frame_s=inter_frame)
    for key in ("baudrate", "parity", "stopbits", "bytesize"):
        if key in node:
            chk.problem(chk.line_of(node, key), f"{path}.{key}", f"only for type rtu, not {kind}")
    host = chk.get(node, "host", path, str, None, required=True)
    if host:
        _check_host(host, node, path, chk)
    elif host is not None:
        chk.problem(chk.line_of(node, "host"), f"{path}.host", "expected a host name or IP address, got nothing")
    port = chk.get(node, "port", path, int, 502)
    if not 1 <= port <= 65535:
        chk.problem(chk.line_of(node, "port"), f"{path}.port", "expected a TCP port 1..65535")
    return Link(link_id, ltype, host=host or "", port=port, timeout=timeout, retries=retries,
                inter_frame_s=inter_frame)


def _devices(root: LDict, chk: Checker, links: dict[str, Link], declared: set[str] | None,
             library: ProfileLibrary, site_dir: Path) -> list[Device]:
    out: list[Device] = []
    seen: dict[str, int] = {}
    units: dict[tuple[str, int], str] = {}
    items = list(chk.sequence(root["devices"], "devices", chk.line_of(root, "devices"))) if "devices" in root else []
    if "devices" in root and not items and isinstance(root["devices"], list):
        chk.problem(chk.line_of(root, "devices"), "devices", "at least one device is required")
    for i, item, line in items:
        path = f"devices[{i}]"
        node = chk.mapping(item, path, line, DEVICE_KEYS)
        if node is None:
            continue
        dev_id = chk.get(node, "id", path, str, None, required=True)
        if dev_id == "_site":
            chk.problem(chk.line_of(node, "id"), f"{path}.id",
                        "'_site' is reserved for the station's own events (P/S/events/_site)")
        elif dev_id is not None and not ID_RE.match(dev_id):
            chk.problem(chk.line_of(node, "id"), f"{path}.id",
                        f"{dev_id!r}: use lower-case letters, digits and '-' (part of MQTT topics)")
        duplicate = dev_id is not None and dev_id in seen
        if duplicate:
            chk.problem(chk.line_of(node, "id"), f"{path}.id", f"duplicate device id {dev_id!r} (first at line {seen[dev_id or '']})")
        # A duplicate is still checked through, so its other mistakes show in the same run.
        device = _device(node, path, dev_id, chk, links, declared, library, site_dir)
        if device is None or dev_id is None or duplicate:
            continue
        seen[dev_id] = line
        other = units.get((device.link, device.unit))
        if other is not None:
            chk.problem(chk.line_of(node, "unit"), f"{path}.unit",
                        f"unit {device.unit} on link {device.link!r} is already used by device {other!r}")
        units[(device.link, device.unit)] = dev_id
        out.append(device)
    return out


def _device(node: LDict, path: str, dev_id: str | None, chk: Checker, links: dict[str, Link],
            declared: set[str] | None, library: ProfileLibrary, site_dir: Path) -> Device | None:
    link_id = chk.get(node, "link", path, str, None, required=True)
    # Only for a link never declared: one that is declared but wrong has its own message already.
    if link_id is not None and link_id not in links and declared is not None and link_id not in declared:
        known = ", ".join(sorted(declared)) or "none defined"
        chk.problem(chk.line_of(node, "link"), f"{path}.link", f"no link {link_id!r}; links: {known}")
    unit = chk.get(node, "unit", path, int, 1)
    link = links.get(link_id or "")
    if link is not None and link.type is not LinkType.TCP:
        # On a serial bus 0 is the broadcast address: every device listens, none answers.
        if not 1 <= unit <= 247:
            chk.problem(chk.line_of(node, "unit"), f"{path}.unit",
                        f"expected a Modbus unit id 1..247 on {link.type.value} link {link.id!r} (0 is broadcast)")
    elif not 0 <= unit <= 255:
        # Modbus TCP devices often answer on 0, 1 or 255 whatever the serial range says.
        chk.problem(chk.line_of(node, "unit"), f"{path}.unit", "expected a Modbus unit id 0..255")
    profile_id = chk.get(node, "profile", path, str, None, required=True)
    profile = None
    if profile_id is not None:
        try:
            profile = library.get(profile_id)
        except KeyError:
            chk.problem(chk.line_of(node, "profile"), f"{path}.profile",
                        f"unknown device map {profile_id!r}; known: {', '.join(library.ids())} "
                        f"(a map of your own goes in {site_dir / 'profiles' / (profile_id + '.yaml')})")
        except ConfigError as err:
            # Several devices share a map: its mistakes are listed once.
            chk.problems.extend(p for p in err.problems if p not in chk.problems)
            chk.problem(chk.line_of(node, "profile"), f"{path}.profile", f"device map {profile_id!r} has errors (above)")
    interval = chk.duration(node, "interval", path, 10.0, 0.1)
    timeout = chk.duration(node, "timeout", path, 0.0, 0.01) if "timeout" in node else None
    retries = chk.get(node, "retries", path, int, None)
    if retries is not None and not 0 <= retries <= 10:
        chk.problem(chk.line_of(node, "retries"), f"{path}.retries", "expected 0..10")
    offline_after = chk.get(node, "offline_after", path, int, 3)
    if not 1 <= offline_after <= 1000:
        chk.problem(chk.line_of(node, "offline_after"), f"{path}.offline_after", "expected 1..1000 failed polls")
    backoff = chk.duration(node, "backoff_max", path, 300.0, 1.0)
    if dev_id is None or link is None or profile is None:
        return None
    return Device(dev_id, link.id, unit, profile, interval, timeout, retries, offline_after, backoff)


def format_problems(err: ConfigError) -> str:
    lines = [str(p) for p in err.problems]
    n = len(lines)
    return "\n".join(lines + [f"{n} problem{'s' if n != 1 else ''} found; nothing was started."])
