"""center.yaml: the ingest's settings, checked before anything starts.

Errors name the place as ``file:LINE: key: what is allowed`` and the CLI exits 78 (EX_CONFIG),
like ``pvgate check``. Required: ``mqtt.host`` and ``postgres.dsn``; everything else has a default.

    mqtt:
      host: 127.0.0.1
      port: 1883
      topic_prefix: pvgate
      share_group: pvgate-center     # workers with one group share the stations' messages
      client_id: center-a            # stable per worker: its MQTT session outlives a crash
      username: center
      password_file: /etc/pvgate-center/mqtt.pass
      session_expiry: 1h
    postgres:
      dsn: postgresql://center@127.0.0.1:5432/pvgate
    ingest:
      batch_records: 5000            # at most this many records per transaction
      batch_wait: 200ms              # or what arrived within this time
    gaps:
      check_every: 5s
      resend_after: 30s              # an open gap this old is asked for (cmd/resend)
      resend_every: 60s              # at most one resend request per station this often
      answer_within: 5m              # a request without an answer is asked again
      max_requests: 5                # then the gap is recorded as lost
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

EX_CONFIG = 78
_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class ConfigError(Exception):
    """One or more problems, each `file:LINE: key: message`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class MqttSettings:
    host: str
    port: int = 1883
    topic_prefix: str = "pvgate"
    share_group: str = "pvgate-center"
    client_id: str = ""
    username: str | None = None
    password: str | None = None
    session_expiry_s: float = 3600.0
    keepalive_s: int = 15


@dataclass(frozen=True)
class GapSettings:
    check_every_s: float = 5.0
    resend_after_s: float = 30.0
    resend_every_s: float = 60.0
    answer_within_s: float = 300.0
    max_requests: int = 5


@dataclass(frozen=True)
class CenterConfig:
    file: str
    mqtt: MqttSettings
    dsn: str
    batch_records: int = 5000
    batch_wait_s: float = 0.2
    gaps: GapSettings = GapSettings()


_SCHEMA: dict[str, dict[str, str]] = {
    "mqtt": {"host": "str", "port": "port", "topic_prefix": "topic", "share_group": "topic", "client_id": "str",
             "username": "str", "password_file": "file", "session_expiry": "duration", "keepalive": "duration"},
    "postgres": {"dsn": "str"},
    "ingest": {"batch_records": "count", "batch_wait": "duration"},
    "gaps": {"check_every": "duration", "resend_after": "duration", "resend_every": "duration",
             "answer_within": "duration", "max_requests": "count"},
}
_REQUIRED = (("mqtt", "host"), ("postgres", "dsn"))


class _Reader:
    def __init__(self, path: str) -> None:
        self.path = path
        self.problems: list[str] = []

    def fail(self, node: yaml.Node | None, key: str, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else 1
        self.problems.append(f"{self.path}:{line}: {key}: {message}")

    def value(self, node: yaml.Node, key: str, kind: str) -> Any:
        raw = node.value if isinstance(node, yaml.ScalarNode) else None
        if raw is None or not isinstance(raw, str):
            self.fail(node, key, "expected a single value")
            return None
        text = os.path.expandvars(raw) if raw.startswith("${") else raw
        return self._convert(node, key, kind, text)

    def _convert(self, node: yaml.Node, key: str, kind: str, text: str) -> Any:
        if kind == "port" or kind == "count":
            ok = text.isdigit() and (0 < int(text) <= 65535 if kind == "port" else int(text) > 0)
            if not ok:
                self.fail(node, key, f"expected {'a TCP port 1..65535' if kind == 'port' else 'a positive integer'}, got {text!r}")
            return int(text) if ok else None
        if kind == "duration":
            m = _DURATION.match(text)
            if m is None or float(m.group(1)) <= 0:
                self.fail(node, key, f"expected a duration such as 500ms, 5s, 2m or 1h, got {text!r}")
                return None
            return float(m.group(1)) * _UNIT[m.group(2)]
        if kind == "topic" and (not text or "+" in text or "#" in text or key.endswith("share_group") and "/" in text):
            self.fail(node, key, f"expected topic levels without + or # (a share group: one level), got {text!r}")
            return None
        if kind == "file":
            try:
                return Path(text).read_text(encoding="utf-8").strip()
            except OSError as err:
                self.fail(node, key, f"cannot read {text}: {err.strerror or err}")
                return None
        if not text:
            self.fail(node, key, "must not be empty")
        return text


def _mapping(reader: _Reader, node: yaml.Node | None, key: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    if node is None:
        return {}
    if not isinstance(node, yaml.MappingNode):
        reader.fail(node, key, "expected a mapping (key: value lines)")
        return {}
    return {str(k.value): (k, v) for k, v in node.value}


def _read(reader: _Reader, root: yaml.Node | None) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {section: {} for section in _SCHEMA}
    for section, (knode, vnode) in _mapping(reader, root, "(top)").items():
        if section not in _SCHEMA:
            reader.fail(knode, section, f"unknown section; allowed: {', '.join(_SCHEMA)}")
            continue
        for key, (k2, v2) in _mapping(reader, vnode, section).items():
            kind = _SCHEMA[section].get(key)
            if kind is None:
                reader.fail(k2, f"{section}.{key}", f"unknown key; allowed: {', '.join(_SCHEMA[section])}")
                continue
            out[section][key] = reader.value(v2, f"{section}.{key}", kind)
    for section, key in _REQUIRED:
        if out[section].get(key) is None and not any(p.split(": ")[1] == f"{section}.{key}" for p in reader.problems):
            reader.fail(root, f"{section}.{key}", "required")
    return out


def load(path: str) -> CenterConfig:
    """Read and check center.yaml; ConfigError lists every problem found."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError([f"{path}: cannot read: {err.strerror or err}"]) from None
    reader = _Reader(path)
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise ConfigError([f"{path}:{line}: not valid YAML: {getattr(err, 'problem', None) or err}"]) from None
    cfg = _read(reader, root)
    if reader.problems:
        raise ConfigError(reader.problems)
    return _build(path, cfg)


def _build(path: str, cfg: dict[str, dict[str, Any]]) -> CenterConfig:
    m, g, i = cfg["mqtt"], cfg["gaps"], cfg["ingest"]
    mqtt = MqttSettings(
        host=m["host"], port=m.get("port", 1883), topic_prefix=m.get("topic_prefix", "pvgate"),
        share_group=m.get("share_group", "pvgate-center"),
        client_id=m.get("client_id") or f"pvgate-center-{socket.gethostname()}-{os.getpid()}",
        username=m.get("username"), password=m.get("password_file"),
        session_expiry_s=m.get("session_expiry", 3600.0), keepalive_s=int(m.get("keepalive", 15.0)))
    gaps = GapSettings(check_every_s=g.get("check_every", 5.0), resend_after_s=g.get("resend_after", 30.0),
                       resend_every_s=g.get("resend_every", 60.0), answer_within_s=g.get("answer_within", 300.0),
                       max_requests=g.get("max_requests", 5))
    return CenterConfig(file=path, mqtt=mqtt, dsn=cfg["postgres"]["dsn"], batch_records=i.get("batch_records", 5000),
                        batch_wait_s=i.get("batch_wait", 0.2), gaps=gaps)
