"""The site file (Contract 1) as a technician meets it: `pvgate check`, `pvgate run`, `pvgate-sim`.

Every class of mistake is tested twice: through `agent.config.load_site` (the problem objects)
and through the command line as a subprocess (what is printed, the exit code 78, no traceback).
Each asserts the exact 1-based line, the key path and a piece of the "what is allowed" text.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import EX_CONFIG, SiteConfig, load_site
from drivers.errors import ConfigError, Problem
from drivers.model import LinkType
from support.ports import free_port

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config" / "examples" / "site.yaml"
SIM_EXAMPLE = REPO / "config" / "examples" / "sim.yaml"
TIMEOUT_S = 30

# A valid site file; the tests below change one line of it and name the line they expect.
BASE = """\
site:
  id: test-site
  name: 测试村联村电站
  timezone: Asia/Shanghai
mqtt:
  host: 127.0.0.1
  port: 1883
buffer:
  max_mb: 16
links:
  - id: bus1
    type: rtu
    port: /dev/ttyUSB0
    baudrate: 9600
  - id: lan
    type: tcp
    host: 127.0.0.1
    port: 1502
devices:
  - id: inv01
    link: bus1
    unit: 1
    profile: huawei-sun2000
    interval: 10s
  - id: meter
    link: lan
    unit: 11
    profile: chint-dtsu666
    interval: 5s
"""
# Line numbers of BASE, for readers counting along.
L_SITE_ID, L_MQTT, L_MQTT_HOST, L_LINK_LAN_ID, L_LINK_LAN_PORT = 2, 5, 6, 15, 18
L_DEV_INV_ID, L_DEV_INV_UNIT, L_DEV_INV_PROFILE, L_DEV_INV_INTERVAL = 20, 22, 23, 24
L_DEV_METER_ID, L_DEV_METER_LINK, L_DEV_METER_UNIT, L_DEV_METER_INTERVAL = 25, 26, 27, 29


def edit(text: str, old: str, new: str) -> str:
    """text with the one occurrence of old replaced (fails loudly if old is not unique)."""
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times"
    return text.replace(old, new)


def write(directory: Path, text: str, name: str = "site.yaml") -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment for in-process loads and subprocesses: no stray secrets, a private state dir."""
    state = tmp_path / "state"
    state.mkdir()
    for name in ("PVGATE_MQTT_PASSWORD", "PVGATE_TEST_PASSWORD", "PVGATE_TEST_KEYPASS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PVGATE_STATE_DIR", str(state))
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), out.get("PYTHONPATH", "")]))
    return out


def pvgate(*args: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd or REPO, timeout=TIMEOUT_S, check=False)


def problems_of(path: Path) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        load_site(path)
    return info.value.problems


Want = tuple[int, str, str] | tuple[Path, int, str, str]


def expect(path: Path, env: dict[str, str], *wanted: Want) -> str:
    """`pvgate check` and load_site both report each ([file,] line, key path, message fragment).

    The file defaults to the site file; returns what `pvgate check` printed on stderr.
    """
    located = [w if len(w) == 4 else (path, *w) for w in wanted]
    problems = problems_of(path)
    for file, line, key, fragment in located:
        found = [p for p in problems if p.file == str(file) and p.line == line and p.path == key]
        assert found, f"no problem at {file}:{line} for {key!r}; got:\n" + "\n".join(map(str, problems))
        assert any(fragment in p.message for p in found), (fragment, [p.message for p in found])

    result = pvgate("check", "-c", str(path), env=env)
    assert result.returncode == EX_CONFIG == 78, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    for file, line, key, fragment in located:
        prefix = f"{file}:{line}: {key}: " if key else f"{file}:{line}: "
        hits = [text for text in lines if text.startswith(prefix)]
        assert hits, f"no line starting {prefix!r} in:\n{result.stderr}"
        assert any(fragment in text for text in hits), (fragment, hits)
    assert lines[-1].endswith("nothing was started."), lines[-1]
    return result.stderr


# --- files that are right ----------------------------------------------------------------------


