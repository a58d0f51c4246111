"""The parts the suite (python -m bench) runs: broker, simulator, agent, subscriber, /proc readers.

Every process is started here, in its own session, and stopped by its pid at the end (Harness.close).
Nothing of the agent is imported: the agent runs as `python -m agent.cli run -c site.yaml`, the way
systemd starts it, so the suite measures today's agent and any later one alike.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # support.broker: the same private mosquitto as the tests

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from support.broker import Broker, find_mosquitto  # noqa: E402

SITE = "bench-suite"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# 10 values in one block of holding registers: the "20 devices x 10 values" of issue #16.
TEN_VALUES_MAP = """\
id: bench-10v
name: Bench device with 10 values in one block
source: written for the benchmark suite (bench/harness.py)
defaults:
  table: holding
  word_order: big
points:
  - {key: ac_power, address: 0, type: u32, scale: 0.001, unit: kW}
  - {key: dc_power, address: 2, type: u32, scale: 0.001, unit: kW}
  - {key: energy_total, address: 4, type: u32, unit: kWh, counter: true}
  - {key: pv1_voltage, address: 6, type: u16, scale: 0.1, unit: V}
  - {key: pv1_current, address: 7, type: u16, scale: 0.1, unit: A}
  - {key: phase_a_voltage, address: 8, type: u16, scale: 0.1, unit: V}
  - {key: phase_a_current, address: 9, type: u16, scale: 0.1, unit: A}
  - {key: grid_frequency, address: 10, type: u16, scale: 0.01, unit: Hz}
  - {key: internal_temperature, address: 11, type: i16, scale: 0.1, unit: °C}
  - {key: status, address: 12, type: u16}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- /proc ----------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads), in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS in kB and the number of threads."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "Threads"):
            out[key] = int(value.split()[0])
    return out


def io_write_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(p / 100.0 * (len(s) - 1)))))]


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# -- the subscriber (like the county center) ------------------------------------------------------


@dataclass
class Arrival:
    device: str
    seq: int
    ts_ms: int
    at: float  # time.time() when the message arrived
    replay: bool
    values: int


