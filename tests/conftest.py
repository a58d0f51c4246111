"""Shared pytest fixtures: real mosquitto brokers, MQTT collectors, subprocesses,
and a guard against tests leaking non-daemon threads.

The helpers live in ``tests/support`` (importable as ``support`` because
pytest puts this rootdir-less ``tests/`` directory on sys.path).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from support.broker import Broker, require_mosquitto
from support.collector import Collector
from support.postgres import Postgres, find_bin
from support.procs import Proc, ProcRegistry, require_tool
from support.schemas import validate_all
from support.uplink import Uplink

# What people read follows the locale (agent/i18n.py); the tests assert English text unless they set a
# language themselves, so a developer's zh_CN shell (or CI's) must not change what the commands print.
for _name in ("LANGUAGE", "LC_ALL", "LC_MESSAGES"):
    os.environ.pop(_name, None)
os.environ["LANG"] = "C.UTF-8"

BrokerFactory = Callable[..., Broker]
CollectorFactory = Callable[..., Collector]
ProcStarter = Callable[..., Proc]

THREAD_GRACE_S = 2.0


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[BrokerFactory]:
    """``make(**Broker kwargs) -> Broker`` (started); e.g. extra_conf/listener_conf for TLS/ACL tests.

    Every broker made is stopped at teardown.
    """
    binary = require_mosquitto()
    made: list[Broker] = []

    def make(*, start: bool = True, **kwargs: Any) -> Broker:
        kwargs.setdefault("binary", binary)
        b = Broker(tmp_path / f"broker{len(made)}", **kwargs)
        made.append(b)
        if start:
            b.start()
        return b

    yield make
    for b in reversed(made):
        b.stop()


@pytest.fixture
def broker(broker_factory: BrokerFactory) -> Broker:
    """A started mosquitto on 127.0.0.1:<free port>, stopped at teardown."""
    return broker_factory()


@pytest.fixture
def collector_factory(request: pytest.FixtureRequest,
                      broker_factory: BrokerFactory) -> Iterator[CollectorFactory]:
    """``make(topics=("#",), *, broker=None, start=True, timeout=10.0, client_id=None) -> Collector``.

    Binds to the ``broker`` fixture unless another Broker is passed. All
    collectors are stopped at teardown (before the brokers: depending on
    ``broker_factory`` orders the teardown).
    """
    made: list[Collector] = []

    def make(topics: Sequence[str] | str = ("#",), *, broker: Broker | None = None,
             start: bool = True, timeout: float = 10.0, client_id: str | None = None) -> Collector:
        b = broker if broker is not None else request.getfixturevalue("broker")
        c = Collector(b.host, b.port, topics, client_id=client_id)
        made.append(c)
        if start:
            c.start(timeout=timeout)
        return c

    yield make
    for c in made:
        c.stop()
    if request.node.get_closest_marker("contract"):  # every message received follows docs/schemas/
        for c in made:
            validate_all(c.messages())


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcStarter]:
    """``start(cmd, name, env=None, cwd=None) -> Proc``; output in tmp_path/procs.

    Processes still running at teardown are SIGTERMed (then SIGKILLed).
    """
    registry = ProcRegistry(tmp_path / "procs")

    def start(cmd: Sequence[str], name: str, env: Mapping[str, str | None] | None = None,
              cwd: Path | str | None = None) -> Proc:
        return registry.start(cmd, name, env=env, cwd=cwd)

    yield start
    registry.cleanup()


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves new non-daemon threads alive (after a 2 s grace)."""
    before = set(threading.enumerate())
    yield

    def leaked() -> list[threading.Thread]:
        return [t for t in threading.enumerate()
                if t not in before and t.is_alive() and not t.daemon]

    deadline = time.monotonic() + THREAD_GRACE_S
    while leaked() and time.monotonic() < deadline:
        time.sleep(0.05)
    left = leaked()
    if left:
        pytest.fail(f"test leaked non-daemon threads: {[t.name for t in left]}", pytrace=False)


@pytest.fixture
def uplink(broker: Broker) -> Iterator[Uplink]:
    """An unlimited uplink from the station to the `broker` fixture."""
    with Uplink(broker.port) as u:
        yield u


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A private PostgreSQL cluster (own directory, free port), stopped and removed at teardown."""
    bindir = find_bin()
    if bindir is None:
        require_tool("initdb", "/usr/lib/postgresql/15/bin/initdb")  # skips locally, fails in CI
        raise AssertionError("unreachable")
    pg = Postgres(bindir)
    try:
        yield pg.start()
    finally:
        pg.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The long end-to-end tests (`slow`) first: `./dev test` runs the suite on two workers
    (pytest-xdist), and a minutes-long soak handed out last would run alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order otherwise
