"""Chaos at frame level: broken frames on the bus, and the real agent living through minutes of it.

- each broken frame of pvgate-sim (simulator/frames.py) is what it says, framed by pymodbus;
- the link client turns every one it can recognise into a counted device error (never a lost
  link, a crash, or an answer of another function or length taken for the right one), while a
  healthy unit on the same link answers; a frame on an idle line makes it wait for quiet;
- the soak: pvgate-sim with `--chaos SEED:3 --chaos-units 12,13` on a 9600-baud RTU bus (socat
  pty) and on a Modbus TCP gateway at once, the agent polling both, mosquitto in between. The
  agent never dies, the healthy units keep their interval and publish what was served, the
  chaotic units' failures are counted in health, and no value outside its map's range is ever
  published (it is left out and flagged `invalid:<key>`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pymodbus.framer import FramerRTU, FramerSocket
from pymodbus.pdu import DecodePDU
from pymodbus.pdu.register_message import ReadHoldingRegistersResponse
from test_rtu_bus import pty_pair

from drivers.devicemap import ProfileLibrary
from drivers.errors import DeviceError
from drivers.link import LinkClient
from drivers.model import Link, LinkType, Table
from simulator.chaos import CHAOS_FAULTS, rounds
from simulator.frames import FRAME_KINDS, SECOND_MASTER_UNITS, crc_ok, mangle, second_master_request, stray_reply
from simulator.physics import SimClock
from support.chain import PY, SimDev, mismatches, readings, sim_device, start_agent
from support.collector import Collector
from support.ports import free_port
from support.procs import Proc

ProcStarter = Callable[..., Proc]
CollectorFactory = Callable[..., Collector]

REPO = Path(__file__).resolve().parent.parent


def _reply(unit: int = 12, tid: int = 0) -> ReadHoldingRegistersResponse:
    return ReadHoldingRegistersResponse(registers=[0x4366, 0x8000, 0x0001, 0x0002], dev_id=unit, transaction_id=tid)


def _client_decode(framer_cls: type[FramerRTU] | type[FramerSocket], frame: bytes, unit: int, tid: int) -> Any:
    """What a pymodbus client framer makes of `frame` while it waits for unit/tid."""
    return framer_cls(DecodePDU(False)).handleFrame(frame, unit, tid)[1]


# --------------------------------------------------------------------------- the broken frames


def test_each_broken_rtu_frame_is_what_it_says() -> None:
    rng = random.Random(3)
    rtu = FramerRTU(DecodePDU(True))
    good = rtu.buildFrame(_reply())
    for _ in range(30):
        assert len(mangle("truncated", _reply(), rtu, rng)) < len(good)
        overlong = mangle("overlong", _reply(), rtu, rng)
        assert overlong.startswith(good) and len(overlong) > len(good)
        other = mangle("wrong-unit", _reply(), rtu, rng)
        assert crc_ok(other) and other[0] != 12 and other[1:-2] == good[1:-2]
        assert _client_decode(FramerRTU, other, 12, 0) is None  # a client waiting for unit 12 skips it
        swapped = mangle("wrong-function", _reply(), rtu, rng)
        assert crc_ok(swapped) and swapped[1] == 4 and _client_decode(FramerRTU, swapped, 12, 0).function_code == 4
        lying = mangle("byte-count", _reply(), rtu, rng)
        assert crc_ok(lying) and lying[2] != 8 and len(lying) == len(good)  # valid CRC, the count lies
        junk = mangle("junk", _reply(), rtu, rng)
        assert crc_ok(junk) and len(junk) == len(good) and junk[:3] == good[:3]
        decoded = _client_decode(FramerRTU, junk, 12, 0)
        assert decoded is not None and len(decoded.registers) == 4  # only plausibility can catch it
        wrong = mangle("wrong-length", _reply(), rtu, rng)
        assert crc_ok(wrong) and len(_client_decode(FramerRTU, wrong, 12, 0).registers) != 4
        assert mangle("wrong-tid", _reply(), rtu, rng) == good  # MBAP only
        assert mangle("mbap-length", _reply(), rtu, rng) == good
    noise = [mangle("noise", _reply(), rtu, rng) for _ in range(50)]
    assert len({n for n in noise}) == 50 and all(not crc_ok(n) for n in noise)


def test_each_broken_mbap_frame_is_what_it_says() -> None:
    rng = random.Random(4)
    tcp = FramerSocket(DecodePDU(True))
    good = tcp.buildFrame(_reply(tid=77))
    for _ in range(30):
        other_tid = mangle("wrong-tid", _reply(tid=77), tcp, rng)
        assert other_tid[2:] == good[2:] and other_tid[:2] != good[:2]
        assert _client_decode(FramerSocket, other_tid, 12, 77) is None
        lying = mangle("mbap-length", _reply(tid=77), tcp, rng)
        assert lying[6:] == good[6:] and lying[4:6] != good[4:6]
        swapped = mangle("wrong-function", _reply(tid=77), tcp, rng)
        assert swapped[7] == 4 and _client_decode(FramerSocket, swapped, 12, 77).transaction_id == 77


def test_frames_nobody_asked_for() -> None:
    rng = random.Random(5)
    for framer_cls in (FramerRTU, FramerSocket):
        framer = framer_cls(DecodePDU(True))
        stray = stray_reply(13, framer, rng)
        decoded = framer_cls(DecodePDU(False)).handleFrame(stray, 0, 0)[1]
        assert decoded is not None and decoded.dev_id == 13 and decoded.function_code in (3, 4)
        request = second_master_request(framer, rng)
        asked = framer_cls(DecodePDU(True)).handleFrame(request, 0, 0)[1]
        assert asked is not None and asked.dev_id in SECOND_MASTER_UNITS and asked.function_code == 3
    # A second master's request on an RTU line is noise to a client waiting for its own unit.
    assert _client_decode(FramerRTU, second_master_request(FramerRTU(DecodePDU(True)), rng), 12, 0) is None


def test_chaos_draws_every_frame_fault() -> None:
    drawn = {f.split(":")[0] for rnd in itertools.islice(rounds(SEED, [12, 13]), 400) for f in rnd.faults.values()}
    assert set(FRAME_KINDS) <= drawn
    assert all(not name.startswith("exception:2") for name, _ in CHAOS_FAULTS)


# --------------------------------------------------------------------------- the link client


CLIENT_KINDS = ["noise", "truncated", "overlong", "wrong-unit", "wrong-function", "byte-count", "junk",
                "wrong-length", "wrong-tid", "mbap-length", "exception:4", "exception:11"]


@pytest.mark.parametrize("scheme", ["tcp", "rtu-over-tcp"])
def test_link_client_counts_every_broken_frame_as_a_device_error(scheme: str, procs: ProcStarter) -> None:
    """Unit 12 sends one kind of broken frame for every request, unit 11 beside it is healthy.
    Before the link client checked the function code, the input-register answer was taken as
    the holding registers; before it guarded pymodbus's decoding, a lying byte count or MBAP
    length closed the TCP connection (every unit of the link lost, a traceback logged)."""
    for kind in CLIENT_KINDS:
        port = free_port()
        sim = procs([PY, "-m", "simulator.cli", "--listen", f"{scheme}://127.0.0.1:{port}", "--device",
                     "11:chint-dtsu666", "--device", "12:chint-dtsu666", "--fault", f"12:{kind}"], f"sim-{kind}")
        sim.wait_for_line(r'^\{"event": "ready"', timeout=15, stream="stdout")
        ltype = LinkType.TCP if scheme == "tcp" else LinkType.RTU_OVER_TCP
        client = LinkClient(Link("lan", ltype, host="127.0.0.1", port=port, timeout=0.3, retries=0,
                                 inter_frame_s=0.05))
        outcome = asyncio.run(_alternate(client))
        sim.terminate()
        healthy, sick = outcome[11], outcome[12]
        assert healthy == ["ok"] * 5, (kind, outcome)
        assert client.stats.reconnects == 0, (kind, client.stats)
        if kind in ("junk",) or (kind in ("wrong-tid", "mbap-length") and scheme != "tcp"):
            assert sick == ["ok"] * 5, (kind, sick)  # framing is sound: only the map's range can tell
            continue
        if kind == "overlong":  # a sound reply followed by noise: the reply is taken, the noise drained
            assert sick == ["ok"] * 5, sick
            continue
        assert all(s.startswith("DeviceError") for s in sick), (kind, sick)
        assert client.stats.errors + client.stats.timeouts >= 5, (kind, client.stats)


async def _alternate(client: LinkClient) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {11: [], 12: []}
    try:
        for _ in range(5):
            for unit in (12, 11):
                try:
                    await client.read(Table.HOLDING, 0x2000, 4, unit, 0.3)
                    out[unit].append("ok")
                except DeviceError as err:
                    out[unit].append(f"DeviceError: {err}")
                except Exception as err:  # noqa: BLE001 - anything else is the finding
                    out[unit].append(f"{type(err).__name__}: {err}")
    finally:
        client.close()
    return out


def test_babbling_unit_without_chaos(procs: ProcStarter) -> None:
    """`--fault 12:babble:1`: unit 12 sends replies nobody asked for on an idle line; the healthy
    unit beside it is read as ever, and the client counts the strays as late frames."""
    port = free_port()
    sim = procs([PY, "-m", "simulator.cli", "--listen", f"rtu-over-tcp://127.0.0.1:{port}", "--device",
                 "11:chint-dtsu666", "--device", "12:chint-dtsu666", "--fault", "12:babble:1"], "sim")
    sim.wait_for_line(r'^\{"event": "ready"', timeout=15, stream="stdout")
    client = LinkClient(Link("dtu", LinkType.RTU_OVER_TCP, host="127.0.0.1", port=port, timeout=0.3, retries=0,
                             inter_frame_s=0.05))

    async def scenario() -> list[int]:
        got = []
        try:
            for _ in range(8):
                try:
                    got.append(len(await client.read(Table.HOLDING, 0x2000, 4, 11, 0.3)))
                except DeviceError:  # a stray that raced a request into one TCP segment hides the answer
                    got.append(0)
                await asyncio.sleep(0.3)
        finally:
            client.close()
        return got

    got = asyncio.run(scenario())
    assert got.count(4) >= 7, got
    sim.wait_for_line(r'"fault": "babble"', timeout=5, stream="stdout")
    assert client.stats.late_frames >= 1 and client.stats.errors == 0, client.stats


def test_frame_on_an_idle_line_makes_the_next_request_wait_for_quiet() -> None:
    """Injected fault, from a scripted peer (a DTU in transparent mode): a unit sends a frame while
    no request is pending. On a real wire the rest of such a frame may still be arriving, and a
    request sent into it collides; the link client waits until the line has been quiet for its
    inter-frame gap before it talks again (without that, it asked some 20 ms after the stray frame)."""
    gap = 0.2
    rtu = FramerRTU(DecodePDU(True))
    request_times: list[float] = []
    stray_at: list[float] = []

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(256):
            request_times.append(time.monotonic())
            writer.write(rtu.buildFrame(_reply(unit=data[0])))
            if len(request_times) == 1:
                await asyncio.sleep(0.02)
                writer.write(stray_reply(13, rtu, random.Random(1)))  # the injected stray frame
                stray_at.append(time.monotonic())

    async def scenario() -> LinkClient:
        server = await asyncio.start_server(peer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = LinkClient(Link("dtu", LinkType.RTU_OVER_TCP, host="127.0.0.1", port=port, timeout=0.3,
                                 retries=0, inter_frame_s=gap))
        try:
            await client.read(Table.HOLDING, 0x2000, 4, 12, 0.3)
            await client.connect()  # the first connect's own drain is over: only the stray counts now
            await asyncio.sleep(0.04)
            assert await client.read(Table.HOLDING, 0x2000, 4, 12, 0.3) == [0x4366, 0x8000, 0x0001, 0x0002]
        finally:
            client.close()
            server.close()
        return client

    client = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert client.stats.late_frames >= 1
    assert len(request_times) == 2 and stray_at
    assert request_times[1] - stray_at[0] >= 0.9 * gap, (
        f"asked {1000 * (request_times[1] - stray_at[0]):.0f} ms after a stray frame, gap is {1000 * gap:.0f} ms")


# --------------------------------------------------------------------------- the soak

SEED = 14
SOAK_S = 150.0
WARMUP_S = 8.0
INTERVAL_S = 2.0
TIMEOUT_S = 0.3
HEALTHY = {"bus": ("inv01", "meter"), "lan": ("tinv01", "tmeter")}
CHAOTIC = {"bus": ("chaos12", "chaos13"), "lan": ("tchaos12", "tchaos13")}
# The chaotic meters' map: Chint's, with what a 50 kW station's meter can physically show.
RANGES = {"line_": (300, 500), "phase_a_voltage": (150, 300), "phase_b_voltage": (150, 300),
          "phase_c_voltage": (150, 300), "_current": (0, 300), "ac_power": (-100, 100), "phase_": (-40, 40),
          "reactive_power": (-100, 100), "power_factor": (-1, 1), "grid_frequency": (45, 55), "energy_": (0, 1e9)}


def chaos_meter_map() -> str:
    text = (REPO / "config/profiles/chint-dtsu666.yaml").read_text(encoding="utf-8")
    text = text.replace("id: chint-dtsu666", "id: chaos-meter").replace("name: Chint", "name: Chaos test copy of Chint")

    def ranged(m: re.Match[str]) -> str:
        key = m.group(1)
        lo, hi = next(r for part, r in RANGES.items() if part in key)
        return f"{m.group(0)[:-1]}, range: [{lo}, {hi}]}}"

    return re.sub(r"\{key: (\w+),[^}]*\}", ranged, text)


def _sim_file(tmp: Path, pty: Path, tcp_port: int) -> Path:
    devices = ("      - {unit: 1, profile: huawei-sun2000}\n      - {unit: 11, profile: chint-dtsu666}\n"
               "      - {unit: 12, profile: chaos-meter}\n      - {unit: 13, profile: chaos-meter}\n")
    path = tmp / "sim.yaml"
    path.write_text(f"profiles: [profiles]\nlisteners:\n"
                    f"  - listen: rtu://{pty}?baudrate=9600&parity=N&turnaround_ms=20\n    devices:\n{devices}"
                    f"  - listen: tcp://127.0.0.1:{tcp_port}\n    devices:\n{devices}", encoding="utf-8")
    return path


def _site(tmp: Path, broker_port: int, pty: Path, tcp_port: int) -> Path:
    tuning = f"interval: {INTERVAL_S:g}s"
    devices = []
    for link, prefix in (("bus", ""), ("lan", "t")):
        devices += [f"  - {{id: {prefix}inv01, link: {link}, unit: 1, profile: huawei-sun2000, {tuning}}}",
                    f"  - {{id: {prefix}meter, link: {link}, unit: 11, profile: chint-dtsu666, {tuning}}}",
                    f"  - {{id: {prefix}chaos12, link: {link}, unit: 12, profile: chaos-meter, {tuning}}}",
                    f"  - {{id: {prefix}chaos13, link: {link}, unit: 13, profile: chaos-meter, {tuning}}}"]
    path = tmp / "site.yaml"
    path.write_text("\n".join([
        "site:", "  id: chaos-bus", "  timezone: Asia/Shanghai",
        "mqtt:", "  host: 127.0.0.1", f"  port: {broker_port}",
        "buffer:", f"  path: {tmp / 'buffer.sqlite'}", "  commit_interval: 0.2s",
        "agent:", f"  state_dir: {tmp}", "  health_interval: 5s",
        "links:",
        f"  - {{id: bus, type: rtu, port: {pty}, baudrate: 9600, timeout: {TIMEOUT_S}s, retries: 1}}",
        f"  - {{id: lan, type: tcp, host: 127.0.0.1, port: {tcp_port}, timeout: {TIMEOUT_S}s, retries: 1}}",
        "devices:", *devices]) + "\n", encoding="utf-8")
    return path


@pytest.mark.slow
@pytest.mark.contract
def test_agent_lives_through_minutes_of_bus_chaos(tmp_path: Path, broker: Any, collector_factory: CollectorFactory,
                                                  procs: ProcStarter) -> None:
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "chaos-meter.yaml").write_text(chaos_meter_map(), encoding="utf-8")
    chaos_map = ProfileLibrary([tmp_path / "profiles"]).get("chaos-meter")
    ranges = {p.key: p.range for p in chaos_map.points}
    assert all(ranges.values()), ranges
    sim_end, agent_end = pty_pair(procs, tmp_path)
    tcp_port = free_port()
    sim = procs([PY, "-m", "simulator.cli", "-c", str(_sim_file(tmp_path, sim_end, tcp_port)), "--start", "12:00",
                 "--chaos", f"{SEED}:3", "--chaos-units", "12,13"], "sim")
    ready = json.loads(sim.wait_for_line(r'^\{"event": "ready".*$', timeout=15, stream="stdout").group(0))
    clock = SimClock(ready["clock"]["real0"], ready["clock"]["sim0"], ready["clock"]["speed"])
    col = collector_factory(["pvgate/chaos-bus/#"])
    agent = start_agent(procs, _site(tmp_path, broker.port, agent_end, tcp_port), sim_clock=clock)
    t0 = time.time() + WARMUP_S
    t1 = t0 + SOAK_S
    while time.time() < t1 + 3.0:  # + publishing latency
        assert agent.running, agent.tail()
        time.sleep(1.0)
    msgs = col.messages()
    assert agent.running, agent.tail()
    assert agent.terminate(timeout=20) == 0, agent.tail()
    assert "Traceback" not in agent.stderr(), agent.stderr()[-3000:]
    frames = [json.loads(line) for line in sim.stdout().splitlines() if line.startswith('{"event": "chaos-frame"')]
    _chaos_happened(frames)
    chaos_rounds = [json.loads(line) for line in sim.stdout().splitlines() if line.startswith('{"event": "chaos"')]
    assert len(chaos_rounds) >= SOAK_S / 3 and all(set(r["faults"]) == {"12", "13"} for r in chaos_rounds)
    got = [r for r in readings([m for m in msgs if "/data/" in m.topic]) if t0 * 1000 <= r["ts"] < t1 * 1000]
    _healthy_kept_their_interval(got, clock)
    _chaotic_never_published_implausible(got, ranges)
    _failures_counted([m.json() for m in msgs if m.topic.endswith("/health")])


def _chaos_happened(frames: list[dict[str, Any]]) -> None:
    """The soak proves nothing unless the broken frames really went out, on both buses. Which
    kinds strike depends on how many requests fell in each round, so the test asks for most of
    them, not each one."""
    rtu_kinds = {"noise", "truncated", "overlong", "wrong-unit", "wrong-function", "byte-count", "junk",
                 "wrong-length", "babble", "second-master"}
    for listen, kinds, least in (("rtu", rtu_kinds, 7), ("tcp", rtu_kinds - {"second-master"} | {"wrong-tid", "mbap-length"}, 7)):
        seen = {f["fault"] for f in frames if f["listen"] == listen}
        assert len(kinds & seen) >= least, f"{listen}: only {sorted(kinds & seen)} struck, never {sorted(kinds - seen)}"
    assert {f["unit"] for f in frames if f["fault"] != "second-master"} <= {12, 13}


def _healthy_kept_their_interval(got: list[dict[str, Any]], clock: SimClock) -> None:
    expected = SOAK_S / INTERVAL_S
    # A poll can wait behind a chaotic unit's timeouts (retry included) on the same bus, and the
    # TCP link is dropped now and then: a gap of up to 3 intervals plus that budget is tolerated.
    max_gap_ms = 1000 * (3 * INTERVAL_S + 4 * (TIMEOUT_S + 0.2) + 1.0)
    sim_devices = {1: sim_device(SimDev("inv", 1, "huawei-sun2000"), clock),
                   11: sim_device(SimDev("meter", 11, "chint-dtsu666"), clock)}
    for device in (*HEALTHY["bus"], *HEALTHY["lan"]):
        mine = sorted(r["ts"] for r in got if r["device"] == device)
        assert len(mine) >= 0.8 * expected, f"{device}: {len(mine)} readings in {SOAK_S:g}s, want >= {0.8 * expected:.0f}"
        gaps = [b - a for a, b in zip(mine, mine[1:])]
        assert max(gaps) <= max_gap_ms, f"{device}: a gap of {max(gaps)} ms between readings (allowed {max_gap_ms:.0f})"
        sim_dev = sim_devices[1 if "inv" in device else 11]
        wrong = {r["seq"]: mismatches(sim_dev, r["ts"], r["values"], window_s=1.5)
                 for r in got if r["device"] == device}
        wrong = {s: w for s, w in wrong.items() if w}
        assert not wrong, f"{device}: published values that were never served (a stray frame taken as its answer): " \
                          f"{list(wrong.items())[:3]}"


def _chaotic_never_published_implausible(got: list[dict[str, Any]], ranges: dict[str, Any]) -> None:
    flagged = 0
    for device in (*CHAOTIC["bus"], *CHAOTIC["lan"]):
        mine = [r for r in got if r["device"] == device]
        assert mine, f"{device}: no reading at all in {SOAK_S:g}s of chaos (a third of its rounds are healthy)"
        for r in mine:
            outside = {k: v for k, v in r["values"].items() if not ranges[k][0] <= v <= ranges[k][1]}
            assert not outside, f"{device} seq {r['seq']}: published outside its map's range: {outside}"
            flagged += any(q.startswith("invalid:") for q in r["q"])
    assert flagged, "no chaotic reading was ever flagged invalid: junk never reached the range check"


def _failures_counted(health: list[dict[str, Any]]) -> None:
    assert health, "no health message"
    last = health[-1]
    for link in ("bus", "lan"):
        stats = last["links"][link]
        assert stats["errors"] + stats["timeouts"] > 0, (link, stats)
    for device in (*CHAOTIC["bus"], *CHAOTIC["lan"]):
        assert last["devices"][device]["failed_polls"] > 0, (device, last["devices"][device])