class Subscriber:
    """Receives pvgate/<site>/data/# at QoS 1 in a paho thread of this process and keeps every reading."""

    def __init__(self, port: int) -> None:
        self.arrivals: list[Arrival] = []
        self.messages = 0
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{os.getpid()}-{port}")
        self.client.on_connect = lambda c, u, f, r, p: c.subscribe(f"pvgate/{SITE}/data/#", qos=1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("the bench subscriber could not subscribe")

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        body = json.loads(msg.payload)
        replay = bool(body.get("replay"))
        with self._lock:
            self.messages += 1
            for r in body["readings"]:
                self.arrivals.append(Arrival(body["device"], r["seq"], r["ts"], now, replay, len(r["values"])))

    def clear(self) -> None:
        with self._lock:
            self.arrivals.clear()

    def snapshot(self) -> list[Arrival]:
        with self._lock:
            return list(self.arrivals)

    def first_after(self, t: float, timeout: float) -> Arrival | None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            got = [a for a in self.snapshot() if a.at >= t]
            if got:
                return got[0]
            time.sleep(0.02)
        return None

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@dataclass
class Window:
    """What the subscriber saw of the readings polled from t0 to t1 (wall clock)."""

    t0: float
    t1: float
    readings: list[Arrival]

    @classmethod
    def of(cls, sub: Subscriber, t0: float, t1: float) -> Window:
        return cls(t0, t1, [a for a in sub.snapshot() if t0 <= a.ts_ms / 1000.0 < t1 and not a.replay])

    def latencies(self) -> list[float]:
        return [a.at - a.ts_ms / 1000.0 for a in self.readings]

    def jitters(self, interval_s: float) -> list[float]:
        """Poll start after its aligned tick (the agent aligns ticks to multiples of the interval)."""
        ms = int(interval_s * 1000)
        return [(a.ts_ms % ms) / 1000.0 for a in self.readings]

    def devices_on_time(self, devices: list[str], interval_s: float) -> int:
        """Devices with a reading in every interval slot that lies wholly inside the window."""
        first = int(self.t0 // interval_s) + 1
        last = int(self.t1 // interval_s) - 1
        want = set(range(first, last + 1))
        slots: dict[str, set[int]] = {d: set() for d in devices}
        for a in self.readings:
            if a.device in slots:
                slots[a.device].add(int((a.ts_ms / 1000.0) // interval_s))
        return sum(1 for d in devices if want <= slots[d])


# -- the harness ----------------------------------------------------------------------------------


@dataclass
class Agent:
    proc: subprocess.Popen[bytes]
    started: float  # time.time() at spawn
    ready_at: float | None = None
    work: Path = field(default_factory=Path)

    @property
    def pid(self) -> int:
        pid: int = self.proc.pid
        return pid


class Harness:
    """A temp dir, one mosquitto, simulators and agents; close() stops them all by pid."""

    def __init__(self, keep: bool = False) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="pvgate-bench-"))
        self.keep = keep
        self.procs: list[subprocess.Popen[bytes]] = []
        self.broker: Broker | None = None
        self.sub: Subscriber | None = None
        (self.tmp / "profiles").mkdir()
        (self.tmp / "profiles" / "bench-10v.yaml").write_text(TEN_VALUES_MAP, encoding="utf-8")

    # -- broker & subscriber
    def start_broker(self) -> int:
        if find_mosquitto() is None:
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        self.broker = Broker(self.tmp / "broker", extra_conf="max_queued_messages 0\n")
        self.broker.start()
        port: int = self.broker.port
        self.sub = Subscriber(port)
        return port

    # -- processes
    def spawn(self, cmd: list[str], name: str, env: dict[str, str] | None = None,
              stdout: int | None = None) -> subprocess.Popen[bytes]:
        err = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - closed at exit
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        full_env.pop("PVGATE_RUNTIME_DIR", None)
        proc = subprocess.Popen(cmd, stdout=stdout if stdout is not None else err, stderr=err, cwd=ROOT,
                                stdin=subprocess.DEVNULL, start_new_session=True, env=full_env)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def pty_pair(self, name: str) -> tuple[Path, Path] | None:
        """Two linked ptys (socat): the simulator's end and the client's end; None without socat."""
        socat = shutil.which("socat")
        if socat is None:
            return None
        a, b = self.tmp / f"{name}-sim", self.tmp / f"{name}-client"
        self.spawn([socat, "-d", "-d", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"], f"socat-{name}")
        deadline = time.monotonic() + 10
        while not (a.exists() and b.exists()):
            if time.monotonic() > deadline:
                raise RuntimeError("socat made no pty pair")
            time.sleep(0.02)
        return a, b

    def simulator(self, name: str, listeners: list[tuple[str, list[tuple[int, str]]]]) -> subprocess.Popen[bytes]:
        """pvgate-sim from a sim file: listeners [(url, [(unit, profile)])], noon, inverters never asleep."""
        lines = ['start: "12:00"', f"profiles: [{self.tmp / 'profiles'}]", "listeners:"]
        for url, devices in listeners:
            lines += [f"  - listen: {url}", "    devices:"]
            lines += [f"      - {{unit: {u}, profile: {p}, night: standby}}" for u, p in devices]
        path = self.tmp / f"{name}.sim.yaml"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        proc = self.spawn([sys.executable, "-m", "simulator.cli", "-c", str(path)], name, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if '"ready"' not in line:
            raise RuntimeError(f"pvgate-sim did not start: {line!r}; see {self.tmp / (name + '.log')}")
        return proc

    def site_file(self, name: str, links: list[str], devices: list[tuple[str, str, int, str, float]],
                  buffer_mb: float = 256.0, health_s: float = 60.0) -> Path:
        """links: YAML flow mappings; devices: (id, link, unit, profile, interval_s)."""
        assert self.broker is not None
        work = self.tmp / name
        work.mkdir(exist_ok=True)
        lines = ["site:", f"  id: {SITE}", "mqtt:", "  host: 127.0.0.1", f"  port: {self.broker.port}",
                 "buffer:", f"  path: {work / 'buffer.sqlite'}", f"  max_mb: {buffer_mb:g}", "  min_free_mb: 16",
                 "agent:", f"  state_dir: {work}", f"  health_interval: {health_s:g}s", "  clock_sync: assume",
                 "links:"]
        lines += [f"  - {lk}" for lk in links]
        lines.append("devices:")
        lines += [f"  - {{id: {d}, link: {lk}, unit: {u}, profile: {p}, interval: {iv:g}s}}"
                  for d, lk, u, p, iv in devices]
        path = work / "site.yaml"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        shutil.copy(self.tmp / "profiles" / "bench-10v.yaml", work / "bench-10v.yaml")
        return path

    def agent(self, site: Path, name: str, prefix: list[str] | None = None,
              python_args: list[str] | None = None) -> Agent:
        """`python -m agent.cli run -c site` with NOTIFY_SOCKET pointing at us: READY=1 is timed.
        `prefix` runs it under another command (strace, a cgroup entry); `python_args` replace
        `-m agent.cli` (the profiler wrapper)."""
        notify = site.parent / "notify.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(notify))
        cmd = [*(prefix or []), sys.executable, *(python_args or ["-m", "agent.cli"]), "run", "-c", str(site)]
        agent = Agent(self.spawn(cmd, name, env={"NOTIFY_SOCKET": str(notify)}), time.time(), work=site.parent)

        def listen() -> None:
            sock.settimeout(1.0)
            while agent.proc.poll() is None:
                try:
                    data = sock.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if agent.ready_at is None and b"READY=1" in data.split(b"\n"):
                    agent.ready_at = time.time()
            sock.close()

        threading.Thread(target=listen, daemon=True).start()
        return agent

    def agent_pid(self, agent: Agent) -> int:
        """The agent's own pid: the spawned process (exec'd through a wrapper), or its child (strace)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for pid in [agent.pid, *_descendants(agent.pid)]:
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if b"agent.cli" in cmdline or b"stageprof" in cmdline:
                    return pid
            time.sleep(0.05)
        return agent.pid

    def wait_flowing(self, agent: Agent, devices: int, timeout: float = 60.0) -> None:
        """Until READY and every device's readings are arriving (warm-up: connects, nameplates)."""
        assert self.sub is not None
        deadline = time.time() + timeout
        while time.time() < deadline:
            if agent.proc.poll() is not None:
                raise RuntimeError(f"the agent exited (code {agent.proc.returncode}); see {self.tmp}")
            seen = {a.device for a in self.sub.snapshot() if a.at >= agent.started}
            if agent.ready_at is not None and len(seen) >= devices:
                return
            time.sleep(0.1)
        raise RuntimeError(f"readings of all {devices} devices did not arrive within {timeout:g}s; see {self.tmp}")

    def close(self) -> None:
        if self.sub is not None:
            self.sub.stop()
        for proc in reversed(self.procs):
            self.stop(proc, 10.0)
        if self.broker is not None:
            self.broker.stop()
        if not self.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*") if Path(f"/proc/{p}/task").exists() else []:
            try:
                kids = [int(x) for x in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out
