"""The example sites in config/examples/: each passes `pvgate check` and `pvgate plan` (every bus
keeps up with its intervals), and each simulator file serves every device of its site, proven by
`pvgate commission` against pvgate-sim (serial links on socat ptys, the DTU and the LAN on
loopback ports) and a real mosquitto, which must pass."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from agent.cli import main
from agent.commission.budget import WARN_LOAD, budget_warnings, link_budget, wire_limited
from agent.config import load_site
from support.broker import Broker
from support.ports import free_port
from support.procs import Proc, require_tool

PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "config" / "examples"
SITES = sorted(p for p in EXAMPLES.glob("*.yaml") if not p.name.endswith(".sim.yaml") and p.name != "sim.yaml")
WITH_SIM = ["village-100kw", "joint-village-2.8mw"]
ProcStarter = Callable[..., Proc]


@pytest.mark.parametrize("site", SITES, ids=[p.stem for p in SITES])
def test_example_site_passes_check_and_plan(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "-c", str(site)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["plan", "-c", str(site)]) == 0
    plan = capsys.readouterr().out
    assert "inv01" in plan
    # What plan prints, from its source (the printed words may be in the site's language).
    cfg = load_site(str(site))
    assert budget_warnings(cfg) == []
    for link in cfg.links:
        if wire_limited(link) and cfg.devices_on(link.id):
            assert link_budget(cfg, link).load <= WARN_LOAD, link.id


@pytest.mark.parametrize("site", SITES, ids=[p.stem for p in SITES])
def test_example_site_matches_the_editors_schema(site: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((ROOT / "docs" / "schemas" / "site.json").read_text(encoding="utf-8"))
    data = json.loads(json.dumps(yaml.safe_load(site.read_text(encoding="utf-8"))))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft202012Validator(schema).iter_errors(data)]
    assert errors == []


@pytest.mark.parametrize("name", WITH_SIM)
def test_the_new_examples_have_a_simulator_file(name: str) -> None:
    assert (EXAMPLES / f"{name}.yaml").exists() and (EXAMPLES / f"{name}.sim.yaml").exists()


def test_the_joint_village_station_is_what_it_says() -> None:
    site = yaml.safe_load((EXAMPLES / "joint-village-2.8mw.yaml").read_text(encoding="utf-8"))
    devices = site["devices"]
    meters = [d for d in devices if d["profile"] in ("chint-dtsu666", "eastron-sdm630")]
    assert len(devices) - len(meters) == 30 and len(meters) == 2
    types = [link["type"] for link in site["links"]]
    assert types.count("rtu") >= 2 and "rtu-over-tcp" in types
    assert site["site"]["capacity_kwp"] == 2800 and site["site"]["timezone"] == "Asia/Shanghai"


def _pty_pair(procs: ProcStarter, a: Path, b: Path) -> None:
    socat = require_tool("socat", "/usr/bin/socat")
    proc = procs([socat, "-d", "-d", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"], f"socat-{a.name}")
    deadline = time.monotonic() + 10
    while not (a.exists() and b.exists()):
        assert proc.running and time.monotonic() < deadline, f"socat made no pty pair\n{proc.tail()}"
        time.sleep(0.02)


def _local_copies(name: str, tmp: Path, procs: ProcStarter, broker: Broker) -> tuple[Path, Path]:
    """The sim file and the site file, pointed at this machine as the sim file's header says."""
    sim_text = (EXAMPLES / f"{name}.sim.yaml").read_text(encoding="utf-8")
    site: dict[str, Any] = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text(encoding="utf-8"))
    for link in site["links"]:
        if link["type"] == "rtu":
            sim_end, our_end = tmp / f"{link['id']}-sim", tmp / link["id"]
            _pty_pair(procs, sim_end, our_end)
            assert f"/tmp/pvgate-{link['id']}-sim" in sim_text, f"{name}.sim.yaml serves no {link['id']}"
            sim_text = sim_text.replace(f"/tmp/pvgate-{link['id']}-sim", str(sim_end))
            link["port"] = str(our_end)
        else:
            old = re.search(rf"(?:tcp|rtu-over-tcp)://127\.0\.0\.1:(\d+)[^\n]*# link {link['id']}\b", sim_text)
            assert old, f"{name}.sim.yaml serves no link {link['id']}"
            port = free_port()
            sim_text = sim_text.replace(f"127.0.0.1:{old.group(1)}", f"127.0.0.1:{port}")
            link["host"], link["port"] = "127.0.0.1", port
    site["mqtt"] = {"host": "127.0.0.1", "port": broker.port, "topic_prefix": "pvgate"}
    site["buffer"]["path"] = str(tmp / "buffer.sqlite")
    site["agent"] = {"state_dir": str(tmp), "clock_sync": "assume"}  # the test machine's clock need not be NTP's
    sim_file, site_file = tmp / "sim.yaml", tmp / "site.yaml"
    sim_file.write_text(sim_text, encoding="utf-8")
    site_file.write_text(yaml.safe_dump(site, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return sim_file, site_file


@pytest.mark.parametrize("name", WITH_SIM)
def test_the_simulator_file_serves_every_device_of_its_site(name: str, tmp_path: Path, procs: ProcStarter,
                                                           broker: Broker) -> None:
    sim_file, site_file = _local_copies(name, tmp_path, procs, broker)
    sim = procs([PY, "-m", "simulator.cli", "-c", str(sim_file)], "sim")
    sim.wait_for_line(r'^\{"event": "ready"', timeout=30, stream="stdout")
    env = {k: v for k, v in os.environ.items() if k not in ("LANGUAGE", "LC_ALL", "LC_MESSAGES")}
    out = tmp_path / "report"
    run = subprocess.run([PY, "-m", "agent.cli", "commission", "-c", str(site_file), "-o", str(out),
                          "--duration", "0", "--lang", "en"], capture_output=True, text=True, timeout=300,
                         env={**env, "LANG": "C.UTF-8"}, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    devices = yaml.safe_load(site_file.read_text(encoding="utf-8"))["devices"]
    for d in devices:
        assert f"[PASS] {d['id']}: Device answers" in run.stdout, run.stdout
        assert f"[FAIL] {d['id']}:" not in run.stdout
    (md,) = out.glob("*.md")
    assert "**Result: PASSED**" in md.read_text(encoding="utf-8")
