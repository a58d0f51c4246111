"""The MQTT contract's JSON Schemas (docs/schemas/) as a test check: ``validate(msg)`` picks the
schema from the topic and fails the test on any drift between what pvgate publishes and what the
contract says. ``validate_all(msgs)`` checks a collector's whole record at once."""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any, Protocol

from jsonschema import Draft202012Validator
from referencing import Registry, Resource

SCHEMAS = Path(__file__).resolve().parents[2] / "docs" / "schemas"
BASE = "https://pvgate.example/schemas/"
COMMANDS = ("ping", "status", "reload", "read", "resend", "report")


class _Msg(Protocol):
    topic: str
    payload: bytes


@cache
def _registry() -> Registry[Any]:
    resources = []
    for path in sorted(SCHEMAS.glob("*.json")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        Draft202012Validator.check_schema(doc)
        resources.append((BASE + path.name, Resource.from_contents(doc)))
    return Registry().with_resources(resources)


@cache
def validator(name: str) -> Draft202012Validator:
    """The validator of docs/schemas/<name>, its $refs resolved among the other files."""
    doc = json.loads((SCHEMAS / name).read_text(encoding="utf-8"))
    return Draft202012Validator(doc, registry=_registry())


def schema_for(topic: str) -> str | None:
    """`P/S/<kind>[/<name>]` -> the schema file; None for a topic outside the contract."""
    parts = topic.split("/")
    if len(parts) < 3:
        return None
    kind, rest = parts[2], parts[3:]
    if kind in ("status", "health") and not rest:
        return f"{kind}.json"
    if kind in ("meta", "data") and len(rest) == 1:
        return f"{kind}.json"
    if kind == "events" and len(rest) == 1:
        return "event.json"
    if kind == "report" and rest == ["daily"]:
        return "report-daily.json" if (SCHEMAS / "report-daily.json").exists() else None
    if kind in ("cmd", "reply") and len(rest) == 1:
        known = rest[0] in COMMANDS
        return f"{kind}-{rest[0]}.json" if known else ("reply.json" if kind == "reply" else None)
    return None


def problems(topic: str, payload: bytes) -> list[str]:
    """What is wrong with one message, as `topic: path: error` lines (empty when it is valid)."""
    name = schema_for(topic)
    if name is None:
        return []
    if not payload:  # a retained message being cleared
        return []
    try:
        doc = json.loads(payload, parse_constant=_no_constant)
    except ValueError as err:
        return [f"{topic}: not strict JSON: {err}"]
    errors = sorted(validator(name).iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [f"{topic}: {name}: /{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5]]


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def validate(msg: _Msg) -> None:
    """Fail (AssertionError) when the message does not follow its topic's schema."""
    found = problems(msg.topic, msg.payload)
    assert not found, "\n".join(found)


def validate_all(msgs: Iterable[_Msg], *, requests: bool = False) -> int:
    """Check every message (cmd/ requests only with ``requests``: tests send bad ones on purpose);
    returns how many were checked."""
    found: list[str] = []
    checked = 0
    for msg in msgs:
        if "/cmd/" in msg.topic and not requests:
            continue
        if schema_for(msg.topic) is not None:
            checked += 1
        found += problems(msg.topic, msg.payload)
    assert not found, f"{len(found)} schema problem(s):\n" + "\n".join(found[:20])
    return checked
