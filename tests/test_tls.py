"""TLS and the ACL, against a real mosquitto with require_certificate true: a test CA and
certificates made here with openssl, passwords with mosquitto_passwd, the ACL template from
docs/mosquitto-acl.md. Secrets never reach the agent's log; bad certificates are clear errors."""

from __future__ import annotations

import os
import re
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from support.broker import Broker
from support.chain import SimDev, start_sim, write_site
from support.ports import free_port
from support.procs import require_tool

ROOT = Path(__file__).resolve().parents[1]
DEVICES = [SimDev("inv01", 1, "huawei-sun2000")]
SITE_A, SITE_B = "sf-tls-a", "sf-tls-b"
PASSWORDS = {SITE_A: "A-secret-pass-7f3e9c", SITE_B: "B-secret-pass-21d0aa", "center": "center-pass-55e1"}
KEY_PASSWORD = "key-pass-for-a-9b2d"


def run(*cmd: str, cwd: Path) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)


@dataclass(frozen=True)
class Pki:
    dir: Path

    def __getitem__(self, name: str) -> str:
        return str(self.dir / name)


def make_pki(d: Path) -> Pki:
    """A CA; a server certificate for 127.0.0.1/localhost; a client certificate per account
    (station A's key encrypted with KEY_PASSWORD)."""
    openssl = require_tool("openssl")
    d.mkdir()
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    run(openssl, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=pvgate test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)

    def issue(name: str, cn: str, ext: str) -> None:
        run(openssl, "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
        (d / f"{name}.ext").write_text(ext)
        run(openssl, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)

    issue("server", "localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    for account in PASSWORDS:
        issue(account, account, "extendedKeyUsage=clientAuth\n")
    run(openssl, "pkey", "-in", f"{SITE_A}.key", "-aes256", "-passout", f"pass:{KEY_PASSWORD}",
        "-out", f"{SITE_A}.enc.key", cwd=d)
    (d / "a.keypass").write_text(KEY_PASSWORD + "\n")
    for secret in [*d.glob("*.key"), d / "a.keypass"]:
        secret.chmod(0o600)  # pvgate refuses secrets every user can read
    return Pki(d)


def acl_template() -> str:
    """The ```acl block of docs/mosquitto-acl.md: the tested template is the documented one."""
    text = (ROOT / "docs" / "mosquitto-acl.md").read_text(encoding="utf-8")
    m = re.search(r"```acl\n(.*?)```", text, re.S)
    assert m, "docs/mosquitto-acl.md has no ```acl block"
    return m.group(1)


@pytest.fixture
def tls_broker(tmp_path: Path, broker_factory: Callable[..., Broker]) -> tuple[Broker, Pki]:
    passwd = require_tool("mosquitto_passwd", "/usr/bin/mosquitto_passwd")
    pki = make_pki(tmp_path / "pki")
    pw = tmp_path / "pki" / "passwd"
    for i, (user, password) in enumerate(PASSWORDS.items()):
        subprocess.run([passwd, *(["-c"] if i == 0 else []), "-b", str(pw), user, password], check=True)
    acl = tmp_path / "pki" / "acl"
    acl.write_text(acl_template())
    listener = (f"listener {{port}} {{host}}\ncafile {pki['ca.crt']}\ncertfile {pki['server.crt']}\n"
                f"keyfile {pki['server.key']}\nrequire_certificate true\nuse_identity_as_username false\n"
                f"allow_anonymous false\npassword_file {pw}\nacl_file {acl}\n")
    return broker_factory(listener_conf=listener), pki


class TlsClient:
    """A paho client with a client certificate and password (a station's, or the center's)."""

    def __init__(self, broker: Broker, pki: Pki, user: str, subscribe: str | None = None,
                 cert: bool = True) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.connected = threading.Event()
        self.error: str | None = None
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{user}-{uuid.uuid4().hex[:6]}",
                                  protocol=mqtt.MQTTv311)
        ctx = ssl.create_default_context(cafile=pki["ca.crt"])
        if cert:
            ctx.load_cert_chain(pki[f"{user}.crt"], pki[f"{user}.key"])
        self.client.tls_set_context(ctx)
        self.client.username_pw_set(user, PASSWORDS[user])
        self.subscribe = subscribe
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, bytes(m.payload)))
        self.client.on_subscribe = lambda *a: self.connected.set()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self.error = str(reason)
        elif self.subscribe:
            client.subscribe(self.subscribe, qos=1)
        else:
            self.connected.set()

    def start(self, broker: Broker) -> TlsClient:
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        assert self.connected.wait(10), f"connect failed: {self.error}"
        return self

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def tls_site(tmp_path: Path, broker: Broker, pki: Pki, modbus: int, tls: str, password: str = "${PVGATE_TEST_MQTT_PW}") -> Path:
    site = write_site(tmp_path / "site.yaml", site_id=SITE_A, broker_port=broker.port, modbus_port=modbus,
                      devices=DEVICES, interval="500ms",
                      extra_mqtt=f"tls: {tls}\nusername: {SITE_A}\npassword: '{password}'")
    text = site.read_text().replace("  health_interval: 5s\n", "  health_interval: 5s\n  log_level: DEBUG\n")
    site.write_text(text)
    return site


