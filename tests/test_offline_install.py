"""Installs that work offline: the project's own bundle command for this machine, a fresh venv,
`pip install --no-index` from the bundle only, then `pvgate check` on the example site from a
directory outside the checkout (so the device maps come from the installed package data).

Building the bundle needs the package index (as on the technician's laptop); the test skips
when pip cannot reach one.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUNDLE_SH = REPO / "systemd" / "bundle.sh"
INSTALL_SH = REPO / "systemd" / "install.sh"
HOST_TARGET = f"linux/{platform.machine()}"


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PVGATE_"))}
    env["PYTHON"] = sys.executable
    return env


@pytest.mark.slow
@pytest.mark.skipif(HOST_TARGET not in {"linux/x86_64", "linux/aarch64", "linux/armv7l"},
                    reason=f"no bundle target for {HOST_TARGET}")
def test_bundle_installs_with_no_index_and_checks_the_example(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    built = subprocess.run(["bash", str(BUNDLE_SH), "--target", HOST_TARGET,
                            "--python", f"{sys.version_info.major}.{sys.version_info.minor}", str(bundle)],
                           capture_output=True, text=True, timeout=600, env=_clean_env(), check=False)
    if built.returncode != 0 and ("No matching distribution" in built.stderr or "Network" in built.stderr):
        pytest.skip(f"no package index reachable to build the bundle: {built.stderr[-300:]}")
    assert built.returncode == 0, built.stdout + built.stderr
    wheels = sorted(p.name for p in bundle.glob("*.whl"))
    for name in ("pvgate-", "pymodbus-", "pyserial-", "paho_mqtt-", "tzdata-"):
        assert any(w.startswith(name) for w in wheels), (name, wheels)
    assert any(w.startswith("pyyaml-") and w.endswith("py3-none-any.whl") for w in wheels), wheels
    assert (bundle / "TARGET").read_text().strip() == HOST_TARGET

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    env = {**_clean_env(), "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "", "PIP_INDEX_URL": "http://0.0.0.0:9/"}
    installed = subprocess.run([str(py), "-m", "pip", "install", "--no-index", "--find-links", str(bundle),
                                "-c", str(bundle / "constraints.txt"), "pvgate"],
                               capture_output=True, text=True, timeout=300, env=env, check=False)
    assert installed.returncode == 0, installed.stdout + installed.stderr

    site = tmp_path / "elsewhere" / "site.yaml"
    site.parent.mkdir()
    shutil.copy(REPO / "config" / "examples" / "site.yaml", site)
    state = tmp_path / "state"
    state.mkdir()
    check = subprocess.run([str(venv / "bin" / "pvgate"), "check", "-c", str(site)], capture_output=True, text=True,
                           timeout=60, cwd=tmp_path, env={**env, "PVGATE_STATE_DIR": str(state)}, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "OK — site wuxiang-gucheng" in check.stdout
    listed = subprocess.run([str(py), "-c", "from drivers.devicemap import ProfileLibrary as L; "
                             "import drivers; print(L.default().dirs[0]); print(len(L.default().ids()))"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env, check=True)
    where, count = listed.stdout.split()
    assert where.startswith(str(venv)), where  # the package data, not the checkout
    assert int(count) == len(list((REPO / "config" / "profiles").glob("*.yaml")))


def test_bundle_refuses_an_unknown_target(tmp_path: Path) -> None:
    done = subprocess.run(["bash", str(BUNDLE_SH), "--target", "linux/mips", str(tmp_path / "b")],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 1 and "unknown target 'linux/mips'" in done.stderr


def test_install_offline_dry_run_uses_no_index(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "pvgate-0.1.0-py3-none-any.whl").write_bytes(b"")
    shutil.copy(REPO / "constraints.txt", bundle / "constraints.txt")
    (bundle / "TARGET").write_text(HOST_TARGET + "\n")
    done = subprocess.run(["bash", str(INSTALL_SH), "--dry-run", "--prefix", str(tmp_path / "p"), "--offline", str(bundle)],
                          capture_output=True, text=True, timeout=60, env=_clean_env(), check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    pip = [line for line in done.stdout.splitlines() if "pip install" in line]
    assert len(pip) == 1 and "--no-index" in pip[0] and f"--find-links {bundle}" in pip[0], pip
    assert f"--constraint {bundle}/constraints.txt" in pip[0]


def test_install_offline_refuses_a_bundle_for_another_machine(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "pvgate-0.1.0-py3-none-any.whl").write_bytes(b"")
    (bundle / "TARGET").write_text("linux/other\n")
    done = subprocess.run(["bash", str(INSTALL_SH), "--dry-run", "--offline", str(bundle)],
                          capture_output=True, text=True, timeout=60, env=_clean_env(), check=False)
    assert done.returncode == 1 and "is for linux/other" in done.stderr


def test_install_online_uses_the_constraints(tmp_path: Path) -> None:
    done = subprocess.run(["bash", str(INSTALL_SH), "--dry-run", "--prefix", str(tmp_path / "p")],
                          capture_output=True, text=True, timeout=60, env=_clean_env(), check=False)
    pip = [line for line in done.stdout.splitlines() if "pip install" in line]
    assert pip and f"--constraint {REPO}/constraints.txt" in pip[0], done.stdout


def test_constraints_pin_every_runtime_dependency() -> None:
    pins = {line.split("==")[0].lower() for line in (REPO / "constraints.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#")}
    assert {"pymodbus", "pyserial", "paho-mqtt", "pyyaml", "tzdata"} <= pins
