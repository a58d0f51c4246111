"""The site file's mqtt section: broker, credentials and TLS material, checked the way the publisher uses them."""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path

from agent.uplink.settings import MqttConfig, TlsConfig
from agent.uplink.tls import TlsSetupError, tls_context
from drivers.errors import N_, Msg
from drivers.yamlsrc import Checker, LDict

ENV_RE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")
TLS_KEYS = ("ca_file", "cert_file", "key_file", "key_password", "key_password_file")
PROTOCOLS = {"5": "5", "5.0": "5", "3.1.1": "3.1.1", "311": "3.1.1"}
# A reading is 1-3 KB of JSON: below 4 KiB one might not fit. MQTT's own ceiling is 256 MiB.
MESSAGE_KB_RANGE = (4.0, 262_144.0)
RESEND_KB_RANGE = (1.0, 1_048_576.0)


def mqtt_section(node: LDict, chk: Checker, site_id: str, present: bool) -> MqttConfig:
    host = chk.get(node, "host", "mqtt", str, "", required=present)
    if "host" in node and host:
        check_host(host, node, "mqtt", chk)
    elif "host" in node and isinstance(node["host"], str):
        chk.problem(chk.line_of(node, "host"), "mqtt.host", N_("expected the broker's host name or IP address, got nothing"))
    tls = _tls(node, chk)
    port = chk.get(node, "port", "mqtt", int, 8883 if tls else 1883)
    if not 1 <= port <= 65535:
        chk.problem(chk.line_of(node, "port"), "mqtt.port", N_("expected 1..65535"))
    prefix = chk.get(node, "topic_prefix", "mqtt", str, "pvgate")
    if not prefix or any(c in prefix for c in "+#") or prefix.startswith("/") or prefix.endswith("/"):
        chk.problem(chk.line_of(node, "topic_prefix"), "mqtt.topic_prefix",
                    N_("no MQTT wildcards (+ #) and no leading or trailing '/'"))
    password = _secret(node, "password", "password_file", "mqtt", chk)
    username = chk.get(node, "username", "mqtt", str, None)
    if username is None and ("password" in node or "password_file" in node) and "username" not in node:
        # paho sends a password only together with a user name; without one it is silently dropped.
        key = "password" if "password" in node else "password_file"
        chk.problem(chk.line_of(node, key), f"mqtt.{key}", N_("a password needs a username (add mqtt.username)"))
    keepalive = chk.get(node, "keepalive", "mqtt", int, 60)
    if not 5 <= keepalive <= 65535:
        chk.problem(chk.line_of(node, "keepalive"), "mqtt.keepalive", N_("expected 5..65535 seconds"))
    batch = chk.get(node, "batch_max", "mqtt", int, 200)
    inflight = chk.get(node, "inflight", "mqtt", int, 50)
    if not 1 <= batch <= 5000:
        chk.problem(chk.line_of(node, "batch_max"), "mqtt.batch_max", N_("expected 1..5000 readings per message"))
    if not 1 <= inflight <= 1000:
        chk.problem(chk.line_of(node, "inflight"), "mqtt.inflight", N_("expected 1..1000 (20-100 is best)"))
    return MqttConfig(
        host=host or "", port=port, topic_prefix=prefix, tls=tls,
        username=username, password=password,
        client_id=chk.get(node, "client_id", "mqtt", str, f"pvgate-{site_id}"),
        keepalive=keepalive, batch_max=batch, inflight=inflight, protocol=_protocol(node, chk),
        max_message_kb=_number(node, chk, "max_message_kb", 64.0, MESSAGE_KB_RANGE,
                               N_("KiB per MQTT message (the broker's limit or below; see docs/mqtt.md)")),
        resend_kb_per_min=_number(node, chk, "resend_kb_per_min", 256.0, RESEND_KB_RANGE,
                                  N_("KiB per minute for resend requests")),
    )


def _protocol(node: LDict, chk: Checker) -> str:
    """5 or 3.1.1; YAML reads `5` as a number and `3.1.1` as text, and both spellings are fine."""
    if "protocol" not in node:
        return "5"
    value = node["protocol"]
    text = str(value).strip().lower().removeprefix("v") if isinstance(value, (int, float, str)) else ""
    if isinstance(value, bool) or text not in PROTOCOLS:
        chk.problem(chk.line_of(node, "protocol"), "mqtt.protocol",
                    N_("expected 5 or 3.1.1 (MQTT version), got {value!r}"), value=value)
        return "5"
    return PROTOCOLS[text]


