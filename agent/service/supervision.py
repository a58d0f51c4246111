"""systemd supervision of a running agent: the progress-gated watchdog, STATUS= lines, the event-loop
heartbeat, and the test hook that wedges the link workers.

WATCHDOG=1 goes out only while the event loop, every busy link worker, the publisher and the
buffer writer make progress (limits.md §3): a wedged poll loop stops the pings, and systemd
restarts the service.

Test hook: ``PVGATE_TEST_WEDGE_POLL_AFTER=<seconds>`` makes every Modbus read hang forever after
that many seconds, so the link workers stop making progress and the watchdog pings must stop
(tests/test_notify_runtime.py). It is meant for tests only and logs a warning when armed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import Any, Protocol

from agent.poller import LinkWorker
from agent.service.sdnotify import ProgressWatchdog, SdNotifier
from agent.store.rows import Stats


class Progressing(Protocol):
    @property
    def last_progress(self) -> float: ...


class Publishing(Progressing, Protocol):
    @property
    def connected(self) -> bool: ...


class StatsSource(Protocol):
    def stats(self) -> Stats: ...


class Supervised(Protocol):
    """What supervision watches in the running agent (agent.service.runtime.Agent provides it)."""

    @property
    def notifier(self) -> SdNotifier: ...
    @property
    def workers(self) -> Mapping[str, LinkWorker]: ...
    @property
    def publisher(self) -> Publishing: ...
    @property
    def writer(self) -> Progressing: ...
    @property
    def buffer(self) -> StatsSource: ...
    @property
    def stopping(self) -> bool: ...
    @property
    def reloading(self) -> bool: ...

log = logging.getLogger(__name__)
STATUS_EVERY_S = 30.0
WEDGE_ENV = "PVGATE_TEST_WEDGE_POLL_AFTER"


class Supervision:
    def __init__(self, agent: Supervised) -> None:
        self.agent = agent
        self.watchdog: ProgressWatchdog | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stale_after_s = 0.0
        self._loop_beat = time.monotonic()
        self._busy_seen: dict[int, float] = {}
        self._unsent = 0

    @property
    def stalled(self) -> list[str]:
        return sorted(self.watchdog.stalled) if self.watchdog is not None else []

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)

    def start_watchdog(self) -> None:
        interval = self.agent.notifier.watchdog_interval_s()
        if interval is None:
            return
        self._stale_after_s = 2 * interval  # the whole WATCHDOG_USEC
        probes = {
            "event-loop": lambda: self._loop_beat,
            "poll": self.poll_progress,
            "publish": lambda: self.agent.publisher.last_progress,
            "buffer-writer": lambda: self.agent.writer.last_progress,
        }
        self.watchdog = ProgressWatchdog(self.agent.notifier, probes, self._stale_after_s)
        self._thread = self.watchdog.run_in_thread(interval, self._stop)
        slowest = max((self.poll_budget_s(w) for w in self.agent.workers.values()), default=0.0)
        log.info("device=_site systemd watchdog: WATCHDOG=1 every %.3g s while loops progress; "
                 "stale after %.3g s (a busy link worker: after %.3g s)",
                 interval, self._stale_after_s, max(self._stale_after_s, slowest))

    @staticmethod
    def poll_budget_s(worker: LinkWorker) -> float:
        """The longest one poll on this link may legitimately take (every block, every retry, 'busy')."""
        worst = 0.0
        for state in worker.states.values():
            d = state.device
            timeout = d.timeout if d.timeout is not None else worker.link.timeout
            retries = d.retries if d.retries is not None else worker.link.retries
            worst = max(worst, max(1, len(state.blocks)) * (retries + 3) * (timeout + worker.link.inter_frame_s))
        return worst

    def any_busy(self) -> bool:
        return any(st.queued for w in list(self.agent.workers.values()) for st in list(w.states.values()))

    def poll_progress(self) -> float:
        """Progress of the polling side: an idle worker (nothing queued) is progressing by
        definition; a busy one must have finished a poll recently, or have become busy recently.
        Called on the watchdog thread."""
        now = time.monotonic()
        if self.agent.stopping or self.agent.reloading:
            self._busy_seen = {}
            return now
        oldest = now
        seen: dict[int, float] = {}
        for worker in list(self.agent.workers.values()):
            if not any(st.queued for st in list(worker.states.values())):
                continue
            since = seen[id(worker)] = self._busy_seen.get(id(worker), now)
            credit = max(0.0, self.poll_budget_s(worker) - self._stale_after_s)
            oldest = min(oldest, max(worker.last_progress, since) + credit)
        self._busy_seen = seen
        return oldest

    async def heartbeat(self) -> None:
        """Proves the event loop runs (watchdog probe) and keeps systemd's STATUS= fresh."""
        loop = asyncio.get_running_loop()
        next_status = time.monotonic() + STATUS_EVERY_S
        while True:
            self._loop_beat = time.monotonic()
            if self.agent.notifier.enabled and self._loop_beat >= next_status:
                next_status = self._loop_beat + STATUS_EVERY_S
                try:
                    self._unsent = (await loop.run_in_executor(None, self.agent.buffer.stats)).unsent
                except Exception as err:  # noqa: BLE001 - a status line is not worth a crash
                    log.debug("device=_site buffer stats for STATUS= failed: %s", err)
                self.agent.notifier.status(self.status_line())
            # Without a watchdog nothing reads the beat: wake only for STATUS= (an idle agent sleeps).
            watched = self.agent.notifier.watchdog_interval_s() is not None
            await asyncio.sleep(min(0.5, self._stale_after_s / 4) if watched and self._stale_after_s > 0
                                else 0.5 if watched else STATUS_EVERY_S)

    def status_line(self) -> str:
        states = [st for w in self.agent.workers.values() for st in w.states.values()]
        online = sum(1 for st in states if st.online)
        return (f"{len(states)} devices on {len(self.agent.workers)} links, {online} online; "
                f"MQTT {'connected' if self.agent.publisher.connected else 'not connected'}; {self._unsent} unsent")

    def arm_test_wedge(self) -> None:
        raw = os.environ.get(WEDGE_ENV)
        if not raw:
            return
        try:
            after = float(raw)
        except ValueError:
            log.warning("device=_site %s=%r is not a number of seconds: ignored", WEDGE_ENV, raw)
            return
        log.warning("device=_site TEST HOOK %s armed: every Modbus read hangs after %g s", WEDGE_ENV, after)
        asyncio.get_running_loop().call_later(after, self.wedge_polls)

    def wedge_polls(self) -> None:
        async def hang(*args: Any, **kwargs: Any) -> list[int]:
            await asyncio.Event().wait()
            return []

        for worker in self.agent.workers.values():
            setattr(worker.client, "read", hang)
        log.warning("device=_site TEST HOOK %s: link workers wedged (every Modbus read now hangs)", WEDGE_ENV)
