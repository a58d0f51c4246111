"""`pvgate status`: talks to the running agent over the unix socket in its state directory."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from support.broker import Broker
from support.chain import SimDev, readings, start_agent, start_sim, write_site
from support.collector import Collector
from support.ports import free_port
from support.procs import Proc

DEVICES = [SimDev("inv01", 1, "huawei-sun2000"), SimDev("meter", 11, "chint-dtsu666")]


def _status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", "status", *args], capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)


def test_status_prints_links_devices_values_and_buffer(
        tmp_path: Path, broker: Broker, collector_factory: Callable[..., Collector], procs: Callable[..., Proc]
) -> None:
    port = free_port()
    start_sim(procs, port, DEVICES, speed=60)
    # A third device nobody answers for: it shows up offline, with its failures.
    site = write_site(tmp_path / "site.yaml", site_id="st", broker_port=broker.port, modbus_port=port,
                      devices=[*DEVICES, SimDev("ghost", 42, "chint-dtsu666")], interval="500ms", timeout="0.2s")
    col = collector_factory(["pvgate/st/data/#"])
    start_agent(procs, site)
    col.wait_for(lambda ms: {"inv01", "meter"} <= {r["device"] for r in readings(ms)}, timeout=20)

    out = _status("-c", str(site))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "site st" in text and "running" in text
    assert "LINK" in text and "TRANSACTIONS" in text and "lan" in text and f"127.0.0.1:{port}" in text
    lines = {line.split()[0]: line for line in text.splitlines() if line.split()}
    assert "online" in lines["inv01"] and "huawei-sun2000" in lines["inv01"]
    assert "online" in lines["meter"]
    assert "ghost" in lines and ("offline" in lines["ghost"] or "unknown" in lines["ghost"])
    assert "inv01: last values" in text and "ac_power" in text and "kW" in text
    assert "buffer" in text and "unsent" in text and "last seq" in text
    assert "mqtt" in text and "connected" in text

    raw = _status("--socket", str(tmp_path / "pvgate.sock"), "--json")
    assert raw.returncode == 0, raw.stderr
    st = json.loads(raw.stdout)
    assert st["devices"]["inv01"]["state"] == "online"
    assert st["devices"]["ghost"]["consecutive_failures"] >= 1
    assert st["links"]["lan"]["transactions"] > 0 and st["buffer"]["last_seq"] > 0

    lean = _status("-c", str(site), "--no-values")
    assert lean.returncode == 0 and "last values" not in lean.stdout


def test_status_without_an_agent_says_so(tmp_path: Path) -> None:
    missing = _status("--socket", str(tmp_path / "pvgate.sock"))
    assert missing.returncode == 69
    assert "no agent is running" in missing.stderr and "Traceback" not in missing.stderr
    assert missing.stdout == ""

    # Left behind by an agent that was killed: the file is there, nobody listens.
    short = tempfile.mkdtemp(prefix="pvs-")
    path = os.path.join(short, "pvgate.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()
    stale = _status("--socket", path)
    assert stale.returncode == 69 and "nothing listens" in stale.stderr

    # Located through the site file's agent.state_dir, without needing its secrets.
    site = tmp_path / "site.yaml"
    site.write_text(f"site: {{id: x}}\nmqtt: {{host: h, password: '${{NOT_SET_ANYWHERE}}'}}\n"
                    f"agent: {{state_dir: {tmp_path}}}\n", encoding="utf-8")
    via_site = _status("-c", str(site))
    assert via_site.returncode == 69 and str(tmp_path / "pvgate.sock") in via_site.stderr

    gone = _status("-c", str(tmp_path / "nope.yaml"))
    assert gone.returncode != 0 and "not found" in gone.stderr and "Traceback" not in gone.stderr