def a_tls(pki: Pki) -> str:
    return (f"{{ca_file: {pki['ca.crt']}, cert_file: {pki[SITE_A + '.crt']}, key_file: {pki[SITE_A + '.enc.key']}, "
            f"key_password_file: {pki['a.keypass']}}}")


def test_station_over_tls_and_the_acl_confines_each_station(tmp_path: Path, tls_broker: tuple[Broker, Pki],
                                                            procs: Any) -> None:
    broker, pki = tls_broker
    center = TlsClient(broker, pki, "center", subscribe="pvgate/#").start(broker)
    try:
        modbus = free_port()
        start_sim(procs, modbus, DEVICES, speed=60)
        site = tls_site(tmp_path, broker, pki, modbus, a_tls(pki))
        agent = procs([sys.executable, "-m", "agent.cli", "run", "-c", str(site)], "agent",
                      env={"PVGATE_TEST_MQTT_PW": PASSWORDS[SITE_A]})
        agent.wait_for_line(r"connected to 127\.0\.0\.1", timeout=20)
        deadline = time.monotonic() + 20
        while not any(t == f"pvgate/{SITE_A}/data/inv01" for t, _ in center.messages) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert any(t == f"pvgate/{SITE_A}/data/inv01" for t, _ in center.messages), "station A's data over mutual TLS"

        # Station B's own credentials: its own tree works, station A's is refused (silently, MQTT 3.1.1).
        b = TlsClient(broker, pki, SITE_B).start(broker)
        try:
            b.publish(f"pvgate/{SITE_A}/data/inv01", b'{"forged": true}')
            b.publish(f"pvgate/{SITE_A}/status", b'{"state": "offline", "forged": true}')
            b.publish(f"pvgate/{SITE_B}/data/x", b'{"own": true}')
        finally:
            b.stop()
        deadline = time.monotonic() + 10
        while not any(t == f"pvgate/{SITE_B}/data/x" for t, _ in center.messages) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert (f"pvgate/{SITE_B}/data/x", b'{"own": true}') in center.messages, "B may publish under its own site"
        forged = [m for m in center.messages if b"forged" in m[1]]
        assert not forged, f"B's credentials published into A's topics: {forged}"
        assert "Denied PUBLISH" in broker.log()
        agent.terminate(timeout=15)
    finally:
        center.stop()
    log = agent.output()
    assert "DEBUG" in log or "INFO" in log
    for secret in (PASSWORDS[SITE_A], KEY_PASSWORD):
        assert secret not in log, "a secret reached the agent's log"


def test_a_client_without_certificate_is_refused(tls_broker: tuple[Broker, Pki]) -> None:
    broker, pki = tls_broker
    client = TlsClient(broker, pki, SITE_B, cert=False).client
    connected = False
    try:
        client.connect("127.0.0.1", broker.port)
        for _ in range(50):  # TLS 1.3: the refusal may only show with the first read
            if client.loop(0.1) != mqtt.MQTT_ERR_SUCCESS:
                break
            if client.is_connected():
                connected = True
                break
    except (ssl.SSLError, OSError):
        pass
    assert not connected, "require_certificate: no client certificate, no connection"


def test_wrong_password_is_refused_and_never_logged(tmp_path: Path, tls_broker: tuple[Broker, Pki], procs: Any) -> None:
    broker, pki = tls_broker
    site = tls_site(tmp_path, broker, pki, free_port(), a_tls(pki))
    wrong = "not-the-password-0c4f"
    agent = start_agent_env(procs, site, {"PVGATE_TEST_MQTT_PW": wrong})
    agent.wait_for_line(r"broker refused the connection", timeout=20)
    assert agent.running
    agent.terminate(timeout=15)
    assert wrong not in agent.output() and KEY_PASSWORD not in agent.output()


