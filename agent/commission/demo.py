"""`pvgate demo`: the whole chain on one machine with no hardware and no setup.

Starts a broker (mosquitto when installed, else the pure-Python amqtt broker if that is
installed), the simulator with three inverters and a meter, and the agent, each as its own
process, then shows what arrives at the broker, live, the way the county center would see it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from drivers.errors import PvgateError

SITE = "demo-gucheng"
DEVICES = [("inv01", 1, "huawei-sun2000", 60), ("inv02", 2, "huawei-sun2000", 50),
           ("inv03", 3, "huawei-sun2000", 50), ("meter", 11, "chint-dtsu666", 160)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PvgateError(f"{what} exited at start (code {proc.returncode})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise PvgateError(f"{what} did not open port {port} within {timeout:g}s")


def _start_broker(work: Path, port: int, kind: str = "auto") -> tuple[subprocess.Popen[bytes], str]:
    """The broker, and the MQTT protocol to speak to it (amqtt knows 3.1.1 only)."""
    mosquitto = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    if kind == "embedded":
        mosquitto = None
    elif kind == "mosquitto" and mosquitto is None:
        raise PvgateError("mosquitto is not installed (apt-get install mosquitto)")
    log = open(work / "broker.log", "wb")
    if mosquitto:
        conf = work / "mosquitto.conf"
        user = "user root\n" if os.geteuid() == 0 else ""
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{user}", encoding="utf-8")
        proc = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=log, stderr=log)
        print(f"broker   mosquitto on 127.0.0.1:{port}")
    else:
        import importlib.util

        if importlib.util.find_spec("amqtt") is None:
            raise PvgateError("no MQTT broker: install mosquitto (apt-get install mosquitto) "
                              "or the embedded one (pip install 'pvgate[demo]')") from None
        conf = work / "amqtt.yaml"
        conf.write_text(f"listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{port}\n"
                        "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n",
                        encoding="utf-8")
        proc = subprocess.Popen([sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(conf)],
                                stdout=log, stderr=log)
        print(f"broker   embedded amqtt on 127.0.0.1:{port}")
    _wait_port(port, proc, "the broker")
    return proc, "5" if mosquitto else "3.1.1"


def _site_file(work: Path, broker_port: int, modbus_port: int, protocol: str = "5") -> Path:
    devices = "\n".join(f"  - {{id: {d}, link: lan, unit: {u}, profile: {p}, interval: 5s}}" for d, u, p, _ in DEVICES)
    path = work / "site.yaml"
    path.write_text(f"""# Written by `pvgate demo`: the same file a technician writes for a real station.
site:
  id: {SITE}
  name: 故城村 联村光伏电站 (demo)
  timezone: Asia/Shanghai
  capacity_kwp: 320
mqtt:
  host: 127.0.0.1
  port: {broker_port}
  protocol: {protocol}
buffer:
  path: {work / 'buffer.sqlite'}
agent:
  state_dir: {work}
  health_interval: 30s
links:
  - {{id: lan, type: tcp, host: 127.0.0.1, port: {modbus_port}}}
devices:
{devices}
""", encoding="utf-8")
    return path


class LiveView:
    """Subscribes like the county center and prints one line per message."""

    def __init__(self, port: int) -> None:
        self.count = 0
        self.readings = 0
        self.seqs: set[int] = set()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="pvgate-demo-view")
        self.client.on_connect = lambda c, u, f, r, p: c.subscribe(f"pvgate/{SITE}/#", qos=1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self._lock = threading.Lock()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        kind = msg.topic.split("/")[2]
        now = datetime.now().strftime("%H:%M:%S")
        with self._lock:
            self.count += 1
            if kind == "data":
                for r in body["readings"]:
                    self.readings += 1
                    self.seqs.add(r["seq"])
                    v = r["values"]
                    energy = v.get("energy_total", v.get("energy_export"))
                    print(f"{now} data   {body['device']:6} seq {r['seq']:<5} ac_power {v.get('ac_power', 0):8.2f} kW"
                          f"   energy {energy if energy is not None else '-':>12} kWh"
                          f"{'   (replay)' if body.get('replay') else ''}", flush=True)
            elif kind == "events":
                print(f"{now} event  {body['device']:6} seq {body['seq']:<5} {body['event']} "
                      f"{body.get('reason', body.get('alarms', ''))}", flush=True)
            elif kind == "status":
                print(f"{now} status station is {body.get('state')} (retained)", flush=True)
            elif kind == "meta":
                ident = body.get("identity") or {}
                print(f"{now} meta   {body['device']:6} {body['profile']} {ident.get('model', '')} "
                      f"{len(body['points'])} points (retained)", flush=True)
            elif kind == "health":
                b = body["buffer"]
                print(f"{now} health {body['devices_online']} devices online, buffer {b['unsent']} unsent, "
                      f"last seq {b['last_seq']}", flush=True)

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 15.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def run_demo(seconds: float = 0.0, speed: float = 60.0, workdir: str | None = None, broker: str = "auto") -> int:
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="pvgate-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    broker_port, modbus_port = _free_port(), _free_port()
    procs: list[subprocess.Popen[bytes]] = []
    view: LiveView | None = None
    agent: subprocess.Popen[bytes] | None = None
    print(f"pvgate demo — working directory {work}\n")
    try:
        broker_proc, protocol = _start_broker(work, broker_port, broker)
        procs.append(broker_proc)
        sim_cmd = [sys.executable, "-m", "simulator.cli", "--listen", f"tcp://127.0.0.1:{modbus_port}",
                   "--speed", f"{speed:g}", "--start", "09:30",
                   # The simulator's day runs 60x faster than the agent's, which judges night by the
                   # real clock: inverters silent at simulated dusk would look offline at real noon.
                   "--night", "standby"]
        for _, unit, profile, kw in DEVICES:
            sim_cmd += ["--device", f"{unit}:{profile}:{kw}"]
        sim = subprocess.Popen(sim_cmd, stdout=open(work / "sim.log", "wb"), stderr=subprocess.STDOUT)
        procs.append(sim)
        _wait_port(modbus_port, sim, "the simulator")
        print(f"sim      3 inverters + 1 meter on modbus tcp://127.0.0.1:{modbus_port}, clock {speed:g}x from 09:30")
        site = _site_file(work, broker_port, modbus_port, protocol)
        view = LiveView(broker_port)
        agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "-c", str(site)],
                                 stdout=open(work / "agent.log", "wb"), stderr=subprocess.STDOUT)
        print(f"agent    pvgate run -c {site}   (log: {work / 'agent.log'})")
        print("live     what the county center receives (Ctrl-C to stop):\n", flush=True)
        deadline = time.monotonic() + seconds if seconds > 0 else float("inf")
        while time.monotonic() < deadline:
            if agent.poll() is not None:
                print(f"\nthe agent stopped (code {agent.returncode}); see {work / 'agent.log'}", file=sys.stderr)
                return 1
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        _stop(agent)
        time.sleep(0.5)
        if view is not None:
            view.stop()
            print(f"\n{view.readings} readings in {view.count} messages; seq {min(view.seqs, default=0)}.."
                  f"{max(view.seqs, default=0)}; agent log, buffer and site file are in {work}")
        for proc in reversed(procs):
            _stop(proc)
    return 0
