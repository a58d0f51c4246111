"""Hostile site files and device maps: whatever the bytes, the answer is a ConfigError whose every
problem names the file and a line (exit 78 from `pvgate check`), in bounded time and memory, never
a traceback. Hypothesis runs derandomized with a fixed budget, so each run tries the same cases."""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_config import BASE, MAP_HEAD, REPO
from test_config import env as env  # noqa: F401 - the fixture

from agent.config import load_site
from drivers.errors import ConfigError

FUZZ = settings(max_examples=150, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
PER_FILE_S = 2.0
LINES = BASE.splitlines()

scalars = st.one_of(
    st.integers(min_value=-(10 ** 60), max_value=10 ** 60).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["yes", "no", "on", "~", "null", "''", "[]", "{}", "1:00", "0100", "0x", "-", "&a x", "*a",
                     "!!binary AAAA", "!!set {a}", "!!python/name:os.system", "!!timestamp 2024-01-01",
                     "'unterminated", "[1, [2, [3]]]", "{a: {b: c}}", "|\n  block", "9" * 5000, "\t", "%YAML 1.1",
                     "!!str", "? x", "<<: *a", "@", "`", "\\x00"]),
    st.text(max_size=40),
)


def _check(path: Path) -> None:
    start = time.monotonic()
    try:
        load_site(path)
    except ConfigError as err:
        assert err.problems
        for p in err.problems:
            assert p.file and p.line >= 0, p
            assert p.line > 0 or p.file == str(path), p
    assert time.monotonic() - start < PER_FILE_S


def _write(tmp: Path, data: bytes, name: str = "site.yaml") -> Path:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@FUZZ
@given(line=st.integers(0, len(LINES) - 1), value=scalars)
def test_any_value_on_any_line(tmp_path_factory: pytest.TempPathFactory, line: int, value: str) -> None:
    lines = list(LINES)
    key, sep, _ = lines[line].partition(":")
    lines[line] = f"{key}{sep} {value}" if sep else f"{lines[line]} {value}"
    _check(_write(tmp_path_factory.mktemp("f"), ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")))


@FUZZ
@given(drop=st.sets(st.integers(0, len(LINES) - 1), max_size=6),
       extra=st.lists(st.tuples(st.integers(0, len(LINES)), st.text(max_size=30)), max_size=4))
def test_missing_and_extra_lines(tmp_path_factory: pytest.TempPathFactory, drop: set[int],
                                 extra: list[tuple[int, str]]) -> None:
    lines = [text for i, text in enumerate(LINES) if i not in drop]
    for where, text in extra:
        lines.insert(min(where, len(lines)), text)
    _check(_write(tmp_path_factory.mktemp("f"), ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")))


@FUZZ
@given(data=st.binary(max_size=400), encoding=st.sampled_from(["raw", "gbk", "utf-16", "latin-1"]))
def test_binary_garbage_and_wrong_encodings(tmp_path_factory: pytest.TempPathFactory, data: bytes,
                                            encoding: str) -> None:
    raw = data if encoding == "raw" else BASE.encode(encoding, "replace") + data
    _check(_write(tmp_path_factory.mktemp("f"), raw))


point_keys = st.sampled_from(["key", "table", "address", "type", "count", "scale", "enum", "bits", "invalid",
                              "word_order", "valid_when", "sim", "publish", "adress"])


@FUZZ
@given(points=st.lists(st.dictionaries(point_keys, scalars, max_size=6), max_size=5),
       head=st.sampled_from(["", "extends: sunspec\n", "defaults: {invalid: max}\n", "read: {max_block: 0}\n",
                             "identity: {model: {address: 0, type: string}}\n", "sunspec: yes\n"]))
def test_broken_device_maps(tmp_path_factory: pytest.TempPathFactory, points: list[dict[str, str]],
                            head: str) -> None:
    tmp = tmp_path_factory.mktemp("m")
    body = "".join("  - {" + ", ".join(f"{k}: {v}" for k, v in p.items()) + "}\n" if p else "  - {}\n" for p in points)
    _write(tmp, (MAP_HEAD.format(id="my-map") + head + body).encode("utf-8", "surrogatepass"), "profiles/my-map.yaml")
    site = BASE.replace("profile: chint-dtsu666", "profile: my-map")
    _check(_write(tmp, site.encode()))


def _bomb(levels: int) -> str:
    out = "a0: &a0 [x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, levels):
        out += f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n"
    return out


HOSTILE = {
    "alias bomb as a key": BASE + _bomb(9) + "? *a8\n: 1\n",
    "alias bomb as devices": BASE.replace("devices:\n", "junk:\n") + _bomb(9) + "devices: *a8\n",
    "alias bomb in a map": None,  # written as a device map below
    "deep nesting": BASE + "extra: " + "[" * 20000 + "]" * 20000 + "\n",
    "huge number": BASE.replace("max_mb: 16", "max_mb: " + "9" * 100000),
    "many aliases": BASE + "x: &x 1\ny: [" + ", ".join(["*x"] * 100000) + "]\n",
    "long line": BASE + "z: " + "a" * 3_000_000 + "\n",
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_files_exit_78_in_bounded_time_and_memory(tmp_path: Path, env: dict[str, str], case: str) -> None:
    text = HOSTILE[case]
    if text is None:
        _write(tmp_path, (MAP_HEAD.format(id="my-map") + "  - {key: p, address: 0, type: u16}\n"
                          + _bomb(9) + "junk: *a8\n").encode(), "profiles/my-map.yaml")
        text = BASE.replace("profile: chint-dtsu666", "profile: my-map")
    path = _write(tmp_path, text.encode())
    limit = 1024 * 1024 * 1024  # 1 GiB of address space: a bomb that expanded would die here

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "agent.cli", "check", "-c", str(path)], capture_output=True,
                            text=True, env=env, cwd=REPO, timeout=60, preexec_fn=cap, check=False)
    assert time.monotonic() - start < 20
    assert result.returncode == 78, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and "MemoryError" not in result.stderr
    first = result.stderr.splitlines()[0]
    assert first.startswith(str(path)) or "my-map.yaml" in first, first
