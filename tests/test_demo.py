"""`pvgate demo` runs the whole chain by itself and shows what the center receives."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest


def _demo(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", "demo", "--seconds", "9", "--dir", str(tmp_path), *extra],
                          capture_output=True, text=True, timeout=90)


def _check(out: subprocess.CompletedProcess[str], tmp_path: Path) -> None:
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    data = re.findall(r"data\s+(inv0[123]|meter)\s+seq (\d+)", out.stdout)
    assert {d for d, _ in data} == {"inv01", "inv02", "inv03", "meter"}, out.stdout
    seqs = [int(s) for _, s in data]
    assert seqs == sorted(seqs)
    assert "station is online" in out.stdout and "station is offline" in out.stdout.split("data")[-1]
    assert (tmp_path / "site.yaml").exists() and (tmp_path / "buffer.sqlite").exists()


def test_demo_with_mosquitto(tmp_path: Path) -> None:
    _check(_demo(tmp_path, "--broker", "mosquitto"), tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("amqtt") is None, reason="the embedded broker (pvgate[demo]) is not installed")
def test_demo_with_the_embedded_broker(tmp_path: Path) -> None:
    _check(_demo(tmp_path, "--broker", "embedded"), tmp_path)