def _number(node: LDict, chk: Checker, key: str, default: float, bounds: tuple[float, float], what: str) -> float:
    value = float(chk.get(node, key, "mqtt", float, default))
    if not bounds[0] <= value <= bounds[1]:
        chk.problem(chk.line_of(node, key), f"mqtt.{key}", N_("expected {lo:.15g}..{hi:.15g} {what}"),
                    lo=bounds[0], hi=bounds[1], what=Msg(what))
        return default
    return value


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
        if key == "key_file" and readable[key] and value is not None:
            readable[key] = _not_public(value, tls, key, "mqtt.tls", chk)
        files[key] = value
    if (files["cert_file"] is None) != (files["key_file"] is None):
        chk.problem(tls.line, "mqtt.tls", N_("cert_file and key_file go together (client certificate)"))
    key_password = _secret(tls, "key_password", "key_password_file", "mqtt.tls", chk)
    _check_tls_material(tls, files, readable, key_password, chk)
    return TlsConfig(files["ca_file"] or "", files["cert_file"], files["key_file"], key_password)


def _check_tls_material(tls: LDict, files: dict[str, str | None], readable: dict[str, bool],
                        key_password: str | None, chk: Checker) -> None:
    """Load the files the way the publisher will, so a wrong or mismatched file fails `check`, not the first connect."""
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
        chk.problem(line, where, N_("file {file} does not exist"), file=value)
        return False
    if not p.is_file():
        chk.problem(line, where, N_("{file} is not a file (a directory?); give the path of the file itself"),
                    file=value)
        return False
    # Open it rather than ask os.access: that is the check that counts, also under root with
    # capabilities dropped (systemd) or on file systems with ACLs.
    try:
        with p.open("rb"):
            pass
    except OSError as err:
        chk.problem(line, where, N_("file {file} cannot be read by this user: {reason}"),
                    file=value, reason=str(err.strerror or err))
        return False
    return True


def _not_public(value: str, node: LDict, key: str, path: str, chk: Checker) -> bool:
    """A secret file that every user of the gateway may read is refused, with the commands that fix it."""
    mode = Path(value).stat().st_mode & 0o777
    if mode & 0o006:
        chk.problem(chk.line_of(node, key), f"{path}.{key}",
                    N_("file {file} is readable by every user (mode {mode:04o}); keep secrets owner/group-only: "
                       "sudo chown root:pvgate {file} && sudo chmod 0640 {file}"), file=value, mode=mode)
        return False
    return True


def secret_file(node: LDict, file_key: str, path: str, chk: Checker) -> str | None:
    """The text of a secret file: readable, not world-readable, UTF-8, not empty; None after a problem."""
    name = chk.get(node, file_key, path, str, None)
    if name is None or not _readable(name, node, file_key, path, chk) or not _not_public(name, node, file_key, path, chk):
        return None
    try:
        secret = Path(name).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        chk.problem(chk.line_of(node, file_key), f"{path}.{file_key}", N_("file {file} cannot be read as UTF-8 text: {reason}"),
                    file=name, reason=str(err))
        return None
    if not secret:
        chk.problem(chk.line_of(node, file_key), f"{path}.{file_key}", N_("file {file} is empty"), file=name)
        return None
    return secret


def _secret(node: LDict, key: str, file_key: str, path: str, chk: Checker) -> str | None:
    """A secret given inline as ${ENV} or in a file; plain text inline is refused (it ends up in backups and screenshots)."""
    if key in node and file_key in node:
        chk.problem(chk.line_of(node, key), f"{path}.{key}", N_("give either {key} or {file_key}, not both"),
                    key=key, file_key=file_key)
    if file_key in node:
        return secret_file(node, file_key, path, chk)
    if key not in node:
        return None
    value = node[key]
    m = ENV_RE.match(value) if isinstance(value, str) else None
    if not m:
        # Also for a number or an empty value: whatever is written here is a plain-text secret.
        chk.problem(chk.line_of(node, key), f"{path}.{key}",
                    N_("write it as ${{ENV_NAME}} or use {file_key}; secrets are not kept in the site file"),
                    file_key=file_key)
        return None
    if m.group(1) not in os.environ:
        chk.problem(chk.line_of(node, key), f"{path}.{key}", N_("environment variable {name} is not set"),
                    name=m.group(1))
        return None
    if not os.environ[m.group(1)]:
        chk.problem(chk.line_of(node, key), f"{path}.{key}", N_("environment variable {name} is empty"),
                    name=m.group(1))
        return None
    return os.environ[m.group(1)]


def check_host(host: str, node: LDict, path: str, chk: Checker) -> None:
    """A host name or an IP address only: 'mqtt://x:1883' or 'x:502' would fail at connect time."""
    line, where = chk.line_of(node, "host"), f"{path}.host"
    if "://" in host or "/" in host:
        chk.problem(line, where, N_("{host!r}: give the host name or IP address only, without a scheme or path"),
                    host=host)
    elif ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            chk.problem(line, where, N_("{host!r}: give the host name or IP address only; the port goes in port"),
                        host=host)
    elif any(c.isspace() for c in host):
        chk.problem(line, where, N_("{host!r}: a host name has no spaces"), host=host)


