"""The station checks of `pvgate commission`: the broker, the clock, the bus budget, and whether the
agent itself is in the way.

The broker check connects as the agent would (the site file's host, port, TLS files, user name and
password, MQTT version) under its own client id, so that a running agent is not thrown off, and
publishes one test message with QoS 1 on `<topic_prefix>/<site id>/commission`, inside the
station's own topic tree (the one the broker's ACL lets it write). The check passes when the
broker acknowledges it (PUBACK; under MQTT 5 with a success reason code). Nothing subscribes to
that topic: it is not retained, and the center ignores it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from agent import __version__
from agent.clock.trust import RELEASE_FLOOR_MS, probe_sync
from agent.commission.acceptance_model import FAIL, PASS, WARN, Check
from agent.commission.budget import WARN_LOAD, baud_text, link_budget, wire_limited
from agent.config import SiteConfig
from agent.i18n import _
from agent.uplink.tls import TlsSetupError, tls_context
from drivers.model import LinkType

AGENT_CMD = re.compile(r"(^|[/\s])pvgate(\s|$)|agent\.cli\s+run")  # `pvgate run ...`, `python -m agent.cli run`
STATUS_SOCKET = "pvgate.sock"  # the running agent's status socket in its state directory (agent.service.status)
TOPIC = "commission"  # <prefix>/<site>/commission
BROKER_TIMEOUT_S = 10.0


# --- the broker -----------------------------------------------------------------------------


def check_broker(cfg: SiteConfig, timeout_s: float = BROKER_TIMEOUT_S) -> list[Check]:
    """Connect with the configured TLS and login, publish one QoS 1 message, wait for its PUBACK."""
    m = cfg.mqtt
    where = f"{m.host}:{m.port}" + (" (TLS)" if m.tls else "")
    name_c, name_p = _("Broker connection (TLS, login)"), _("Test message acknowledged")
    state: dict[str, object] = {}
    try:
        client = _client(cfg, state)
        if m.protocol == "5":
            client.connect(m.host, m.port, keepalive=30, clean_start=True)
        else:
            client.connect(m.host, m.port, keepalive=30)
    except TlsSetupError as err:
        return [Check(name_c, FAIL, str(err)), _skipped(name_p)]
    except ssl.SSLError as err:
        return [Check(name_c, FAIL, _tls_failed(where, err)), _skipped(name_p)]
    except (OSError, ValueError) as err:
        text = _("cannot reach {where}: {error}").format(where=where, error=err)
        return [Check(name_c, FAIL, text), _skipped(name_p)]
    try:
        return _converse(client, cfg, state, where, timeout_s)
    finally:
        client.disconnect()
        client.loop(timeout=0.1)


def _client(cfg: SiteConfig, state: dict[str, object]) -> mqtt.Client:
    m = cfg.mqtt
    client_id = f"{m.client_id or cfg.site.id}-commission"
    if m.protocol == "5":
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    else:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                             clean_session=True)
    if m.username:
        client.username_pw_set(m.username, m.password)
    if m.tls is not None:
        client.tls_set_context(tls_context(m.tls))
    client.on_connect = lambda _c, _u, _f, reason, _p: state.update(connack=reason)
    client.on_publish = lambda _c, _u, mid, reason, _p: state.update(puback=(mid, reason))
    client.on_disconnect = lambda _c, _u, _f, reason, _p: state.update(gone=reason)
    return client


def _wait(client: mqtt.Client, state: dict[str, object], key: str, deadline: float) -> bool:
    while key not in state and "gone" not in state and time.monotonic() < deadline:
        if client.loop(timeout=0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
            break
    return key in state


def _converse(client: mqtt.Client, cfg: SiteConfig, state: dict[str, object], where: str,
              timeout_s: float) -> list[Check]:
    name_c, name_p = _("Broker connection (TLS, login)"), _("Test message acknowledged")
    try:
        got = _wait(client, state, "connack", time.monotonic() + timeout_s)
    except ssl.SSLError as err:
        return [Check(name_c, FAIL, _tls_failed(where, err)), _skipped(name_p)]
    reason = state.get("connack")
    if not got or getattr(reason, "is_failure", True):
        why = str(reason) if got else _("no answer within {s:g} s").format(s=timeout_s)
        bad_login = "auth" in why.lower() or "password" in why.lower()
        hint = _(" (check mqtt.username and the password)") if bad_login else ""
        return [Check(name_c, FAIL, _("{where} refused the connection: {why}").format(where=where, why=why) + hint),
                _skipped(name_p)]
    login = _(", as {user}").format(user=cfg.mqtt.username) if cfg.mqtt.username else ""
    checks = [Check(name_c, PASS, _("connected to {where}{login}, MQTT {version}").format(
        where=where, login=login, version=cfg.mqtt.protocol))]
    topic = f"{cfg.mqtt.topic_prefix}/{cfg.site.id}/{TOPIC}"
    payload = json.dumps({"ts": int(time.time() * 1000), "kind": "commission_test", "site": cfg.site.id,
                          "name": cfg.site.name, "software": __version__}, ensure_ascii=False).encode()
    start = time.monotonic()
    info = client.publish(topic, payload, qos=1)
    _wait(client, state, "puback", start + timeout_s)
    ack = state.get("puback")
    if not isinstance(ack, tuple) or ack[0] != info.mid:
        text = _("no acknowledgement for {topic} within {s:g} s").format(topic=topic, s=timeout_s)
        checks.append(Check(name_p, FAIL, text))
    elif getattr(ack[1], "is_failure", False):
        checks.append(Check(name_p, FAIL, _("the broker refused {topic}: {why} (check the broker's ACL)").format(
            topic=topic, why=ack[1])))
    else:
        checks.append(Check(name_p, PASS, _("QoS 1 message on {topic} acknowledged in {ms:.0f} ms").format(
            topic=topic, ms=(time.monotonic() - start) * 1000)))
    return checks


def _tls_failed(where: str, err: Exception) -> str:
    return _("TLS with {where} failed: {error}").format(where=where, error=err)


def _skipped(name: str) -> Check:
    return Check(name, FAIL, _("not tried: no connection to the broker"))


# --- the clock -----------------------------------------------------------------------------


def check_clock(cfg: SiteConfig, probe: Callable[[], bool | None] = probe_sync,
                wall: Callable[[], float] = time.time) -> Check:
    """Synchronised per the kernel; `agent.clock_sync: assume` accepts a clock past the release date."""
    name = _("Clock synchronised")
    synced, wall_ms = probe(), wall() * 1000
    now = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(wall_ms / 1000))
    if wall_ms < RELEASE_FLOOR_MS:
        text = _("the clock says {now}, before this software was released: set the time")
        return Check(name, FAIL, text.format(now=now))
    if synced:
        return Check(name, PASS, _("synchronised (NTP); {now}").format(now=now))
    assume = cfg.agent.clock_sync == "assume"
    if synced is None:
        return Check(name, PASS if assume else WARN,
                     _("{now}; whether it is synchronised cannot be told on this system").format(now=now))
    if assume:
        return Check(name, WARN, _("not synchronised per the kernel; the site file trusts the clock as set "
                                   "(agent.clock_sync: assume); {now}").format(now=now))
    return Check(name, FAIL, _("not synchronised: readings would be held back as of unknown time. Start NTP "
                               "(chrony or systemd-timesyncd) or set agent.clock_sync: assume; {now}").format(now=now))


# --- the bus budget --------------------------------------------------------------------------


def _load_status(load: float) -> str:
    return PASS if load <= WARN_LOAD else WARN if load <= 1.0 else FAIL


def check_budget(cfg: SiteConfig, measured: dict[str, float] | None = None) -> list[Check]:
    """The planned bus load per serial link (`pvgate plan`'s figures) and, where the check read the
    devices, the load their measured read times ask for: a slow DTU or a slow device shows there."""
    name = _("Bus time budget")
    out = []
    for link in cfg.links:
        if not wire_limited(link) or not cfg.devices_on(link.id):
            continue
        b = link_budget(cfg, link)
        status = _load_status(b.load)
        detail = _("link {link}: {load:.0%} of the bus time at {baud}; one cycle of {n} devices takes {cycle:.2f} s, "
                   "shortest interval {interval:g} s").format(link=link.id, load=b.load, baud=baud_text(link),
                                                             n=len(b.devices), cycle=b.cycle_s,
                                                             interval=b.shortest_interval_s)
        if measured and link.id in measured:
            status = max(status, _load_status(measured[link.id]), key=(PASS, WARN, FAIL).index)
            detail += _("; measured during the check: {load:.0%}").format(load=measured[link.id])
        out.append(Check(name, status, detail))
    if not out:
        out.append(Check(name, PASS, _("Modbus TCP links only: not limited by a serial wire")))
    return out


# --- the agent in the way --------------------------------------------------------------------


def agent_running(cfg: SiteConfig) -> bool:
    """Whether `pvgate run` answers on its status socket in the site's state directory."""
    path = Path(cfg.agent.state_dir) / STATUS_SOCKET
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def port_holders(port: str) -> list[str]:
    """Agent processes (`pvgate run`) that have the serial port open, as 'pid (command line)'.

    Only the agent counts: the other end of a pty pair (socat, a serial-over-network bridge) holds
    the port too, by design."""
    try:
        target = os.path.realpath(port)
        pids = [p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]
    except OSError:
        return []
    out = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if not any(os.path.realpath(f"/proc/{pid}/fd/{fd}") == target for fd in fds):
                continue
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue  # not ours to look into, or gone
        if AGENT_CMD.search(cmd):
            out.append(f"{pid} ({cmd[:80]})")
    return out


def blocked_links(cfg: SiteConfig) -> dict[str, str]:
    """Serial links whose port another process holds: reading them would garble both."""
    out = {}
    for link in cfg.links:
        if link.type is LinkType.RTU and link.serial is not None:
            holders = port_holders(link.serial.port)
            if holders:
                out[link.id] = _("serial port {port} is held by the agent, process {who}: stop it first, "
                                 "sudo systemctl stop pvgate").format(port=link.serial.port, who=", ".join(holders))
    return out


def check_agent(cfg: SiteConfig) -> Check:
    name = _("Agent stopped during the check")
    if agent_running(cfg):
        return Check(name, WARN, _("pvgate run is running: it holds the serial ports, and devices that take one "
                                   "Modbus TCP client refuse a second. Stop it first: sudo systemctl stop pvgate"))
    return Check(name, PASS, _("the agent is not running; the check has the links to itself"))
