"""Wiring: the one module that knows every part. config -> plan -> poll -> decode -> buffer -> publish.

The event loop runs the link workers and the scheduler; the buffer writer and the publisher
each have a thread. Nothing but the buffer connects polling with publishing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import signal
import time
from datetime import datetime, timezone
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from agent import __version__
from agent.buffer import Buffer
from agent.config import SiteConfig, load_site
from agent.poller import LinkWorker
from agent.publisher import Publisher
from agent.writer import BufferWriter
from drivers.errors import ConfigError
from drivers.model import Event, Value

log = logging.getLogger(__name__)
STOP_GRACE_S = 5.0


def aligned_start(interval_s: float, now: float | None = None) -> datetime:
    """The next wall-clock instant that is a whole multiple of the interval (10s -> :00, :10, ...)."""
    now = time.time() if now is None else now
    return datetime.fromtimestamp(math.ceil(now / interval_s) * interval_s, tz=timezone.utc)


class Agent:
    def __init__(self, cfg: SiteConfig) -> None:
        self.cfg = cfg
        self.started = time.time()
        self.buffer = Buffer(cfg.buffer.path, cfg.buffer.max_mb, cfg.buffer.keep_sent_days, cfg.buffer.min_free_mb)
        self.writer = BufferWriter(self.buffer, cfg.buffer.commit_interval_s)
        self.workers = {
            link.id: LinkWorker(link, cfg.devices_on(link.id), self.writer.put, self.buffer.put_identity)
            for link in cfg.links if cfg.devices_on(link.id)
        }
        self.publisher = Publisher(cfg, self.buffer, health=self.health)
        self.scheduler: AsyncIOScheduler | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        self.writer.start()
        self.publisher.start()
        self._tasks = [asyncio.create_task(w.run(), name=f"link-{lid}") for lid, w in self.workers.items()]
        self._start_scheduler()
        log.info("device=_site pvgate %s running: site %s, %d links, %d devices, buffer %s",
                 __version__, self.cfg.site.id, len(self.workers), len(self.cfg.devices), self.cfg.buffer.path)
        await self._stop.wait()
        await self.shutdown()
        return 0

    def _start_scheduler(self) -> None:
        sched = AsyncIOScheduler(timezone=timezone.utc, job_defaults={
            "coalesce": True, "max_instances": 1, "misfire_grace_time": 5})
        for device in self.cfg.devices:
            worker = self.workers[device.link]
            trigger = IntervalTrigger(seconds=device.interval_s, start_date=aligned_start(device.interval_s),
                                      timezone=timezone.utc)
            sched.add_job(self._tick, trigger, args=(worker, device.id), id=f"poll-{device.id}",
                          misfire_grace_time=max(1, int(device.interval_s)))
        sched.add_job(self._prune, IntervalTrigger(minutes=10, timezone=timezone.utc), id="prune")
        sched.start()
        self.scheduler = sched
        # Poll once right away: a technician restarting the agent wants data now, not at :10.
        for device in self.cfg.devices:
            self.workers[device.link].request(device.id)

    async def _tick(self, worker: LinkWorker, device_id: str) -> None:
        worker.request(device_id)

    async def _prune(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.buffer.prune_sent)

    async def shutdown(self) -> None:
        """Stop polling, commit, publish what we can within the grace period, go offline."""
        log.info("device=_site stopping: polling stops, buffered data is kept")
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.writer.stop)
        await loop.run_in_executor(None, self.publisher.stop, STOP_GRACE_S)
        self.buffer.close()
        log.info("device=_site stopped")

    def request_stop(self) -> None:
        self._stop.set()

    # -- health ------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        stats = self.buffer.stats()
        now_ms = int(time.time() * 1000)
        disk = shutil.disk_usage(self.buffer.path.parent)
        devices: dict[str, dict[str, Value | None]] = {}
        links: dict[str, dict[str, Value]] = {}
        overruns = 0
        for lid, worker in self.workers.items():
            s = worker.client.stats
            links[lid] = {"transactions": s.transactions, "errors": s.errors, "timeouts": s.timeouts,
                          "mean_response_ms": round(s.mean_response_ms, 1), "reconnects": s.reconnects,
                          "connected": worker.client.connected}
            for did, st in worker.states.items():
                overruns += st.overruns
                devices[did] = {"online": bool(st.online), "last_good_ts": st.last_good_ms,
                                "consecutive_failures": st.failures, "polls": st.polls,
                                "failed_polls": st.failed_polls, "overruns": st.overruns}
        return {
            "v": 1, "site": self.cfg.site.id, "ts": now_ms, "version": __version__,
            "uptime_s": int(time.time() - self.started),
            "links": links, "devices": devices, "poll_overruns": overruns,
            "devices_online": sum(1 for d in devices.values() if d["online"]),
            "buffer": {"unsent": stats.unsent, "rows": stats.total, "last_seq": stats.last_seq,
                       "oldest_unsent_age_s": (now_ms - stats.oldest_unsent_ts) // 1000 if stats.oldest_unsent_ts else 0,
                       "size_bytes": stats.size_bytes, "budget_bytes": stats.budget_bytes,
                       "dropped_unsent": stats.dropped_unsent, "memory_dropped": self.writer.memory_dropped},
            "disk_free_bytes": disk.free,
            "mqtt": {"connected": self.publisher.connected, "messages": self.publisher.stats.messages,
                     "acked_rows": self.publisher.stats.acked_rows, "connects": self.publisher.stats.connects},
        }


def run_agent(cfg_path: str) -> int:
    cfg = load_site(cfg_path)
    agent = Agent(cfg)
    return asyncio.run(agent.run())


def site_event(kind: str, **details: Value) -> Event:
    return Event("_site", int(time.time() * 1000), kind, dict(details))


__all__ = ["Agent", "ConfigError", "aligned_start", "run_agent"]
