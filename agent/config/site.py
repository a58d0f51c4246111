"""The site file (Contract 1): loaded, checked and turned into typed objects.

Every problem is collected and reported with file:line, the key path and what is allowed, so a
technician fixes all of them in one pass. Nothing here opens a port or a socket.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from agent.config.links import devices_section, links_section
from agent.config.model import (
    DEFAULT_STATE_DIR,
    AgentConfig,
    BufferConfig,
    SiteConfig,
    SiteInfo,
    StatusPageConfig,
)
from agent.config.mqtt import check_host, mqtt_section, secret_file
from agent.i18n import LANGUAGES, _, ngettext, normalize, translator
from drivers.devicemap import ProfileLibrary
from drivers.errors import N_, ConfigError
from drivers.yamlsrc import Checker, LDict, load_file

SITE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")

TOP_KEYS = ("site", "mqtt", "buffer", "links", "devices", "agent", "status_page")
SITE_KEYS = ("id", "name", "timezone", "capacity_kwp", "location", "meter_tolerance", "language")
LOCATION_KEYS = ("lat", "lon")
MQTT_KEYS = ("host", "port", "tls", "username", "password", "password_file", "topic_prefix",
             "client_id", "keepalive", "batch_max", "inflight", "protocol", "max_message_kb",
             "resend_kb_per_min")
BUFFER_KEYS = ("path", "max_mb", "keep_sent_days", "commit_interval", "min_free_mb")
AGENT_KEYS = ("state_dir", "health_interval", "log_level", "clock_sync")
STATUS_PAGE_KEYS = ("host", "port", "auth_file")


def load_site(path: str | Path, library: ProfileLibrary | None = None) -> SiteConfig:
    """Load and check a site file; raises ConfigError listing every problem found."""
    path = Path(path)
    data = load_file(path)
    chk = Checker(str(path))
    if data is None:
        # Empty or only comments: one message that says what belongs in it, not four.
        chk.problem(1, "", N_("the file is empty; a site file needs the sections site, mqtt, links "
                              "and devices (see config/examples/site.yaml)"))
    root = chk.mapping(data, "", 1, TOP_KEYS) if data is not None else None
    if root is None:
        chk.raise_if_any()
        raise AssertionError("unreachable")
    library = library or ProfileLibrary.default(path.resolve().parent)
    for key in ("site", "mqtt", "links", "devices"):
        if key not in root:
            chk.problem(root.line, key, N_("required section is missing"))
    # A section that is not a mapping is reported once by _section; its keys are then not
    # reported missing one by one as well.
    site = _site(_section(root, "site", SITE_KEYS, chk), chk, _is_mapping(root, "site"))
    mqtt = mqtt_section(_section(root, "mqtt", MQTT_KEYS, chk), chk, site.id, _is_mapping(root, "mqtt"))
    agent = _agent(_section(root, "agent", AGENT_KEYS, chk), chk)
    buffer = _buffer(_section(root, "buffer", BUFFER_KEYS, chk), chk, agent.state_dir)
    links, declared = links_section(root, chk)
    devices = devices_section(root, chk, {link.id: link for link in links}, declared, library,
                       path.resolve().parent)
    page = _status_page(root, chk)
    chk.raise_if_any()
    return SiteConfig(str(path), site, mqtt, buffer, agent, tuple(links), tuple(devices), page)


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
                    N_("{id!r}: use lower-case letters a-z, digits and '-' (it is part of MQTT topics)"), id=site_id)
    tz = chk.get(node, "timezone", "site", str, "Asia/Shanghai")
    _check_timezone(tz, node, chk)
    cap = chk.get(node, "capacity_kwp", "site", float, None)
    if cap is not None and cap <= 0:
        chk.problem(chk.line_of(node, "capacity_kwp"), "site.capacity_kwp", N_("expected a number of kWp above 0"))
    lat, lon = _location(node, chk)
    tol = chk.get(node, "meter_tolerance", "site", float, 0.05)
    if tol is not None and not 0 < tol < 1:
        chk.problem(chk.line_of(node, "meter_tolerance"), "site.meter_tolerance",
                    N_("expected a share between 0 and 1 (e.g. 0.05: meter and inverters may differ by 5 % a day)"))
    lang = chk.choice(node, "language", "site", LANGUAGES, None)
    return SiteInfo(site_id, chk.get(node, "name", "site", str, site_id), tz, cap, lat, lon,
                    tol if tol is not None and 0 < tol < 1 else 0.05, lang)


def _location(node: LDict, chk: Checker) -> tuple[float | None, float | None]:
    """site.location {lat, lon}: where the sun rises and sets for night mode (optional)."""
    if "location" not in node:
        return None, None
    loc = chk.mapping(node["location"], "site.location", chk.line_of(node, "location"), LOCATION_KEYS)
    if loc is None:
        return None, None
    lat = chk.get(loc, "lat", "site.location", float, None, required=True)
    lon = chk.get(loc, "lon", "site.location", float, None, required=True)
    if lat is not None and not -90 <= lat <= 90:
        chk.problem(chk.line_of(loc, "lat"), "site.location.lat", N_("expected degrees north, -90..90 (e.g. 36.84)"))
    if lon is not None and not -180 <= lon <= 180:
        chk.problem(chk.line_of(loc, "lon"), "site.location.lon", N_("expected degrees east, -180..180 (e.g. 112.85)"))
    return lat, lon


def _check_timezone(tz: str, node: LDict, chk: Checker) -> None:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a directory such as "Asia"
        chk.problem(chk.line_of(node, "timezone"), "site.timezone",
                    N_("unknown time zone {tz!r}; expected an IANA name such as Asia/Shanghai"), tz=tz)


def _agent(node: LDict, chk: Checker) -> AgentConfig:
    state = chk.get(node, "state_dir", "agent", str, os.environ.get("PVGATE_STATE_DIR", DEFAULT_STATE_DIR))
    if not state:
        chk.problem(chk.line_of(node, "state_dir"), "agent.state_dir", N_("expected a directory path"))
        state = DEFAULT_STATE_DIR
    level = chk.choice(node, "log_level", "agent", ("DEBUG", "INFO", "WARNING", "ERROR"), "INFO")
    sync = chk.choice(node, "clock_sync", "agent", ("kernel", "assume"), "kernel")
    return AgentConfig(state, chk.duration(node, "health_interval", "agent", 60.0, 1.0), level or "INFO",
                       sync or "kernel")


def _buffer(node: LDict, chk: Checker, state_dir: str) -> BufferConfig:
    path = chk.get(node, "path", "buffer", str, str(Path(state_dir) / "buffer.sqlite"))
    max_mb = chk.get(node, "max_mb", "buffer", float, 1024.0)
    if max_mb is not None and max_mb < 0.1:
        chk.problem(chk.line_of(node, "max_mb"), "buffer.max_mb", N_("expected at least 0.1 (MB)"))
    keep = chk.get(node, "keep_sent_days", "buffer", float, 7.0)
    if keep < 0:
        chk.problem(chk.line_of(node, "keep_sent_days"), "buffer.keep_sent_days", N_("expected 0 or more days"))
    commit = chk.duration(node, "commit_interval", "buffer", 1.0, 0.0)
    free = chk.get(node, "min_free_mb", "buffer", float, 64.0)
    if free < 0:
        chk.problem(chk.line_of(node, "min_free_mb"), "buffer.min_free_mb", N_("expected 0 or more (MB)"))
    return BufferConfig(path, max_mb, keep, commit, free)


def _status_page(root: LDict, chk: Checker) -> StatusPageConfig | None:
    """status_page: off unless the section is there; loopback unless a host is given."""
    if "status_page" not in root:
        return None
    node = _section(root, "status_page", STATUS_PAGE_KEYS, chk)
    host = chk.get(node, "host", "status_page", str, "127.0.0.1") or "127.0.0.1"
    check_host(host, node, "status_page", chk)
    port = chk.get(node, "port", "status_page", int, 8080)
    if port is not None and not 1 <= port <= 65535:
        chk.problem(chk.line_of(node, "port"), "status_page.port", N_("expected a TCP port, 1..65535 (e.g. 8080)"))
    user = password = None
    if "auth_file" in node:
        secret = secret_file(node, "auth_file", "status_page", chk)
        if secret is not None:
            user, sep, password = secret.partition(":")
            if not sep or not user or not password:
                chk.problem(chk.line_of(node, "auth_file"), "status_page.auth_file",
                            N_("expected one line user:password (the login for the status page)"))
                user = password = None
    return StatusPageConfig(host, port or 8080, user, password)


def format_problems(err: ConfigError, lang: str | None = None) -> str:
    """Every problem, located, and how many there are: in lang, or the current language (agent.i18n)."""
    gettext, plural = (translator(lang).gettext, translator(lang).ngettext) if lang else (_, ngettext)
    lines = [p.text(gettext) for p in err.problems]
    n = len(lines)
    return "\n".join(lines + [plural("{n} problem found; nothing was started.",
                                      "{n} problems found; nothing was started.", n).format(n=n)])


def site_language(path: str | Path) -> str | None:
    """site.language of a site file, read leniently: the file may have problems the language is
    needed to report. None when it sets none, or the file is not readable YAML."""
    try:
        data = load_file(Path(path))
    except ConfigError:
        return None
    site = data.get("site") if isinstance(data, dict) else None
    lang = site.get("language") if isinstance(site, dict) else None
    return normalize(lang) if isinstance(lang, str) else None