def start_agent_env(procs: Any, site: Path, env: dict[str, str]) -> Any:
    agent = procs([sys.executable, "-m", "agent.cli", "run", "-c", str(site)], "agent", env=env)
    agent.wait_for_line(r"running: site", timeout=20, stream="stderr")
    return agent


@pytest.mark.parametrize("case", ["missing cert", "not a certificate", "encrypted key, no password",
                                  "wrong key password"])
def test_unusable_certificate_or_key_is_a_clear_error(tmp_path: Path, tls_broker: tuple[Broker, Pki], case: str) -> None:
    broker, pki = tls_broker
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("this is not a certificate\n")
    wrong = tmp_path / "wrong.pass"
    wrong.write_text("nope\n")
    wrong.chmod(0o600)
    ca, crt = pki["ca.crt"], pki[SITE_A + ".crt"]
    tls, expect = {
        "missing cert": (f"{{ca_file: {ca}, cert_file: {tmp_path}/nowhere.crt, key_file: {pki[SITE_A + '.key']}}}",
                         r"mqtt\.tls\.cert_file: file .*nowhere\.crt does not exist"),
        "not a certificate": (f"{{ca_file: {ca}, cert_file: {garbage}, key_file: {pki[SITE_A + '.key']}}}",
                              r"mqtt\.tls\.cert_file: .*garbage\.pem.*(PEM|pem)"),
        "encrypted key, no password": (f"{{ca_file: {ca}, cert_file: {crt}, key_file: {pki[SITE_A + '.enc.key']}}}",
                                       r"mqtt\.tls\.\w+: .*enc\.key.*encrypted.*key_password_file"),
        "wrong key password": (f"{{ca_file: {ca}, cert_file: {crt}, key_file: {pki[SITE_A + '.enc.key']}, "
                               f"key_password_file: {wrong}}}", r"mqtt\.tls\.\w+: .*enc\.key.*wrong (pass phrase|key password)"),
    }[case]
    site = tls_site(tmp_path, broker, pki, free_port(), tls)
    env = {"PVGATE_TEST_MQTT_PW": PASSWORDS[SITE_A]}
    res = subprocess.run([sys.executable, "-m", "agent.cli", "run", "-c", str(site)], capture_output=True, text=True,
                         timeout=30, cwd=ROOT, env={**os.environ, **env}, stdin=subprocess.DEVNULL)
    assert res.returncode == 78, (res.returncode, res.stdout, res.stderr)
    assert re.search(expect, res.stderr), res.stderr
    assert "Traceback" not in res.stderr and "nothing was started" in res.stderr


def test_tls_context_names_the_file_and_the_fix(tmp_path: Path) -> None:
    """The publisher's own check (a file can change between `pvgate check` and a reconnect)."""
    from agent.config import TlsConfig
    from agent.uplink.tls import TlsSetupError, tls_context

    pki = make_pki(tmp_path / "pki")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("nothing\n")
    assert tls_context(TlsConfig(pki["ca.crt"], pki[SITE_A + ".crt"], pki[SITE_A + ".enc.key"], KEY_PASSWORD))
    cases = [
        (TlsConfig(str(garbage), None, None), r"ca_file .*garbage\.pem: cannot load a CA certificate"),
        (TlsConfig(pki["ca.crt"], str(garbage), pki[SITE_A + ".key"]), r"cert_file .*garbage\.pem.*not a PEM certificate"),
        (TlsConfig(pki["ca.crt"], pki[SITE_A + ".crt"], pki[SITE_A + ".enc.key"]), r"the key is encrypted; set mqtt\.tls\.key_password_file"),
        (TlsConfig(pki["ca.crt"], pki[SITE_A + ".crt"], pki[SITE_A + ".enc.key"], "wrong"), r"wrong key password"),
        (TlsConfig(pki["ca.crt"], str(tmp_path / "gone.crt"), pki[SITE_A + ".key"]), r"cannot read .*gone\.crt"),
    ]
    for tls, expect in cases:
        with pytest.raises(TlsSetupError, match=expect):
            tls_context(tls)
