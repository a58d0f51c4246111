"""SunSpec: discovery and device maps (fake reader), and the simulated SunSpec device checked by an
independent client: pysunspec2 scans it over Modbus TCP and reads what pvgate reads."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from drivers.codec import encode_point
from drivers.decode import decode_blocks, decode_points
from drivers.errors import DeviceError
from drivers.link import LinkClient
from drivers.model import Link, LinkType, Table, Value
from drivers.plan import block_values, plan_device, plan_reads
from drivers.sunspec import (
    MARKER,
    MODELS,
    Discovery,
    DiscoveryError,
    ModelRef,
    device_map,
    discover,
    without_scale_factors,
)
from simulator.device import SimDevice
from simulator.physics import PvPlant, SimClock, Sun
from simulator.server import Bus, Listen, SerialListener, serve_tcp
from simulator.sunspec import SunSpecSimDevice, make_sim_device
from support.ports import free_port
from support.sunspec import same_as_pysunspec2

TZ = "Asia/Shanghai"
NOON = datetime(2026, 6, 21, 12, 0, tzinfo=ZoneInfo(TZ)).timestamp()


# --- an in-process simulator listener (the simulator CLI does not know "sunspec" yet) ----------


class ServerThread:
    """simulator.server listening in a daemon thread with its own event loop; stop() ends it."""

    def __init__(self, listen: Listen, devices: dict[int, SimDevice]) -> None:
        self.bus = Bus(listen, devices)
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._closers: list[Any] = []
        self._thread = threading.Thread(target=self._run, name=f"sim-{listen.kind}", daemon=True)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError("simulator listener did not start")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._open())
        except BaseException as err:  # reported to the test by __enter__
            self._error = err
        self._ready.set()
        if self._error is None:
            self.loop.run_forever()
        self.loop.run_until_complete(self._close())
        self.loop.close()

    async def _open(self) -> None:
        if self.bus.listen.kind == "rtu":
            self._closers.append(SerialListener(self.bus))
        else:
            self._closers.append(await serve_tcp(self.bus))

    async def _close(self) -> None:
        for closer in self._closers:
            closer.close()
        tasks = [t for t in asyncio.all_tasks(self.loop) if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        assert not self._thread.is_alive(), "simulator thread did not stop"


# --- a fake SunSpec device for discover() ----------------------------------------------------


class FakeDevice:
    """Holding registers by address; a read touching an absent register answers exception 2."""

    def __init__(self, regs: dict[int, int] | None = None) -> None:
        self.regs: dict[int, int] = dict(regs or {})
        self.reads: list[tuple[int, int]] = []

    async def read(self, address: int, count: int) -> list[int]:
        self.reads.append((address, count))
        if any(a not in self.regs for a in range(address, address + count)):
            raise DeviceError(f"illegal address {address}+{count}", exception_code=2)
        return [self.regs[a] for a in range(address, address + count)]

    def chain(self, base: int, models: list[tuple[int, int]], end_length: bool = True) -> list[ModelRef]:
        self.regs[base], self.regs[base + 1] = MARKER
        addr, refs = base + 2, []
        for model_id, length in models:
            refs.append(ModelRef(model_id, addr, length))
            self.regs[addr], self.regs[addr + 1] = model_id, length
            for a in range(addr + 2, addr + 2 + length):
                self.regs.setdefault(a, 0)
            addr += 2 + length
        self.regs[addr] = 0xFFFF
        if end_length:
            self.regs[addr + 1] = 0
        return refs

    def put(self, dmap_points: Any, values: dict[str, Value], sfs: dict[str, int]) -> None:
        """Encode values (engineering units) into the registers of the named points."""
        for p in dmap_points:
            if p.key in values:
                sf = sfs.get(p.scale_factor) if p.scale_factor else None
                for i, r in enumerate(encode_point(p, values[p.key], sf)):
                    self.regs[p.address + i] = r
            elif p.key in sfs:
                for i, r in enumerate(encode_point(p, sfs[p.key])):
                    self.regs[p.address + i] = r

    def raw(self, address: int, *words: int) -> None:
        for i, w in enumerate(words):
            self.regs[address + i] = w


def run(coro: Any) -> Any:
    return asyncio.run(coro)


FULL = [(1, 66), (103, 50), (120, 26), (160, 48), (203, 105)]


def test_discover_walks_the_chain_by_length() -> None:
    dev = FakeDevice()
    refs = dev.chain(40000, FULL)
    disc = run(discover(dev.read))
    assert disc.base == 40000 and disc.complete
    assert list(disc.models) == refs
    assert [(m.id, m.address) for m in disc.models] == [(1, 40002), (103, 40070), (120, 40122), (160, 40150),
                                                        (203, 40200)]
    assert all(count <= 125 for _, count in dev.reads)


def test_common_model_of_65_registers_moves_everything_after_it() -> None:
    dev = FakeDevice()
    dev.chain(40000, [(1, 65), (103, 50)])
    disc = run(discover(dev.read))
    assert [(m.id, m.address, m.length) for m in disc.models] == [(1, 40002, 65), (103, 40069, 50)]
    dmap = device_map(disc)
    assert dmap.point("ac_power").address == 40069 + 14
    # Every common-model identity point still fits in 65 registers (only Pad is missing).
    assert {p.key for p in dmap.identity} == {"manufacturer", "model", "firmware", "serial"}


@pytest.mark.parametrize("base", [50000, 0])
def test_other_base_addresses(base: int) -> None:
    dev = FakeDevice()
    if base == 0:
        dev.raw(40000, 0, 0)  # something answers at 40000, but not the marker
    dev.chain(base, [(1, 66), (101, 50)])
    disc = run(discover(dev.read))
    assert disc.base == base
    assert [m.address for m in disc.models] == [base + 2, base + 70]


def test_unknown_models_are_skipped_by_their_length() -> None:
    dev = FakeDevice()
    dev.chain(40000, [(1, 66), (64110, 30), (7, 3), (103, 50)])
    disc = run(discover(dev.read))
    assert disc.ids == [1, 64110, 7, 103]
    dmap = device_map(disc)
    assert dmap.point("ac_power").address == 40002 + 68 + 32 + 5 + 14
    assert all(p.address >= 40002 for p in dmap.points)


def test_end_model_without_length_register() -> None:
    dev = FakeDevice()
    dev.chain(40000, [(1, 66), (103, 50)], end_length=False)
    disc = run(discover(dev.read))
    assert disc.complete and disc.ids == [1, 103]


def test_no_marker_is_an_error() -> None:
    dev = FakeDevice({40000: 1, 40001: 2})
    with pytest.raises(DiscoveryError, match="no SunSpec marker"):
        run(discover(dev.read))


def test_chain_that_breaks_off_is_kept_but_marked_incomplete() -> None:
    dev = FakeDevice()
    dev.chain(40000, [(1, 66), (103, 50)])
    del dev.regs[40122]  # the next header is not there at all
    disc = run(discover(dev.read))
    assert disc.ids == [1, 103] and not disc.complete


def test_silent_device_is_not_a_missing_marker() -> None:
    async def silent(address: int, count: int) -> list[int]:
        raise DeviceError("no answer")

    with pytest.raises(DeviceError, match="no answer"):
        run(discover(silent))


def _poll(dev: FakeDevice, dmap: Any) -> tuple[dict[str, Value], list[str]]:
    blocks = plan_device(dmap)
    regs = {i: run(dev.read(b.start, b.count)) for i, b in enumerate(blocks)}
    return decode_blocks(blocks, regs)


def test_device_map_decodes_with_scale_factors_and_flags_not_implemented_values() -> None:
    dev = FakeDevice()
    disc = Discovery(40000, tuple(dev.chain(40000, FULL)))
    dmap = device_map(disc)
    sfs = {"inverter_w_sf": 1, "inverter_wh_sf": 0, "inverter_v_sf": -1, "inverter_a_sf": -2, "inverter_hz_sf": -2,
           "inverter_pf_sf": -2, "inverter_tmp_sf": -1, "mppt_dcv_sf": -1, "mppt_dca_sf": -2, "mppt_dcw_sf": 0,
           "meter_w_sf": 0, "meter_totwh_sf": 0, "nameplate_wrtg_sf": 1}
    dev.put((*dmap.points, *dmap.identity), {
        "ac_power": 48.75, "energy_total": 123456.789, "phase_a_voltage": 231.4, "phase_a_current": 70.12,
        "grid_frequency": 49.98, "power_factor": 0.99, "internal_temperature": 41.5, "status": 4,
        "pv2_voltage": 655.5, "pv2_current": 37.5, "meter_ac_power": 2.5, "meter_energy_export": 1000.5,
        "manufacturer": "ACME", "serial": "X1", "rated_power_kw": 50.0}, sfs)
    dev.raw(40070 + 11, 0xFFFF)  # PhVphB uint16 not implemented
    dev.raw(40200 + 17, 0x8000)  # meter Hz_SF not implemented: the frequency cannot be scaled
    values, quality = _poll(dev, dmap)
    assert values["ac_power"] == 48.75 and values["energy_total"] == 123456.789
    assert values["phase_a_voltage"] == 231.4 and values["phase_a_current"] == 70.12
    assert values["grid_frequency"] == 49.98 and values["power_factor"] == 0.99
    assert values["internal_temperature"] == 41.5 and values["status"] == 4
    assert values["pv2_voltage"] == 655.5 and values["pv2_current"] == 37.5
    # The meter shares the device with an inverter: its keys carry "meter_"; export is positive,
    # on the wire W is negative (import-positive SunSpec meter convention).
    assert values["meter_ac_power"] == 2.5
    assert dev.regs[40200 + 18] == 0x10000 - 2500
    assert values["meter_energy_export"] == 1000.5
    assert "invalid:phase_b_voltage" in quality
    assert "invalid:meter_grid_frequency" in quality
    assert "invalid:meter_energy_import" in quality  # acc32 0 = not implemented
    assert not any(k.endswith("_sf") for k in values), "scale factors are not published"
    ident_points = without_scale_factors(dmap.identity)
    raw = {}
    for b in plan_reads(ident_points, 125, 16):
        raw.update(block_values(b, run(dev.read(b.start, b.count))))
    identity, iq = decode_points(ident_points, raw)
    assert identity == {"manufacturer": "ACME", "serial": "X1", "rated_power_kw": 50.0}
    assert sorted(iq) == ["invalid:firmware", "invalid:model"]


def test_float_model_not_implemented_is_nan() -> None:
    dev = FakeDevice()
    dmap = device_map(Discovery(40000, tuple(dev.chain(40000, [(1, 66), (113, 60)]))))
    dev.put(dmap.points, {"ac_power": 12.5, "grid_frequency": 50.01, "status": 2}, {})
    dev.raw(40070 + 16, 0x7FC0, 0x0000)  # PhVphA NaN
    values, quality = _poll(dev, dmap)
    assert values["ac_power"] == 12.5 and values["grid_frequency"] == 50.01 and values["status"] == 2
    assert "invalid:phase_a_voltage" in quality


def test_repeated_models_get_suffixes_and_modules_are_numbered_on() -> None:
    disc = Discovery(40000, (ModelRef(1, 40002, 66), ModelRef(203, 40070, 105), ModelRef(203, 40177, 105),
                             ModelRef(160, 40284, 8 + 20 * 3), ModelRef(160, 40354, 8 + 20)))
    keys = {p.key for p in device_map(disc).points}
    # No inverter model: the meters are the device, so the first one has the plain canonical keys.
    assert {"ac_power", "ac_power_2", "energy_export", "energy_export_2", "meter_w_sf", "meter_w_sf_2"} <= keys
    assert {"pv1_voltage", "pv3_voltage", "pv4_voltage"} <= keys and "pv5_voltage" not in keys
    assert len(keys) == len(device_map(disc).points), "keys are unique"


def test_tables_match_the_sunspec_json_shipped_with_pysunspec2() -> None:
    """Independent check of every offset, type and scale-factor name against sunspec/models JSON."""
    sunspec2 = pytest.importorskip("sunspec2")
    json_dir = Path(sunspec2.__file__).parent / "models" / "json"

    def offsets(group: dict[str, Any]) -> tuple[dict[str, tuple[int, str, Any, int]], int]:
        out, off = {}, 0
        for p in group["points"]:
            out[p["name"]] = (off, p["type"], p.get("sf"), p.get("size", 1))
            off += p.get("size", 1)
        return out, off

    for model_id, mdef in MODELS.items():
        group = json.loads((json_dir / f"model_{model_id}.json").read_text())["group"]
        points, end = offsets(group)
        assert end - 2 == mdef.length or mdef.group_size, model_id
        for sp in mdef.points:
            assert points[sp.name] == (sp.offset, sp.type, sp.sf, sp.words), (model_id, sp.name)
        if mdef.group:
            gpoints, gend = offsets(group["groups"][0])
            assert (end, gend) == (mdef.group_offset, mdef.group_size)
            for sp in mdef.group:
                assert gpoints[sp.name] == (sp.offset, sp.type, sp.sf, sp.words), (model_id, sp.name)


def test_generated_maps_follow_the_library_conventions() -> None:
    from test_golden import COUNTERS, NON_CANONICAL, _canonical_unit

    disc = Discovery(40000, (ModelRef(1, 40002, 66), ModelRef(103, 40070, 50), ModelRef(120, 40122, 26),
                             ModelRef(122, 40150, 44), ModelRef(160, 40196, 48), ModelRef(203, 40246, 105)))
    dmap = device_map(disc)
    for p in (*dmap.points, *dmap.identity):
        assert p.key not in NON_CANONICAL
        unit = _canonical_unit(p.key)
        assert unit is None or p.unit == unit, (p.key, p.unit, unit)
        assert p.counter or p.key not in COUNTERS
    keys = [p.key for p in (*dmap.points, *dmap.identity)]
    assert len(keys) == len(set(keys))


# --- the simulated SunSpec device -----------------------------------------------------------------


def _sim(float_model: bool = False, unit: int = 1) -> SunSpecSimDevice:
    clock = SimClock(time.time(), NOON, 0.0)  # speed 0: the values do not move during a test
    return make_sim_device(unit, PvPlant(rated_kw=50.0, seed=unit, sun=Sun(TZ)), clock, float_model=float_model)


def test_sim_refuses_registers_outside_the_chain() -> None:
    dev = _sim()
    assert dev.read(Table.HOLDING, 40000, 2) == list(MARKER)
    assert dev.read(Table.HOLDING, 39999, 2) == 2
    end = dev.discovery.models[-1].address + 2 + dev.discovery.models[-1].length
    assert dev.read(Table.HOLDING, end, 2) == [0xFFFF, 0]
    assert dev.read(Table.HOLDING, end, 3) == 2
    assert dev.read(Table.INPUT, 40000, 2) == 2
    assert dev.read(Table.HOLDING, 0, 2) == 2


def test_sim_honours_overrides_by_published_key() -> None:
    dev = _sim()
    dev.overrides.update({"ac_power": 12.34, "meter_energy_export": 4321.0, "status": 7})
    dmap = device_map(dev.discovery)
    blocks = plan_device(dmap)
    registers = {i: dev.read(b.table, b.start, b.count) for i, b in enumerate(blocks)}
    assert all(isinstance(r, list) for r in registers.values())
    values, quality = decode_blocks(blocks, registers)  # type: ignore[arg-type]
    assert quality == []
    assert values["ac_power"] == pytest.approx(12.34, abs=0.01)
    assert values["meter_energy_export"] == 4321.0 and values["status"] == 7


async def _pvgate_read(port: int) -> tuple[Discovery, dict[str, Value], list[str], dict[str, Value]]:
    client = LinkClient(Link("lan", LinkType.TCP, host="127.0.0.1", port=port, timeout=2.0))
    try:
        async def holding(address: int, count: int) -> list[int]:
            return await client.read(Table.HOLDING, address, count, 1, 2.0)

        disc = await discover(holding)
        dmap = device_map(disc)
        blocks = plan_device(dmap)
        regs = {i: await holding(b.start, b.count) for i, b in enumerate(blocks)}
        values, quality = decode_blocks(blocks, regs)
        ident = without_scale_factors(dmap.identity)
        raw: dict[str, list[int]] = {}
        for b in plan_reads(ident, 125, 16):
            raw.update(block_values(b, await holding(b.start, b.count)))
        identity, _ = decode_points(ident, raw)
        return disc, values, quality, identity
    finally:
        client.close()


@pytest.fixture
def sunspec_server(request: pytest.FixtureRequest) -> Iterator[tuple[int, SunSpecSimDevice]]:
    dev = _sim(float_model=request.param)
    port = free_port()
    with ServerThread(Listen("tcp", "127.0.0.1", port), {1: dev}):
        yield port, dev


@pytest.mark.parametrize("sunspec_server", [False, True], ids=["int+sf", "float"], indirect=True)
def test_pysunspec2_and_pvgate_read_the_same_values(sunspec_server: tuple[int, SunSpecSimDevice]) -> None:
    client_mod = pytest.importorskip("sunspec2.modbus.client")
    port, dev = sunspec_server
    inverter_id = 113 if dev.float_model else 103

    ss = client_mod.SunSpecModbusClientDeviceTCP(slave_id=1, ipaddr="127.0.0.1", ipport=port, timeout=5)
    try:
        ss.scan()
    finally:
        ss.close()
    assert {1, inverter_id, 120, 160, 203} <= {k for k in ss.models if isinstance(k, int)}

    disc, got, quality, identity = run(_pvgate_read(port))
    assert disc.ids == [1, inverter_id, 120, 160, 203]
    assert [m.address for m in disc.models] == [m.address for m in dev.discovery.models]
    assert quality == []

    common, inv = ss.models[1][0], ss.models[inverter_id][0]
    mppt, meter, plate = ss.models[160][0], ss.models[203][0], ss.models[120][0]
    assert common.L.value == 66
    assert identity == {"manufacturer": common.Mn.value, "model": common.Md.value, "serial": common.SN.value,
                        "firmware": common.Vr.value, "rated_power_kw": plate.WRtg.cvalue / 1000.0}
    assert identity["model"] == "SIM-SUNSPEC-50" and identity["manufacturer"] == "pvgate"

    same = same_as_pysunspec2(got)
    same("ac_power", inv.W, 0.001)
    same("energy_total", inv.WH, 0.001)
    same("grid_frequency", inv.Hz)
    same("phase_a_voltage", inv.PhVphA)
    same("phase_a_current", inv.AphA)
    same("line_ab_voltage", inv.PPVphAB)
    same("power_factor", inv.PF, 0.01)
    same("internal_temperature", inv.TmpCab)
    same("dc_power", inv.DCW, 0.001)
    assert got["status"] == inv.St.value == 4  # MPPT at noon
    modules = mppt.groups["module"]
    assert mppt.N.value == len(modules) == 2
    for n, module in enumerate(modules, start=1):
        same(f"pv{n}_voltage", module.DCV)
        same(f"pv{n}_current", module.DCA)
    same("meter_ac_power", meter.W, -0.001)  # SunSpec meter W: import positive; ours: export positive
    same("meter_energy_export", meter.TotWhExp, 0.001)
    same("meter_energy_import", meter.TotWhImp, 0.001)
    same("meter_grid_frequency", meter.Hz)
    assert meter.W.cvalue < 0 < got["meter_ac_power"], "at noon the station exports"

    # And both agree with the physics the simulator serves.
    state = dev.plant.state(NOON)
    assert got["ac_power"] == pytest.approx(state["ac_power"], abs=0.01)
    assert got["phase_a_voltage"] == pytest.approx(state["phase_a_voltage"], abs=0.1)
    # A float32 of ~3.6e8 Wh has a resolution of 32 Wh.
    assert got["energy_total"] == pytest.approx(state["energy_total"], abs=0.05 if dev.float_model else 0.001)
    assert not math.isnan(float(got["grid_frequency"]))
