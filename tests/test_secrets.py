"""Secrets: world-readable secret files are refused, the agent's files are owner-only, and a known
password appears in no output of a real run (log, MQTT, replies, status, check, the buffer)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from test_config import REPO, expect, pvgate, with_mqtt, write
from test_config import env as env  # noqa: F401 - the fixture

from support.broker import Broker, require_mosquitto
from support.chain import SimDev, readings, start_agent, start_sim, write_site
from support.collector import Collector, publish
from support.ports import free_port
from support.procs import ProcRegistry

SECRET = "Kx7-known-Pa55-Zq"
SITE = "sec"


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o666])
def test_world_readable_password_file_is_refused(tmp_path: Path, env: dict[str, str], mode: int) -> None:
    secret = write(tmp_path, SECRET + "\n", "mqtt.pass")
    secret.chmod(mode)
    path = write(tmp_path, with_mqtt(f"  username: test-site\n  password_file: {secret}\n"))
    out = expect(path, env, (9, "mqtt.password_file", f"file {secret} is readable by every user (mode {mode:04o})"))
    assert f"sudo chmod 0640 {secret}" in out and "chown root:pvgate" in out
    assert SECRET not in out
    run = pvgate("run", "-c", str(path), env=env)  # the agent itself refuses to start
    assert run.returncode == 78 and "readable by every user" in run.stderr and "Traceback" not in run.stderr


def test_world_readable_tls_key_and_key_password_file_are_refused(tmp_path: Path, env: dict[str, str]) -> None:
    ca = write(tmp_path, "not checked here\n", "ca.crt")
    crt = write(tmp_path, "not checked here\n", "a.crt")
    key = write(tmp_path, "-----BEGIN PRIVATE KEY-----\n", "a.key")
    keypass = write(tmp_path, SECRET + "\n", "a.keypass")
    key.chmod(0o644)
    keypass.chmod(0o644)
    path = write(tmp_path, with_mqtt(f"  tls: {{ca_file: {ca}, cert_file: {crt}, key_file: {key},\n"
                                     f"        key_password_file: {keypass}}}\n"))
    out = expect(path, env, (8, "mqtt.tls.key_file", f"file {key} is readable by every user"),
                 (9, "mqtt.tls.key_password_file", f"file {keypass} is readable by every user"))
    assert SECRET not in out


def test_group_readable_secret_is_fine(tmp_path: Path, env: dict[str, str]) -> None:
    secret = write(tmp_path, SECRET + "\n", "mqtt.pass")
    secret.chmod(0o640)
    path = write(tmp_path, with_mqtt(f"  username: test-site\n  password_file: {secret}\n"))
    result = pvgate("check", "-c", str(path), env=env)
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr


def _everything_said(state: Path, agent_out: str, col: Collector, extra: list[str]) -> str:
    msgs = "\n".join(f"{m.topic} {m.payload!r} {m.payload.decode('utf-8', 'replace')}" for m in col.messages())
    files = []
    for path in state.rglob("*"):
        if path.is_file():
            files.append(path.read_bytes().decode("latin-1"))
    return "\n".join([agent_out, msgs, *extra, *files])


def test_known_password_is_in_no_output_of_a_run(tmp_path: Path) -> None:
    """A real broker, simulator and agent; commands good and bad, status, reload, stop: every byte
    the run produced is searched for the password."""
    binary = require_mosquitto()
    old_umask = os.umask(0o022)  # what a shell gives: the agent must still make its files owner-only
    broker = Broker(tmp_path / "broker", binary=binary)
    broker.start()
    registry = ProcRegistry(tmp_path / "procs")
    col = Collector(broker.host, broker.port, ["#"])
    state = tmp_path / "state"
    state.mkdir()
    secret = state.parent / "mqtt.pass"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    extra: list[str] = []
    try:
        port = free_port()
        inv = SimDev("inv01", 1, "huawei-sun2000")
        start_sim(registry.start, port, [inv], speed=60)
        site = write_site(state / "site.yaml", site_id=SITE, broker_port=broker.port, modbus_port=port,
                          devices=[inv], extra_mqtt=f"username: {SITE}\npassword_file: {secret}\n")
        col.start()
        agent = start_agent(registry.start, site)
        col.wait_for(lambda ms: len(readings(ms)) >= 2, timeout=20, topic_filter=f"pvgate/{SITE}/data/#")
        for name, body in [("status", '{"id": 1}'), ("ping", '{"id": 2}'), ("nope", '{"id": 3}'),
                           ("status", "{not json"), ("read", '{"id": 4, "device": "inv01", "points": ["x"]}')]:
            publish(broker.host, broker.port, f"pvgate/{SITE}/cmd/{name}", body)
        col.wait_for(lambda ms: len(ms) >= 5, timeout=20, topic_filter=f"pvgate/{SITE}/reply/#", desc="replies")
        cli = [sys.executable, "-m", "agent.cli"]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        for args in (["status", "-c", str(site), "--json"], ["status", "-c", str(site)], ["check", "-c", str(site)]):
            done = subprocess.run([*cli, *args], capture_output=True, text=True, env=env, timeout=30, check=False)
            extra += [done.stdout, done.stderr]
        agent.send_signal(signal.SIGHUP)
        agent.wait_for_line(r"reload", timeout=20, stream="stderr")
        agent.terminate(timeout=20)
        said = _everything_said(state, agent.output(), col, extra)
        assert len(col.messages(f"pvgate/{SITE}/reply/#")) >= 5
        assert SECRET not in said
        _owner_only(state, secret)
    finally:
        col.stop()
        registry.cleanup()
        broker.stop()
        os.umask(old_umask)


def _owner_only(state: Path, secret: Path) -> None:
    """Every file the agent left in its state directory is 0600 (the socket excepted)."""
    found = [p for p in state.iterdir() if p.is_file() and p.name != "site.yaml"]
    assert any(p.name.startswith("buffer.sqlite") for p in found), found
    loose = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in found if p.stat().st_mode & 0o077}
    assert loose == {}, loose
