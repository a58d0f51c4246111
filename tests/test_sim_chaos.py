"""pvgate-sim --chaos: seeded faults that come and go, and an agent that lives through them."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from simulator.chaos import CHAOS_FAULTS, Chaos, rounds
from simulator.device import Fault
from support.chain import SimDev, agent_cmd, sim_cmd, write_site
from support.ports import free_port


def test_same_seed_same_faults() -> None:
    first = list(itertools.islice(rounds(7, [1, 2, 11]), 50))
    assert first == list(itertools.islice(rounds(7, [11, 2, 1]), 50))
    assert first != list(itertools.islice(rounds(8, [1, 2, 11]), 50))
    kinds = [fault for rnd in first for fault in rnd.faults.values()]
    assert kinds.count("none") > len(kinds) / 4
    assert len(set(kinds)) >= 5 and any(rnd.drop for rnd in first) and any(rnd.second_master for rnd in first)
    for name, _ in CHAOS_FAULTS:
        Fault.parse(name)


@pytest.mark.parametrize("text", ["x", "1:y", "1:0", "1:-5"])
def test_bad_chaos_argument(text: str) -> None:
    with pytest.raises(ValueError, match="--chaos"):
        Chaos.parse(text)


@pytest.mark.slow
def test_chaos_sim_and_an_agent_that_lives_through_it(procs: Any, tmp_path: Path) -> None:
    port = free_port()
    devices = [SimDev("inv01", 1, "huawei-sun2000"), SimDev("meter", 11, "chint-dtsu666")]
    sim = procs(sim_cmd(port, devices, speed=60) + ["--chaos", "7:0.3"], "sim")
    sim.wait_for_line(r'^\{"event": "ready"', timeout=15, stream="stdout")
    site = write_site(tmp_path / "site.yaml", site_id="chaos", broker_port=free_port(), modbus_port=port,
                      devices=devices, interval="0.5s", timeout="0.3s")
    agent = procs(agent_cmd(site), "agent")
    agent.wait_for_line(r"running: site", timeout=20, stream="stderr")
    sim.wait_for_line(r'^\{"event": "chaos".*$', timeout=15, stream="stdout")
    for _ in range(12):  # a few seconds of changing faults
        sim.wait_for_line(r'^\{"event": "chaos"', timeout=5, stream="stdout", since=sim.mark())
    lines = [json.loads(line) for line in sim.stdout().splitlines() if line.startswith('{"event": "chaos"')]
    expected = list(itertools.islice(rounds(7, [1, 11]), len(lines)))
    assert [line["faults"] for line in lines] == [{str(u): f for u, f in rnd.faults.items()} for rnd in expected]
    assert agent.running, agent.tail()
    assert agent.terminate(timeout=20) == 0, agent.tail()
    assert "Traceback" not in agent.stderr()


@pytest.mark.parametrize(("args", "message"), [
    (["--chaos-units", "1"], "--chaos-units needs --chaos"),
    (["--chaos", "7", "--chaos-units", "1,x"], "expected unit numbers separated by commas"),
    (["--chaos", "7", "--chaos-units", "1,9"], "--chaos-units 1,9: no unit 9"),
])
def test_bad_chaos_units(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    from simulator.cli import EX_USAGE, main

    assert main(["--listen", "tcp://127.0.0.1:1", "--device", "1:chint-dtsu666", *args]) == EX_USAGE
    assert message in capsys.readouterr().err


def test_chaos_units_leave_the_others_alone() -> None:
    chaos = Chaos.parse("7:2", "3,4")
    assert chaos.units == {3, 4} and chaos.applies(3) and not chaos.applies(1)
    assert Chaos.parse("7").applies(1)
