"""The contract's JSON Schemas (docs/schemas/) are valid, cover every topic, and refuse drift."""

from __future__ import annotations

import json

import pytest

from support.schemas import SCHEMAS, problems, schema_for, validator

EPOCH = "b7f3c2a9e1d04a6b"
GOOD = {
    "pvgate/s1/status": {"state": "online", "ts": 1764403210000, "version": "0.1.0"},
    "pvgate/s1/data/inv01": {"v": 1, "site": "s1", "device": "inv01", "epoch": EPOCH, "replay": True,
                             "readings": [{"seq": 1841, "ts": 1764403210000, "values": {"ac_power": 52.31},
                                           "q": ["clock:unsynced", "invalid:pv_voltage"]}]},
    "pvgate/s1/events/_site": {"v": 1, "site": "s1", "device": "_site", "epoch": EPOCH, "seq": 9, "ts": 1,
                               "event": "dropped", "first_seq": 3, "last_seq": 8, "count": 6, "reason": "buffer full"},
    "pvgate/s1/cmd/resend": {"id": "c-17", "first_seq": 1200, "last_seq": 1450},
    "pvgate/s1/reply/resend": {"v": 1, "id": "c-17", "command": "resend", "ok": True, "ts": 1, "done": True,
                               "result": {"queued_first_seq": 1200, "queued_last_seq": 1450, "records": 251,
                                          "seconds": 4.2}},
}
BAD = [
    ("pvgate/s1/status", {"state": "up", "ts": 1, "version": "0.1.0"}),
    ("pvgate/s1/data/inv01", {"v": 1, "site": "s1", "device": "inv01", "readings": []}),
    ("pvgate/s1/events/inv01", {"v": 1, "site": "s1", "device": "inv01", "epoch": EPOCH, "seq": 1, "ts": 1,
                                "event": "alarm", "point": "alarm_1"}),
    ("pvgate/s1/events/inv01", {"v": 1, "site": "s1", "device": "inv01", "epoch": EPOCH, "seq": 1, "ts": 1,
                                "event": "dropped", "first_seq": 1, "last_seq": 1, "count": 1, "reason": "x"}),
    ("pvgate/s1/cmd/resend", {"id": "c", "first_seq": 0, "last_seq": 1}),
    ("pvgate/s1/reply/resend", {"v": 1, "id": "c", "command": "resend", "ok": True, "ts": 1,
                                "queued_first_seq": 1}),
]


def test_every_schema_is_valid_and_listed_in_the_index() -> None:
    index = json.loads((SCHEMAS / "index.json").read_text(encoding="utf-8"))
    listed = set(index["topics"].values()) | set(index["editors"].values()) | {index["shared"], "index.json"}
    for path in SCHEMAS.glob("*.json"):
        assert path.name in listed, f"{path.name} is not in index.json"
        if path.name != "index.json":
            validator(path.name)  # checks the schema itself
    assert {"status.json", "meta.json", "data.json", "event.json", "health.json"} <= listed


@pytest.mark.parametrize("topic", sorted(GOOD))
def test_the_documented_examples_pass(topic: str) -> None:
    assert problems(topic, json.dumps(GOOD[topic]).encode()) == []


@pytest.mark.parametrize(("topic", "body"), BAD)
def test_drift_is_caught(topic: str, body: dict[str, object]) -> None:
    assert problems(topic, json.dumps(body).encode())


def test_nan_and_topics_outside_the_contract() -> None:
    body = b'{"v":1,"site":"s1","device":"d","epoch":"' + EPOCH.encode() + b'","readings":[{"seq":1,"ts":1,"values":{"p":NaN},"q":[]}]}'
    assert "not strict JSON" in problems("pvgate/s1/data/d", body)[0]
    assert schema_for("pvgate/s1/somewhere/else") is None and schema_for("pvgate/s1/reply/write-register") == "reply.json"