def test_valid_file_exits_0_with_a_summary(tmp_path: Path, env: dict[str, str]) -> None:
    path = write(tmp_path, BASE)
    result = pvgate("check", "-c", str(path), env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    assert f"{path}: OK" in out
    assert "site test-site (测试村联村电站)" in out
    assert "broker 127.0.0.1:1883" in out
    assert "link bus1 (rtu /dev/ttyUSB0@9600): 1 device(s)" in out
    assert "link lan (tcp 127.0.0.1:1502): 1 device(s)" in out
    assert "inv01: unit 1, huawei-sun2000, every 10s" in out
    assert "meter: unit 11, chint-dtsu666, every 5s" in out

    quiet = pvgate("check", "-q", "-c", str(path), env=env)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")


def test_valid_file_gets_the_documented_defaults(tmp_path: Path, env: dict[str, str]) -> None:
    minimal = """\
site: {id: mini}
mqtt: {host: broker.example}
links: [{id: lan, type: tcp, host: 10.0.0.5}]
devices: [{id: inv01, link: lan, profile: huawei-sun2000}]
"""
    cfg = load_site(write(tmp_path, minimal))
    assert isinstance(cfg, SiteConfig)
    assert (cfg.site.name, cfg.site.timezone) == ("mini", "Asia/Shanghai")
    assert (cfg.mqtt.port, cfg.mqtt.topic_prefix, cfg.mqtt.tls, cfg.mqtt.password) == (1883, "pvgate", None, None)
    assert cfg.mqtt.client_id == "pvgate-mini"
    # The buffer lives in the state directory; PVGATE_STATE_DIR moves it (the fixture sets it).
    assert cfg.agent.state_dir == env["PVGATE_STATE_DIR"]
    assert cfg.buffer.path == str(Path(env["PVGATE_STATE_DIR"]) / "buffer.sqlite")
    assert (cfg.buffer.max_mb, cfg.buffer.keep_sent_days) == (1024.0, 7.0)
    link = cfg.link("lan")
    assert (link.type, link.port) == (LinkType.TCP, 502)
    device = cfg.devices[0]
    assert (device.unit, device.interval_s, device.offline_after) == (1, 10.0, 3)


def test_same_unit_on_two_links_is_fine(tmp_path: Path) -> None:
    cfg = load_site(write(tmp_path, edit(BASE, "    unit: 11\n", "    unit: 1\n")))
    assert [(d.link, d.unit) for d in cfg.devices] == [("bus1", 1), ("lan", 1)]


def test_shipped_example_passes_check(env: dict[str, str], tmp_path: Path) -> None:
    # As shipped: no TLS files, no password file, no environment variable needed.
    result = pvgate("check", "-c", str(EXAMPLE), env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "OK — site wuxiang-gucheng" in result.stdout
    cfg = load_site(EXAMPLE)
    assert {link.type for link in cfg.links} == {LinkType.RTU, LinkType.TCP, LinkType.RTU_OVER_TCP}
    assert cfg.site.timezone == "Asia/Shanghai"
    assert any(not c.isascii() for c in cfg.site.name)  # the station's Chinese name
    assert {"huawei-sun2000", "chint-dtsu666"} <= {d.profile.id for d in cfg.devices}


def test_shipped_simulator_file_serves_the_examples_network_devices() -> None:
    """sim.yaml stands in for the example's TCP links: same units, same device maps."""
    from simulator.cli import _load_spec, build_buses
    from simulator.physics import SimClock

    spec = _load_spec(SIM_EXAMPLE)
    buses = build_buses(spec, SimClock.starting_now(spec.speed, None))  # loads every map; no socket
    served = {b.listen.kind: {u: d.profile.id for u, d in b.devices.items()} for b in buses}
    cfg = load_site(EXAMPLE)
    for link in cfg.links:
        if link.type is LinkType.RTU:
            continue
        wanted = {d.unit: d.profile.id for d in cfg.devices_on(link.id)}
        assert served[link.type.value] == wanted, (link.id, served)


# --- one test per class of mistake -------------------------------------------------------------


def test_unknown_key_at_top_level(tmp_path: Path, env: dict[str, str]) -> None:
    path = write(tmp_path, BASE + "sites:\n  id: x\n")
    expect(path, env, (30, "sites", "allowed here: site, mqtt, buffer, links, devices, agent"))


def test_unknown_key_inside_a_device(tmp_path: Path, env: dict[str, str]) -> None:
    path = write(tmp_path, edit(BASE, "    interval: 5s\n", "    interval: 5s\n    intervall: 5s\n"))
    expect(path, env, (30, "devices[1].intervall", "did you mean 'interval'? allowed here: id, link, unit"))


@pytest.mark.parametrize(("old", "new", "line", "key", "fragment"), [
    ("    port: 1502\n", '    port: "1502"\n', L_LINK_LAN_PORT, "links[1].port", "expected a whole number, got text '1502'"),
    ("    interval: 10s\n", "    interval: fast\n", L_DEV_INV_INTERVAL, "devices[0].interval",
     "expected a duration such as 10s, 500ms or 1m"),
    ("    unit: 1\n", "    unit: 300\n", L_DEV_INV_UNIT, "devices[0].unit", "expected a Modbus unit id 1..247"),
    ("    unit: 11\n", "    unit: eleven\n", L_DEV_METER_UNIT, "devices[1].unit", "expected a whole number"),
    ("  port: 1883\n", "  port: true\n", 7, "mqtt.port", "expected a whole number, got true/false"),
], ids=["port-as-text", "interval-fast", "unit-300", "unit-as-text", "port-as-bool"])
def test_wrong_type(tmp_path: Path, env: dict[str, str], old: str, new: str, line: int, key: str,
                    fragment: str) -> None:
    expect(write(tmp_path, edit(BASE, old, new)), env, (line, key, fragment))


def test_unit_0_is_broadcast_on_a_serial_bus(tmp_path: Path, env: dict[str, str]) -> None:
    path = write(tmp_path, edit(BASE, "    unit: 1\n", "    unit: 0\n"))
    expect(path, env, (L_DEV_INV_UNIT, "devices[0].unit", "1..247 on rtu link 'bus1' (0 is broadcast)"))


def test_dangling_link_reference(tmp_path: Path, env: dict[str, str]) -> None:
    path = write(tmp_path, edit(BASE, "    link: lan\n", "    link: lan2\n"))
    expect(path, env, (L_DEV_METER_LINK, "devices[1].link", "no link 'lan2'; links: bus1, lan"))


def test_a_wrong_link_is_not_also_reported_missing(tmp_path: Path, env: dict[str, str]) -> None:
    path = write(tmp_path, edit(BASE, "    type: tcp\n", "    type: modbus-tcp\n"))
    stderr = expect(path, env, (16, "links[1].type", "expected one of tcp, rtu, rtu-over-tcp"))
    assert "no link 'lan'" not in stderr
    assert "1 problem found" in stderr


def test_unknown_profile_lists_the_known_ones(tmp_path: Path, env: dict[str, str]) -> None:
    write(tmp_path, "not: a device map\n", "notes.yaml")  # other YAML beside the site file
    path = write(tmp_path, edit(BASE, "profile: chint-dtsu666", "profile: chint-dtsu66"))
    stderr = expect(path, env, (28, "devices[1].profile", "unknown device map 'chint-dtsu66'; known: "))
    listed = stderr.split("known: ")[1].split(" (")[0].split(", ")
    assert {"chint-dtsu666", "eastron-sdm630", "huawei-sun2000", "sungrow-sg"} <= set(listed)
    assert "site" not in listed and "notes" not in listed  # not device maps
    assert str(tmp_path / "profiles" / "chint-dtsu66.yaml") in stderr  # where an own map would go


def test_duplicate_device_id(tmp_path: Path, env: dict[str, str]) -> None:
    path = write(tmp_path, edit(BASE, "  - id: meter\n", "  - id: inv01\n"))
    expect(path, env, (L_DEV_METER_ID, "devices[1].id", f"duplicate device id 'inv01' (first at line {L_DEV_INV_ID})"))


def test_duplicate_device_is_still_checked_through(tmp_path: Path, env: dict[str, str]) -> None:
    text = edit(edit(BASE, "  - id: meter\n", "  - id: inv01\n"), "    interval: 5s\n", "    interval: soon\n")
    expect(write(tmp_path, text), env,
           (L_DEV_METER_ID, "devices[1].id", "duplicate device id 'inv01'"),
           (L_DEV_METER_INTERVAL, "devices[1].interval", "expected a duration"))


def test_duplicate_link_id(tmp_path: Path, env: dict[str, str]) -> None:
    path = write(tmp_path, edit(BASE, "  - id: lan\n", "  - id: bus1\n"))
    expect(path, env, (L_LINK_LAN_ID, "links[1].id", "duplicate link id 'bus1' (first at line 11)"))


def test_two_devices_with_the_same_unit_on_one_link(tmp_path: Path, env: dict[str, str]) -> None:
    text = edit(edit(BASE, "    link: lan\n", "    link: bus1\n"), "    unit: 11\n", "    unit: 1\n")
    expect(write(tmp_path, text), env,
           (L_DEV_METER_UNIT, "devices[1].unit", "unit 1 on link 'bus1' is already used by device 'inv01'"))


@pytest.mark.parametrize(("old", "new", "line", "key", "fragment"), [
    ("  id: test-site\n", "", 2, "site.id", "required key is missing"),
    ("  host: 127.0.0.1\n  port: 1883\n", "  port: 1883\n", 6, "mqtt.host", "required key is missing"),
    (BASE[BASE.index("links:"):BASE.index("devices:")], "", 1, "links", "required section is missing"),
    (BASE[BASE.index("devices:"):], "", 1, "devices", "required section is missing"),
    ("devices:\n", "devices: []\nx-devices:\n", 19, "devices", "at least one device is required"),
], ids=["site.id", "mqtt.host", "links", "devices", "devices-empty"])
def test_missing_required_keys(tmp_path: Path, env: dict[str, str], old: str, new: str, line: int, key: str,
                               fragment: str) -> None:
    expect(write(tmp_path, edit(BASE, old, new)), env, (line, key, fragment))


def test_invalid_site_id_characters(tmp_path: Path, env: dict[str, str]) -> None:
    path = write(tmp_path, edit(BASE, "  id: test-site\n", "  id: Test_Site/1\n"))
    expect(path, env, (L_SITE_ID, "site.id", "use lower-case letters a-z, digits and '-'"))


def test_site_id_in_chinese_is_refused(tmp_path: Path, env: dict[str, str]) -> None:
    # The name may be Chinese; the id goes into MQTT topics and must not.
    path = write(tmp_path, edit(BASE, "  id: test-site\n", "  id: 故城村\n"))
    expect(path, env, (L_SITE_ID, "site.id", "'故城村': use lower-case letters a-z"))


def test_broker_host_with_scheme_or_port(tmp_path: Path, env: dict[str, str]) -> None:
    path = write(tmp_path, edit(BASE, "mqtt:\n  host: 127.0.0.1\n", "mqtt:\n  host: mqtt://ops.county.example:1883\n"))
    expect(path, env, (L_MQTT_HOST, "mqtt.host", "host name or IP address only, without a scheme"))
    path = write(tmp_path, edit(BASE, "mqtt:\n  host: 127.0.0.1\n", "mqtt:\n  host: ops.county.example:1883\n"))
    expect(path, env, (L_MQTT_HOST, "mqtt.host", "the port goes in port"))


# --- secrets and files --------------------------------------------------------------------------

MQTT_LINES = "mqtt:\n  host: 127.0.0.1\n  port: 1883\n"


def with_mqtt(extra: str) -> str:
    """BASE with lines added after mqtt.port (line 7): the first added line is line 8."""
    return edit(BASE, MQTT_LINES, MQTT_LINES + extra)


def test_tls_ca_file_missing(tmp_path: Path, env: dict[str, str]) -> None:
    ca = tmp_path / "nowhere" / "ca.pem"
    path = write(tmp_path, with_mqtt(f"  tls:\n    ca_file: {ca}\n"))
    expect(path, env, (9, "mqtt.tls.ca_file", f"file {ca} does not exist"))


def test_tls_ca_file_that_is_not_a_certificate(tmp_path: Path, env: dict[str, str]) -> None:
    ca = write(tmp_path, "this is not a certificate\n", "ca.pem")
    path = write(tmp_path, with_mqtt(f"  tls:\n    ca_file: {ca}\n"))
    expect(path, env, (9, "mqtt.tls.ca_file", "is not a PEM certificate"))


def _openssl_pair(directory: Path, name: str) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", f"/CN={name}"],
                   check=True, capture_output=True, timeout=TIMEOUT_S)
    return cert, key


def test_tls_certificate_and_key_that_do_not_belong_together(tmp_path: Path, env: dict[str, str]) -> None:
    cert_a, _ = _openssl_pair(tmp_path, "a")
    _, key_b = _openssl_pair(tmp_path, "b")
    good = load_site(write(tmp_path, with_mqtt(f"  tls:\n    ca_file: {cert_a}\n")))
    assert good.mqtt.tls is not None and good.mqtt.port == 1883  # port given explicitly
    path = write(tmp_path, with_mqtt(f"  tls:\n    ca_file: {cert_a}\n    cert_file: {cert_a}\n"
                                     f"    key_file: {key_b}\n"))
    expect(path, env, (10, "mqtt.tls.cert_file", "key values mismatch"))


def test_password_file_missing(tmp_path: Path, env: dict[str, str]) -> None:
    secret = tmp_path / "mqtt.pass"
    path = write(tmp_path, with_mqtt(f"  username: test-site\n  password_file: {secret}\n"))
    expect(path, env, (9, "mqtt.password_file", f"file {secret} does not exist"))


def test_password_file_that_is_a_directory(tmp_path: Path, env: dict[str, str]) -> None:
    # Unreadable as a password file, whoever runs the test (root reads any plain file).
    secret = tmp_path / "mqtt.pass"
    secret.mkdir()
    path = write(tmp_path, with_mqtt(f"  username: test-site\n  password_file: {secret}\n"))
    expect(path, env, (9, "mqtt.password_file", "is not a file (a directory?)"))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root reads files whatever their mode; the directory test covers this as root")
def test_password_file_without_read_permission(tmp_path: Path, env: dict[str, str]) -> None:
    secret = write(tmp_path, "s3cret\n", "mqtt.pass")
    secret.chmod(0)
    path = write(tmp_path, with_mqtt(f"  username: test-site\n  password_file: {secret}\n"))
    expect(path, env, (9, "mqtt.password_file", "cannot be read by this user"))


def test_password_file_that_is_empty(tmp_path: Path, env: dict[str, str]) -> None:
    secret = write(tmp_path, "\n", "mqtt.pass")
    secret.chmod(0o600)
    path = write(tmp_path, with_mqtt(f"  username: test-site\n  password_file: {secret}\n"))
    expect(path, env, (9, "mqtt.password_file", "is empty"))


def test_password_file_is_read_and_never_printed(tmp_path: Path, env: dict[str, str]) -> None:
    secret = write(tmp_path, "Pa55-word\n", "mqtt.pass")
    secret.chmod(0o640)
    path = write(tmp_path, with_mqtt(f"  username: test-site\n  password_file: {secret}\n"))
    assert load_site(path).mqtt.password == "Pa55-word"
    result = pvgate("check", "-c", str(path), env=env)
    assert result.returncode == 0, result.stderr
    assert "Pa55-word" not in result.stdout + result.stderr


def test_password_in_plain_text_is_refused(tmp_path: Path, env: dict[str, str]) -> None:
    path = write(tmp_path, with_mqtt("  username: test-site\n  password: hunter2-plain\n"))
    stderr = expect(path, env, (9, "mqtt.password", "write it as ${ENV_NAME} or use password_file"))
    assert "hunter2-plain" not in stderr  # a refused secret is not echoed either


def test_password_as_a_number_is_plain_text_too(tmp_path: Path, env: dict[str, str]) -> None:
    path = write(tmp_path, with_mqtt("  username: test-site\n  password: 20241129\n"))
    stderr = expect(path, env, (9, "mqtt.password", "or use password_file"))
    assert "20241129" not in stderr


def test_password_from_env_not_set(tmp_path: Path, env: dict[str, str]) -> None:
    path = write(tmp_path, with_mqtt("  username: test-site\n  password: ${PVGATE_TEST_PASSWORD}\n"))
    expect(path, env, (9, "mqtt.password", "environment variable PVGATE_TEST_PASSWORD is not set"))


def test_password_from_env_set(tmp_path: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, with_mqtt("  username: test-site\n  password: ${PVGATE_TEST_PASSWORD}\n"))
    monkeypatch.setenv("PVGATE_TEST_PASSWORD", "from-env-42")
    assert load_site(path).mqtt.password == "from-env-42"
    result = pvgate("check", "-c", str(path), env={**env, "PVGATE_TEST_PASSWORD": "from-env-42"})
    assert result.returncode == 0, result.stderr
    assert "from-env-42" not in result.stdout + result.stderr


def test_password_without_username(tmp_path: Path, env: dict[str, str]) -> None:
    # paho sends no password without a user name: the broker would see an anonymous client.
    path = write(tmp_path, with_mqtt("  password: ${HOME}\n"))
    expect(path, env, (8, "mqtt.password", "a password needs a username"))


# --- the file itself ----------------------------------------------------------------------------


def test_yaml_syntax_error_names_the_line(tmp_path: Path, env: dict[str, str]) -> None:
    # A device written with one space too few: PyYAML notices at line 23.
    path = write(tmp_path, edit(BASE, "    profile: huawei-sun2000\n", "   profile: huawei-sun2000\n"))
    expect(path, env, (L_DEV_INV_PROFILE, "", "not valid YAML"))


def test_yaml_tab_indentation(tmp_path: Path, env: dict[str, str]) -> None:
    path = write(tmp_path, edit(BASE, "  port: 1883\n", "\tport: 1883\n"))
    expect(path, env, (7, "", "indent with spaces, not tabs"))


def test_yaml_unclosed_quote_names_where_it_opens(tmp_path: Path, env: dict[str, str]) -> None:
    # PyYAML only notices at the end of the file; the line to fix is where the quote opens.
    path = write(tmp_path, edit(BASE, "  name: 测试村联村电站\n", "  name: '测试村联村电站\n"))
    expect(path, env, (3, "", "a quote is not closed"))


def test_duplicate_yaml_key(tmp_path: Path, env: dict[str, str]) -> None:
    path = write(tmp_path, edit(BASE, "    unit: 11\n", "    unit: 11\n    unit: 12\n"))
    expect(path, env, (28, "devices[1].unit", "duplicate key (YAML would keep only the last)"))


def test_duplicate_top_level_section(tmp_path: Path, env: dict[str, str]) -> None:
    path = write(tmp_path, BASE + "mqtt:\n  host: 10.0.0.1\n")
    expect(path, env, (30, "mqtt", "duplicate key"))


@pytest.mark.parametrize("text", ["", "\n\n", "# nothing here yet\n"], ids=["empty", "blank", "comment"])
def test_empty_file(tmp_path: Path, env: dict[str, str], text: str) -> None:
    path = write(tmp_path, text)
    expect(path, env, (1, "", "the file is empty; a site file needs the sections site, mqtt, links and devices"))


def test_file_that_is_not_a_mapping(tmp_path: Path, env: dict[str, str]) -> None:
    path = write(tmp_path, "- site\n- mqtt\n")
    expect(path, env, (1, "", "expected a mapping, got a list"))


def test_file_saved_in_gbk(tmp_path: Path, env: dict[str, str]) -> None:
    path = tmp_path / "site.yaml"
    path.write_bytes(BASE.encode("gbk"))  # what a Chinese Windows editor saves by default
    expect(path, env, (3, "", "not UTF-8 text"))


def test_file_with_a_byte_order_mark_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_bytes(BASE.encode("utf-8-sig"))  # Windows Notepad
    assert load_site(path).site.id == "test-site"


def test_missing_site_file(tmp_path: Path, env: dict[str, str]) -> None:
    path = tmp_path / "nope.yaml"
    result = pvgate("check", "-c", str(path), env=env)
    assert result.returncode == 78
    assert f"{path}: file not found" in result.stderr
    assert "Traceback" not in result.stderr


# --- device maps of the site's own ----------------------------------------------------------------

MAP_HEAD = "id: {id}\nname: Test inverter\npoints:\n"


def site_with_map(tmp_path: Path, map_id: str, map_text: str) -> tuple[Path, Path]:
    """A site whose meter uses the device map profiles/<map_id>.yaml beside the site file."""
    map_path = write(tmp_path, map_text, f"profiles/{map_id}.yaml")
    site = write(tmp_path, edit(BASE, "profile: chint-dtsu666", f"profile: {map_id}"))
    return site, map_path


def test_own_device_map_is_used(tmp_path: Path) -> None:
    site, _ = site_with_map(tmp_path, "my-inv", MAP_HEAD.format(id="my-inv")
                            + "  - {key: ac_power, address: 100, type: i32, scale: 0.001, unit: kW}\n")
    cfg = load_site(site)
    assert [p.key for p in cfg.devices[1].profile.points] == ["ac_power"]


def test_device_map_address_overlap(tmp_path: Path, env: dict[str, str]) -> None:
    site, map_path = site_with_map(tmp_path, "my-inv", MAP_HEAD.format(id="my-inv")
                                   + "  - {key: ac_power, address: 100, type: i32, unit: kW}\n"
                                   + "  - {key: energy_total, address: 101, type: u32, unit: kWh}\n")
    expect(site, env,
           (map_path, 5, "points.energy_total", "registers 101..102 overlap 'ac_power' (100..101) in the holding table"),
           (28, "devices[1].profile", "device map 'my-inv' has errors (above)"))
    problems = problems_of(site)
    assert problems[0].file == str(map_path)
    assert (problems[-1].line, problems[-1].path) == (28, "devices[1].profile")
    assert "device map 'my-inv' has errors (above)" in problems[-1].message


def test_device_map_overlap_beyond_the_neighbour(tmp_path: Path, env: dict[str, str]) -> None:
    # A long string covers two later points; both are reported, not only the adjacent one.
    site, map_path = site_with_map(tmp_path, "my-inv", MAP_HEAD.format(id="my-inv")
                                   + "  - {key: model, address: 0, type: string, count: 10}\n"
                                   + "  - {key: a, address: 2, type: u16}\n"
                                   + "  - {key: b, address: 6, type: u16}\n")
    expect(site, env, (map_path, 5, "points.a", "overlap 'model' (0..9)"),
           (map_path, 6, "points.b", "overlap 'model' (0..9)"))


def test_device_map_unknown_type(tmp_path: Path, env: dict[str, str]) -> None:
    site, map_path = site_with_map(tmp_path, "my-inv", MAP_HEAD.format(id="my-inv")
                                   + "  - {key: ac_power, address: 100, type: i32}\n"
                                   + "  - key: temperature\n"
                                   + "    address: 110\n"
                                   + "    type: int8\n")
    expect(site, env, (map_path, 7, "points[1].type", "'int8' is not allowed; expected one of u16, i16, u32, i32"))


def test_device_map_bad_extends(tmp_path: Path, env: dict[str, str]) -> None:
    site, map_path = site_with_map(tmp_path, "my-inv", "id: my-inv\nextends: huawei-sun2001\npoints:\n"
                                   "  - {key: extra_power, address: 40000, type: i32}\n")
    expect(site, env, (map_path, 2, "extends", "no device map 'huawei-sun2001'; known: acrel-adl3000, chint-dtsu666"),
           (28, "devices[1].profile", "has errors (above)"))


def test_device_map_extending_overlaps_its_parent(tmp_path: Path, env: dict[str, str]) -> None:
    site, map_path = site_with_map(tmp_path, "my-inv", "id: my-inv\nextends: huawei-sun2000\npoints:\n"
                                   "  - {key: extra_power, address: 32080, type: i32}\n")
    expect(site, env, (map_path, 4, "points.extra_power", "overlap 'ac_power' (from huawei-sun2000)"))


def test_device_map_bad_defaults_give_a_message_not_a_traceback(tmp_path: Path, env: dict[str, str]) -> None:
    site, map_path = site_with_map(tmp_path, "my-inv", "id: my-inv\ndefaults: {table: holdings, word_order: middle}\n"
                                   "points:\n  - {key: ac_power, address: 100, type: i32}\n")
    expect(site, env, (map_path, 2, "defaults.table", "expected one of holding, input, coil, discrete"),
           (map_path, 2, "defaults.word_order", "expected one of big, little"))


def test_device_map_id_differs_from_its_file_name(tmp_path: Path, env: dict[str, str]) -> None:
    site, map_path = site_with_map(tmp_path, "my-inv", "id: my-inverter\npoints:\n  - {key: a, address: 1, type: u16}\n")
    expect(site, env, (map_path, 1, "id", "'my-inverter' differs from the file name my-inv.yaml"))


def test_device_map_shared_by_two_devices_is_reported_once(tmp_path: Path, env: dict[str, str]) -> None:
    map_path = write(tmp_path, MAP_HEAD.format(id="my-inv") + "  - {key: a, address: 1, type: int8}\n",
                     "profiles/my-inv.yaml")
    text = BASE.replace("profile: chint-dtsu666", "profile: my-inv").replace("profile: huawei-sun2000",
                                                                            "profile: my-inv")
    stderr = expect(write(tmp_path, text), env, (map_path, 4, "points[0].type", "'int8' is not allowed"))
    assert stderr.count("'int8' is not allowed") == 1
    assert stderr.count("has errors (above)") == 2


# --- many at once, and `run` --------------------------------------------------------------------


def test_several_mistakes_are_all_reported_in_one_run(tmp_path: Path, env: dict[str, str]) -> None:
    text = BASE + "extra: 1\n"
    text = edit(text, "  id: test-site\n", "  id: Test Site\n")
    text = edit(text, "    port: 1502\n", "    port: fifteen-oh-two\n")
    text = edit(text, "    interval: 10s\n", "    interval: fast\n")
    text = edit(text, "profile: chint-dtsu666", "profile: chint")
    text = edit(text, MQTT_LINES, MQTT_LINES.replace("port: 1883", "port: 1883\n  password: plain"))
    stderr = expect(write(tmp_path, text), env,
                    (31, "extra", "unknown key"),
                    (L_SITE_ID, "site.id", "use lower-case letters"),
                    (8, "mqtt.password", "use password_file"),
                    (L_LINK_LAN_PORT + 1, "links[1].port", "expected a whole number"),
                    (L_DEV_INV_INTERVAL + 1, "devices[0].interval", "expected a duration"),
                    (L_DEV_METER_ID + 4, "devices[1].profile", "unknown device map 'chint'"))
    assert stderr.splitlines()[-1] == "7 problems found; nothing was started."  # + password without username


def test_run_with_a_bad_file_exits_78_before_starting_anything(tmp_path: Path, env: dict[str, str]) -> None:
    buffer = tmp_path / "buf" / "buffer.sqlite"
    buffer.parent.mkdir()
    text = edit(BASE, "  max_mb: 16\n", f"  max_mb: 16\n  path: {buffer}\n")
    text = edit(text, "    link: lan\n", "    link: nowhere\n")
    path = write(tmp_path, text)
    result = pvgate("run", "-c", str(path), env=env)
    assert result.returncode == 78, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{path}:27: devices[1].link: no link 'nowhere'" in result.stderr
    assert list(buffer.parent.iterdir()) == []  # no buffer, no WAL, no lock
    assert list(Path(env["PVGATE_STATE_DIR"]).iterdir()) == []


# --- the simulator's command line ---------------------------------------------------------------


def pvgate_sim(*args: str) -> subprocess.CompletedProcess[str]:
    # If a mistake were missed the simulator would serve until the timeout: that fails the test.
    return subprocess.run([sys.executable, "-m", "simulator.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=TIMEOUT_S, check=False)


def test_sim_unknown_profile() -> None:
    result = pvgate_sim("--listen", f"tcp://127.0.0.1:{free_port()}", "--device", "1:huawei-sun3000")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "unknown device map 'huawei-sun3000'; known: " in result.stderr
    assert "huawei-sun2000" in result.stderr


@pytest.mark.parametrize("device", ["huawei-sun2000", "one:huawei-sun2000", "1:huawei-sun2000:50:x"])
def test_sim_bad_device_argument(device: str) -> None:
    result = pvgate_sim("--listen", f"tcp://127.0.0.1:{free_port()}", "--device", device)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert f"--device {device}: expected UNIT:PROFILE" in result.stderr


def test_sim_file_with_unknown_profile(tmp_path: Path) -> None:
    spec = write(tmp_path, f"listeners:\n  - listen: tcp://127.0.0.1:{free_port()}\n"
                           "    devices:\n      - {unit: 1, profile: nope}\n", "sim.yaml")
    result = pvgate_sim("-c", str(spec))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "unknown device map 'nope'" in result.stderr


def test_sim_file_with_unknown_key(tmp_path: Path) -> None:
    spec = write(tmp_path, f"listeners:\n  - listen: tcp://127.0.0.1:{free_port()}\n"
                           "    devices:\n      - {unit: 1, profile: huawei-sun2000, kw: 50}\n", "sim.yaml")
    result = pvgate_sim("-c", str(spec))
    assert result.returncode == 78
    assert "Traceback" not in result.stderr
    assert f"{spec}:4: listeners[0].devices[0].kw: unknown key" in result.stderr


def test_sim_unknown_timezone() -> None:
    result = pvgate_sim("--listen", f"tcp://127.0.0.1:{free_port()}", "--device", "1:huawei-sun2000",
                        "--timezone", "Asia/Beijing")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr


# --- mqtt: protocol and limits ----------------------------------------------------------------


@pytest.mark.parametrize(("new", "key", "fragment"), [
    ("  protocol: 4\n", "mqtt.protocol", "expected 5 or 3.1.1"),
    ("  protocol: mqtt5\n", "mqtt.protocol", "expected 5 or 3.1.1"),
    ("  max_message_kb: 2\n", "mqtt.max_message_kb", "expected 4..262144"),
    ("  max_message_kb: big\n", "mqtt.max_message_kb", "expected a number"),
    ("  resend_kb_per_min: 0\n", "mqtt.resend_kb_per_min", "expected 1..1048576"),
], ids=["protocol-4", "protocol-text", "message-too-small", "message-text", "resend-0"])
def test_mqtt_protocol_and_limits_are_checked(tmp_path: Path, env: dict[str, str], new: str, key: str,
                                              fragment: str) -> None:
    expect(write(tmp_path, edit(BASE, "  port: 1883\n", "  port: 1883\n" + new)), env, (8, key, fragment))


def test_mqtt_protocol_and_limits_defaults_and_values(tmp_path: Path) -> None:
    mqtt = load_site(write(tmp_path, BASE)).mqtt
    assert (mqtt.protocol, mqtt.max_message_kb, mqtt.resend_kb_per_min) == ("5", 64.0, 256.0)
    text = edit(BASE, "  port: 1883\n", "  port: 1883\n  protocol: 3.1.1\n  max_message_kb: 7.5\n"
                "  resend_kb_per_min: 32\n")
    mqtt = load_site(write(tmp_path, text, "other.yaml")).mqtt
    assert (mqtt.protocol, mqtt.max_message_kb, mqtt.resend_kb_per_min) == ("3.1.1", 7.5, 32.0)
