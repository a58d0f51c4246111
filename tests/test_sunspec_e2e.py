"""SunSpec through the whole chain: pvgate-sim serves a SunSpec model chain, pvgate discovers it
and publishes; pysunspec2, an independent client, reads the same values from the same simulator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from support.chain import SimDev, readings, start_agent, start_sim, write_site
from support.ports import free_port
from support.sunspec import same_as_pysunspec2

DEV = SimDev("ss01", 1, "sunspec", 50.0)


def _pysunspec2(port: int) -> Any:
    client_mod = pytest.importorskip("sunspec2.modbus.client")
    ss = client_mod.SunSpecModbusClientDeviceTCP(slave_id=1, ipaddr="127.0.0.1", ipport=port, timeout=5)
    try:
        ss.scan()
    finally:
        ss.close()
    return ss


def test_published_sunspec_values_match_pysunspec2(tmp_path: Path, broker, collector_factory, procs) -> None:
    port = free_port()
    # --speed 0 freezes the simulated clock at noon: both clients see the very same registers.
    start_sim(procs, port, [DEV], speed=0, start="12:00")
    ss = _pysunspec2(port)
    assert {1, 103, 120, 160, 203} <= {k for k in ss.models if isinstance(k, int)}
    site = write_site(tmp_path / "site.yaml", site_id="sunspec-e2e", broker_port=broker.port, modbus_port=port,
                      devices=[DEV])
    col = collector_factory(["pvgate/sunspec-e2e/#"])
    start_agent(procs, site)
    msgs = col.wait_for(lambda ms: len(readings([m for m in ms if "/data/" in m.topic])) >= 2, timeout=30,
                        desc="two SunSpec readings")
    got = readings([m for m in msgs if "/data/" in m.topic])[-1]["values"]
    inv, meter, mppt = ss.models[103][0], ss.models[203][0], ss.models[160][0]

    same = same_as_pysunspec2(got)
    same("ac_power", inv.W, 0.001)
    same("energy_total", inv.WH, 0.001)
    same("grid_frequency", inv.Hz)
    same("phase_a_voltage", inv.PhVphA)
    same("pv1_voltage", mppt.groups["module"][0].DCV)
    same("meter_ac_power", meter.W, -0.001)
    same("meter_energy_export", meter.TotWhExp, 0.001)
    assert got["ac_power"] > 10, "noon: the inverter produces"
    # The meta message lists the points found by discovery, and the nameplate.
    col.wait_for(lambda ms: any(m.json().get("identity", {}).get("model") for m in ms), timeout=20,
                 topic_filter="pvgate/sunspec-e2e/meta/ss01", desc="meta with identity")
    meta = col.messages("pvgate/sunspec-e2e/meta/ss01")[-1].json()
    assert meta["identity"]["model"] == ss.models[1][0].Md.value
    keys = {p["key"] for p in meta["points"]}
    assert {"ac_power", "energy_total", "meter_ac_power"} <= keys
