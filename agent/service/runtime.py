"""Wiring: the one module that knows every part. config -> plan -> poll -> decode -> buffer -> publish.

The event loop runs the link workers, the scheduler, the status socket and the reload logic;
the buffer writer, the publisher and the systemd watchdog each have a thread. Nothing but the
buffer connects polling with publishing.

Service behaviour (docs/operations.md):

- systemd: ``READY=1`` once config, buffer, workers and publisher are up; ``WATCHDOG=1`` every
  ``WATCHDOG_USEC/2`` only while the event loop, every busy link worker, the publisher and the
  buffer writer make progress; ``STATUS=`` lines; ``STOPPING=1`` on shutdown;
  ``RELOADING=1`` ... ``READY=1`` around a reload.
- SIGTERM/SIGINT: stop polling, commit, publish what can be published within STOP_GRACE_S,
  leave the retained status offline, exit 0.
- SIGHUP: re-read the site file. A valid one is applied without a restart (same buffer, same
  seq, same publisher unless the MQTT settings changed); an invalid one is rejected, each
  problem logged as file:line, and the running configuration is kept.

systemd supervision (watchdog, STATUS=, the test wedge hook) is in agent/service/supervision.py, the
health and status snapshots in agent/service/health.py, reload in agent/service/reload.py and
on-demand reads in agent/service/ondemand.py.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import time
from datetime import date
from collections.abc import Coroutine, Iterable, Mapping
from typing import Any

from agent import __version__
from agent.clock.schedule import PollSchedule
from agent.config import SiteConfig, load_site
from agent.logutil import RateLimitedLog
from agent.poller import DeviceState, LinkWorker
from agent.poller.learning import Learned, identity_key
from agent.service import process
from agent.service.health import health_message, status_snapshot
from agent.service.learned import LearnedFile
from agent.service.ondemand import OnDemandReads, worker_of
from agent.service.reload import RELOAD_DRAIN_S, STOP_GRACE_S, Reloader
from agent.service.reporting import CHECK_S as REPORT_CHECK_S
from agent.service.reporting import DailyReports, site_facts
from agent.service.sdnotify import SdNotifier
from agent.service.status import StatusServer, socket_path
from agent.service.supervision import Supervision
from agent.service.timekeeping import Timekeeper
from agent.service.web import StatusPageServer
from agent.store.buffer import Buffer
from agent.store.writer import BufferWriter
from agent.tasks import cancel_and_wait
from agent.uplink.commands import CommandHandler
from agent.uplink.publisher import Publisher
from drivers.errors import ConfigError
from drivers.model import Device, Event, Value

log = logging.getLogger(__name__)
PRUNE_EVERY_S = 600.0


class Agent:
    def __init__(self, cfg: SiteConfig, notifier: SdNotifier | None = None) -> None:
        self.cfg = cfg
        self.started = time.time()
        self.notifier = notifier if notifier is not None else SdNotifier.from_env()
        self.buffer = Buffer(cfg.buffer.path, cfg.buffer.max_mb, cfg.buffer.keep_sent_days, cfg.buffer.min_free_mb)
        self.writer = BufferWriter(self.buffer, cfg.buffer.commit_interval_s)
        self.timekeeper = Timekeeper(cfg, self.buffer, self.writer.put, self.writer.flush)
        self.learned_file = LearnedFile(cfg.agent.state_dir)
        self.learned = self.learned_file.load()
        # Polls are timed on the monotonic clock; wall-clock steps cannot stop or burst them.
        self.schedule = PollSchedule(wall=lambda: time.time(), trusted=lambda: self.timekeeper.trusted,
                                     on_overrun=self._overrun)
        self.workers, _ = self.build_workers(cfg, {})
        self.commands = CommandHandler(self)
        self.publisher = self.make_publisher(cfg)
        self.status_server = StatusServer(socket_path(cfg.agent.state_dir), self._status_request)
        self.web = StatusPageServer(self)  # the status page (agent/service/web.py), off unless configured
        self.missed_ticks = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = asyncio.Event()
        self._stopping = False
        self._shut_down = False
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._rl = RateLimitedLog(log)
        self.supervision = Supervision(self)
        self.reloader = Reloader(self)
        self.reads = OnDemandReads(self)
        self.reports = DailyReports(site_facts(cfg), self.buffer)  # agent/service/reporting.py

    # -- construction ------------------------------------------------------------------------

    def make_publisher(self, cfg: SiteConfig) -> Publisher:
        return Publisher(cfg.uplink(), self.buffer, health=self.health, commands=self.commands)

    def build_workers(self, cfg: SiteConfig, old: Mapping[str, LinkWorker]) -> tuple[dict[str, LinkWorker], set[str]]:
        """Workers for cfg. A link whose settings did not change keeps its Modbus client (and its
        counters), and a device on it whose link, unit and map did not change keeps its state
        (online, failures, backoff, learned splits): a reload is not an outage. Returns the
        workers and the ids of the devices that start afresh."""
        self.timekeeper.configure(cfg)
        workers: dict[str, LinkWorker] = {}
        carried: list[tuple[LinkWorker, DeviceState, Device]] = []
        fresh: set[str] = set()
        for link in cfg.links:
            devices = cfg.devices_on(link.id)
            if not devices:
                continue
            prev = old.get(link.id)
            same_link = prev is not None and prev.link == link
            worker = LinkWorker(link, devices, self.writer.put, self._identity,
                                client=prev.client if prev is not None and same_link else None,
                                stamp=self.timekeeper.stamp, night=self.timekeeper, learned_sink=self._learned,
                                on_idle=self._link_idle)
            for device in devices:
                state = prev.states.get(device.id) if prev is not None and same_link else None
                if (state is not None and state.device.unit == device.unit
                        and state.device.profile == device.profile):
                    carried.append((worker, state, device))
                else:
                    fresh.add(device.id)
            workers[link.id] = worker
        for worker, state, device in carried:  # only once everything was built
            state.device = device
            state.queued = False
            worker.states[device.id] = state
        # Alarms active when the agent last stopped: no duplicate `alarm` after a restart, and the
        # `alarm_cleared` of one that cleared meanwhile is sent at the first reading.
        active = self.buffer.active_alarms() if fresh else {}
        for worker in workers.values():
            for did in fresh & set(worker.states):
                state = worker.states[did]
                state.alarm_bits = dict(active.get(did, {}))
                known = self.learned.get(did)
                if known is not None and known.fresh(state.learned.fingerprint):
                    state.learned = known  # the first poll after a restart is already a steady one
                    state.replan()
        return workers, fresh

    def _link_idle(self) -> None:
        """A link finished its polls: when every link has, the cycle's readings are committed
        (group commit, agent/store/writer.py) instead of an interval later."""
        if all(w.idle for w in self.workers.values()):
            self.writer.cycle_done()

    def _learned(self, device_id: str, learned: Learned) -> None:
        """A device's register set was learned (or forgotten): keep it for the next start."""
        self.learned[device_id] = learned
        self.learned_file.stage(self.learned)
        asyncio.get_running_loop().run_in_executor(None, self.learned_file.flush)

    def _identity(self, device_id: str, identity: dict[str, Any]) -> None:
        """A nameplate read: stored for the meta message; a device clock is a witness of ours."""
        self._check_learned(device_id, identity)
        device_time = identity.get("device_time")
        if isinstance(device_time, (int, float)) and not isinstance(device_time, bool) and device_time > 0:
            self.timekeeper.witness(device_id, float(device_time))
        # A synchronous commit: off the event loop, where it would stall RTU timing.
        asyncio.get_running_loop().run_in_executor(None, self.buffer.put_identity, device_id, identity)

    def _check_learned(self, device_id: str, identity: dict[str, Any]) -> None:
        """Registers learned on another model or firmware are learned again."""
        worker = worker_of(self.workers, device_id)
        if worker is None or not identity:
            return
        state = worker.states[device_id]
        who = identity_key(identity)
        if state.learned.identity and state.learned.identity != who:
            log.info("device=%s identity changed (%s -> %s): learning its registers again",
                     device_id, state.learned.identity, who)
            state.learned = Learned(state.learned.fingerprint, identity=who)
            state.replan()
        elif state.learned.identity == who:
            return
        state.learned.identity = who
        self._learned(device_id, state.learned)

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def reloading(self) -> bool:
        return self.reloader.reloading

    @property
    def reloads(self) -> int:
        return self.reloader.reloads

    @property
    def last_reload(self) -> dict[str, Any] | None:
        return self.reloader.last_reload

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.reloader.lock = asyncio.Lock()
        self.notifier.status("starting")
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        try:
            self.writer.start()
            self.publisher.start()
            self.start_workers()
            self.start_scheduler(poll_now=[d.id for d in self.cfg.devices])
            await self.status_server.start()
            await self.web.apply(self.cfg.status_page)
            self.spawn(self.supervision.heartbeat(), "heartbeat")
            self.spawn(self.timekeeper.run(self.schedule.realign), "clock")
            self.supervision.arm_test_wedge()
            log.info("device=_site pvgate %s running: site %s (%s), %d links, %d devices, buffer %s", __version__,
                     self.cfg.site.id, self.cfg.site.name, len(self.workers), len(self.cfg.devices), self.cfg.buffer.path)
            self.notifier.ready()
            self.notifier.status(self.supervision.status_line())
            self.supervision.start_watchdog()
            await self._stop.wait()
        finally:
            await self.shutdown()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        return 0

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def start_workers(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = {lid: loop.create_task(w.run(), name=f"link-{lid}") for lid, w in self.workers.items()}

    async def stop_workers(self) -> None:
        await cancel_and_wait(self._tasks.values(), "link worker")
        self._tasks = {}

    def start_scheduler(self, poll_now: Iterable[str]) -> None:
        for device in self.cfg.devices:
            worker = self.workers[device.link]
            self.schedule.add(f"poll-{device.id}", device.interval_s, functools.partial(self._tick, worker, device.id))
        self.schedule.add("prune", PRUNE_EVERY_S, lambda: self.spawn(self._prune(), "prune"))
        self.reports.configure(site_facts(self.cfg))
        self.schedule.add("report", REPORT_CHECK_S, lambda: self.spawn(self._report_check(), "report"))
        self.schedule.start()
        # Poll once right away: a technician restarting the agent wants data now, not at :10.
        for device_id in poll_now:
            owner = worker_of(self.workers, device_id)
            if owner is not None:
                owner.request(device_id)

    def stop_scheduler(self) -> None:
        """No more ticks (the schedule's task stays, idle, for the next start_scheduler)."""
        for job in self.schedule.jobs():
            self.schedule.remove(job.id)

    def _tick(self, worker: LinkWorker, device_id: str) -> None:
        state = worker.states.get(device_id)
        if state is not None and state.queued and device_id in self.reads.pending:
            return  # an on-demand read is this tick's poll: not an overrun
        worker.request(device_id)

    def _overrun(self, job_id: str, skipped: int) -> None:
        """Ticks the event loop could not serve in time (counted once each, never run late)."""
        if not job_id.startswith("poll-"):
            return
        self.missed_ticks += skipped
        device = job_id[len("poll-"):]
        self._rl.warning(f"missed:{device}", "device=%s %d poll tick(s) missed: the agent was too busy "
                         "(counted as overruns)", device, skipped)

    async def _prune(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.buffer.prune_sent)

    async def _report_check(self) -> None:
        """Yesterday's report after local midnight, revisions after late data (off the loop)."""
        await asyncio.get_running_loop().run_in_executor(None, self.reports.check, self.timekeeper.trusted)

    def report_now(self, day: str | None) -> dict[str, Any]:
        """The `report` command (its worker thread): the day so far, stored and published."""
        return self.reports.on_demand(date.fromisoformat(day) if day else None)

    def request_stop(self) -> None:
        self._stop.set()

    async def shutdown(self) -> None:
        """Stop polling, commit, publish what we can within the grace period, go offline."""
        if self._shut_down:
            return
        self._shut_down = True
        self._stopping = True
        self.notifier.stopping()
        self.notifier.status("stopping: committing and publishing what is buffered")
        log.info("device=_site stopping: polling stops, buffered data is kept")
        loop = asyncio.get_running_loop()
        lock = self.reloader.lock
        if lock is not None and lock.locked():
            try:  # a reload in progress finishes first (it is bounded); later ones see `stopping`
                await asyncio.wait_for(lock.acquire(), RELOAD_DRAIN_S + STOP_GRACE_S + 5)
                lock.release()
            except asyncio.TimeoutError:
                log.warning("device=_site stopping while a reload is still in progress")
        self.stop_scheduler()
        await self.schedule.stop()
        await cancel_and_wait(list(self._background), "background")
        await self.status_server.stop()
        await self.web.stop()
        await self.stop_workers()
        await loop.run_in_executor(None, self.writer.stop)
        await loop.run_in_executor(None, self.publisher.stop, STOP_GRACE_S)
        self.buffer.close()
        self.supervision.stop()
        log.info("device=_site stopped")

    # -- reload (SIGHUP, remote command) -----------------------------------------------------

    def _on_sighup(self) -> None:
        if self._stopping:
            return
        log.info("device=_site SIGHUP: re-reading %s", self.cfg.file)
        self.spawn(self.reload("SIGHUP"), "reload")

    def reload_coro(self, origin: str) -> Coroutine[Any, Any, dict[str, Any]]:
        """For the remote command: a publisher change is finished after the reply went out."""
        return self.reloader.reload(origin, defer_publisher=True)

    async def reload(self, origin: str) -> dict[str, Any]:
        return await self.reloader.reload(origin)

    def read_coro(self, device_id: str, points: list[str] | None,
                  timeout_s: float) -> Coroutine[Any, Any, dict[str, Any]]:
        return self.reads.read(device_id, points, timeout_s)

    # -- command target ----------------------------------------------------------------------

    def site_id(self) -> str:
        return self.cfg.site.id

    def uptime_s(self) -> int:
        return int(time.time() - self.started)

    def device_points(self) -> dict[str, tuple[str, ...]]:
        return {d.id: tuple(p.key for p in d.profile.points if p.publish) for d in self.cfg.devices}

    # -- status socket -----------------------------------------------------------------------

    async def _status_request(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request.get("cmd", "status")
        if cmd == "ping":
            return {"ok": True, "pong": True, "version": __version__, "pid": os.getpid()}
        if cmd == "status":
            values = request.get("values", True) is not False
            snap = await asyncio.get_running_loop().run_in_executor(None, self.status_snapshot, values)
            return {"ok": True, "status": snap}
        return {"ok": False, "error": f"unknown request {str(cmd)[:40]!r}; known: status, ping"}

    # -- health and status -------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """The P/S/health message (called on the publisher thread)."""
        return health_message(self)

    def status_snapshot(self, values: bool = True) -> dict[str, Any]:
        """Everything `pvgate status` and the `status` command show (any thread)."""
        return status_snapshot(self, values)

    def process_coro(self) -> Coroutine[Any, Any, dict[str, Any]]:
        return _process_now()


async def _process_now() -> dict[str, Any]:
    return process.snapshot()  # on the loop: its asyncio tasks are counted there


def run_agent(cfg_path: str) -> int:
    cfg = load_site(cfg_path)
    agent = Agent(cfg)
    return asyncio.run(agent.run())


def site_event(kind: str, **details: Value) -> Event:
    return Event("_site", int(time.time() * 1000), kind, dict(details))


__all__ = ["Agent", "ConfigError", "run_agent"]
