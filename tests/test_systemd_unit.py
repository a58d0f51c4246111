"""The systemd unit (verify + hardening score) and the installer script.

The systemd-analyze tests skip where it is not installed; the static checks always run.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "pvgate.service"
INSTALL_SH = REPO / "systemd" / "install.sh"
UNIT_DST = Path("/etc/systemd/system/pvgate.service")
MAX_EXPOSURE = 2.5

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not on PATH"
)


def _systemd_version() -> int:
    assert SYSTEMD_ANALYZE is not None
    out = subprocess.run(
        [SYSTEMD_ANALYZE, "--version"], capture_output=True, text=True, timeout=30
    ).stdout
    match = re.search(r"systemd (\d+)", out)
    return int(match.group(1)) if match else 0


def _unit_settings() -> list[tuple[str, str]]:
    """(key, value) pairs of the unit, comments dropped."""
    pairs: list[tuple[str, str]] = []
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        pairs.append((key.strip(), value.strip()))
    return pairs


def _runnable_copy(directory: Path) -> Path:
    """The unit with ExecStart pointed at a binary that exists on this machine.

    `systemd-analyze verify` rejects a unit whose ExecStart binary is missing, and the
    pvgate venv (/opt/pvgate/venv) only exists on an installed gateway.
    """
    true_bin = shutil.which("true") or "/bin/true"
    text = re.sub(
        r"^ExecStart=\S+", f"ExecStart={true_bin}", UNIT.read_text(), flags=re.MULTILINE
    )
    copy = directory / "pvgate.service"
    copy.write_text(text)
    return copy


# --- static checks (no systemd needed) ----------------------------------------------


def test_unit_has_required_settings() -> None:
    settings = _unit_settings()
    keys = {k for k, _ in settings}
    as_set = set(settings)

    assert ("Type", "notify") in as_set
    assert ("NotifyAccess", "main") in as_set
    assert "WatchdogSec" in keys
    assert ("Restart", "on-failure") in as_set
    assert ("SupplementaryGroups", "dialout") in as_set
    assert ("DevicePolicy", "closed") in as_set
    for tty in ("ttyUSB", "ttyS", "ttyACM"):
        assert ("DeviceAllow", f"char-{tty} rw") in as_set, tty
    assert ("StateDirectory", "pvgate") in as_set
    assert ("ProtectSystem", "strict") in as_set
    assert ("ExecStart", "/opt/pvgate/venv/bin/pvgate run -c /etc/pvgate/site.yaml") in as_set


def test_unit_keeps_serial_ports_and_notify_socket_usable() -> None:
    settings = dict(_unit_settings())
    # PrivateDevices=yes would hide /dev/tty*; an empty value is the default (off).
    assert settings.get("PrivateDevices", "no") in {"no", "false", ""}
    # AF_UNIX carries the sd_notify datagrams; INET for the broker and TCP DTUs.
    families = settings["RestrictAddressFamilies"].split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(families)
    assert "IPAddressDeny" not in settings
    assert "PrivateNetwork" not in settings


# --- systemd-analyze ----------------------------------------------------------------


@needs_systemd_analyze
def test_unit_verifies(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    copy = _runnable_copy(tmp_path)
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    complaints = [line for line in output.splitlines() if "pvgate" in line]
    assert complaints == []


@needs_systemd_analyze
def test_unmodified_unit_fails_verify_only_for_missing_venv() -> None:
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(UNIT)], capture_output=True, text=True, timeout=60
    )
    complaints = [
        line for line in (result.stdout + result.stderr).splitlines() if "pvgate" in line
    ]
    if Path("/opt/pvgate/venv/bin/pvgate").exists():
        assert result.returncode == 0, complaints
    else:
        assert complaints, "expected a complaint about the missing ExecStart binary"
        assert all("/opt/pvgate/venv/bin/pvgate" in line for line in complaints), complaints


@needs_systemd_analyze
def test_security_exposure_score(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    if _systemd_version() < 250:
        pytest.skip("systemd-analyze security --offline needs systemd >= 250")
    copy = _runnable_copy(tmp_path)
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--no-pager", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+:\s*(\d+(?:\.\d+)?)", output)
    assert match, output
    score = float(match.group(1))
    assert score <= MAX_EXPOSURE, f"exposure {score} > {MAX_EXPOSURE}\n{output}"


# --- install.sh ---------------------------------------------------------------------


def test_install_script_parses() -> None:
    result = subprocess.run(
        ["bash", "-n", str(INSTALL_SH)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not on PATH")
def test_install_script_is_shellcheck_clean() -> None:
    result = subprocess.run(
        ["shellcheck", str(INSTALL_SH)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _user_exists(name: str) -> bool:
    return subprocess.run(["id", "-u", name], capture_output=True, timeout=10).returncode == 0


def test_install_dry_run_prints_plan_and_changes_nothing(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    before = {
        "user": _user_exists("pvgate"),
        "conf": Path("/etc/pvgate").exists(),
        "unit": UNIT_DST.exists(),
    }
    # --dry-run skips the root check, so this runs the same as root or not.
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(INSTALL_SH), "--dry-run", "--prefix", str(prefix)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    out = result.stdout
    assert result.returncode == 0, result.stdout + result.stderr

    actions = [line for line in out.splitlines() if line.startswith("[dry-run]")]
    assert actions, out
    if before["user"]:
        assert "user pvgate exists" in out
    else:
        assert any("useradd" in a and "pvgate" in a and "nologin" in a for a in actions)
    assert any(f"-m venv {prefix}/venv" in a for a in actions), out
    assert any("pip install" in a and str(REPO) in a and "-e" not in a.split() for a in actions)
    assert any(str(UNIT_DST) in a for a in actions), out
    assert any(f"{prefix}/venv/bin/pvgate check -c /etc/pvgate/site.yaml" in a for a in actions)

    assert not prefix.exists()
    assert _user_exists("pvgate") == before["user"]
    assert Path("/etc/pvgate").exists() == before["conf"]
    assert UNIT_DST.exists() == before["unit"]


def test_install_refuses_non_root() -> None:
    if os.geteuid() != 0:
        cmd = ["bash", str(INSTALL_SH), "--prefix", "/nonexistent"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    else:
        # Drop to nobody; the script must be readable by it, and tmp dirs from pytest
        # are root-only, so copy it somewhere world-readable.
        directory = Path(tempfile.mkdtemp(prefix="pvgate-install-"))
        try:
            directory.chmod(0o755)
            script = directory / "install.sh"
            shutil.copy(INSTALL_SH, script)
            script.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
            result = subprocess.run(
                ["bash", str(script), "--prefix", "/nonexistent"],
                capture_output=True,
                text=True,
                timeout=30,
                user=65534,
                group=65534,
                extra_groups=[],
                cwd="/",
            )
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    assert result.returncode == 1
    assert "must be run as root" in result.stderr


# --- serial ports under DevicePolicy=closed --------------------------------------------

# DeviceAllow=char-<group> names a driver as listed in /proc/devices ("Character devices"), matched
# with shell globbing (systemd.resource-control(5), "Device Access"); it is not a /dev name pattern.
# Each device node a gateway's RS-485 port appears as, and the tty driver name its kernel driver
# registers (tty_driver.name / uart_driver.dev_name), which is what /proc/devices lists:
SERIAL_NODES = {
    "/dev/ttyAMA0": "ttyAMA",  # drivers/tty/serial/amba-pl011.c (Raspberry Pi PL011)
    "/dev/ttymxc1": "ttymxc",  # drivers/tty/serial/imx.c (NXP i.MX)
    "/dev/ttyUSB0": "ttyUSB",  # drivers/usb/serial/usb-serial.c (FTDI, CH341, CP210x, PL2303)
    "/dev/ttyACM0": "ttyACM",  # drivers/usb/class/cdc-acm.c
    "/dev/ttyS1": "ttyS",  # drivers/tty/serial/8250/8250_core.c
    "/dev/ttySC0": "ttySC",  # drivers/tty/serial/sc16is7xx.c (SPI/I2C RS-485 HATs)
    "/dev/ttyLP1": "ttyLP",  # drivers/tty/serial/fsl_lpuart.c (i.MX8, Layerscape)
}


def _systemd_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values, read as systemd.syntax(7) says: comments are whole lines starting
    with # or ;, a trailing backslash continues the line, a key may repeat."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith(("#", ";"))):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _allowed(device: str, allow: list[str]) -> bool:
    """Whether DeviceAllow= entries grant rw on device (a node path, or its /proc/devices group)."""
    import fnmatch

    group = SERIAL_NODES[device]
    for entry in allow:
        spec, _, access = entry.partition(" ")
        if not {"r", "w"} <= set(access):
            continue
        if spec == device or (spec.startswith("char-") and fnmatch.fnmatchcase(group, spec[5:])):
            return True
    return False


@pytest.mark.parametrize("device", sorted(SERIAL_NODES))
def test_serial_ports_of_real_gateways_are_allowed(device: str) -> None:
    service = _systemd_unit(UNIT.read_text())["Service"]
    assert service["DevicePolicy"] == ["closed"]
    assert _allowed(device, service["DeviceAllow"]), (device, service["DeviceAllow"])


def test_device_allow_is_not_wider_than_serial_ports() -> None:
    allow = _systemd_unit(UNIT.read_text())["Service"]["DeviceAllow"]
    for entry in allow:
        spec, _, access = entry.partition(" ")
        assert spec.startswith("char-tty") and "*" not in spec and access == "rw", entry
    # "tty" itself would be /dev/tty1.. (consoles), "pts" every terminal: never allowed.
    assert not any(e.split()[0] in {"char-tty", "char-pts", "char-ptm"} for e in allow)


def test_status_socket_is_under_runtime_directory() -> None:
    service = _systemd_unit(UNIT.read_text())["Service"]
    assert service["RuntimeDirectory"] == ["pvgate"]
    assert "PVGATE_RUNTIME_DIR=/run/pvgate" in service["Environment"]


def test_socket_path_follows_runtime_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from agent.service.status import find_socket, socket_path

    monkeypatch.delenv("PVGATE_RUNTIME_DIR", raising=False)
    assert socket_path(tmp_path) == tmp_path / "pvgate.sock"
    assert find_socket(tmp_path) == tmp_path / "pvgate.sock"
    monkeypatch.setenv("PVGATE_RUNTIME_DIR", str(tmp_path / "run"))
    assert socket_path("/var/lib/pvgate") == tmp_path / "run" / "pvgate.sock"
    assert find_socket("/var/lib/pvgate") == tmp_path / "run" / "pvgate.sock"


def test_drop_in_documented_for_other_serial_drivers() -> None:
    ops = (REPO / "docs" / "operations.md").read_text()
    assert "pvgate.service.d" in ops and "DeviceAllow=char-" in ops and "/proc/devices" in ops
