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

systemd supervision (watchdog, STATUS=, the test wedge hook) is in agent/supervision.py, the
health and status snapshots in agent/health.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import signal
import time
from collections.abc import Coroutine, Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

from apscheduler.events import EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from agent import __version__
from agent.buffer import Buffer
from agent.commands import CommandHandler
from agent.config import SiteConfig, load_site
from agent.health import health_message, status_snapshot
from agent.logutil import RateLimitedLog
from agent.poller import DeviceState, LinkWorker
from agent.publisher import Publisher
from agent.sdnotify import SdNotifier
from agent.status import StatusServer, socket_path
from agent.supervision import Supervision
from agent.writer import BufferWriter
from drivers.errors import ConfigError, PvgateError
from drivers.model import Device, Event, Value

log = logging.getLogger(__name__)
STOP_GRACE_S = 5.0
RELOAD_DRAIN_S = 10.0


def aligned_start(interval_s: float, now: float | None = None) -> datetime:
    """The next wall-clock instant that is a whole multiple of the interval (10s -> :00, :10, ...)."""
    now = time.time() if now is None else now
    return datetime.fromtimestamp(math.ceil(now / interval_s) * interval_s, tz=timezone.utc)


class Agent:
    def __init__(self, cfg: SiteConfig, notifier: SdNotifier | None = None) -> None:
        self.cfg = cfg
        self.started = time.time()
        self.notifier = notifier if notifier is not None else SdNotifier.from_env()
        self.buffer = Buffer(cfg.buffer.path, cfg.buffer.max_mb, cfg.buffer.keep_sent_days, cfg.buffer.min_free_mb)
        self.writer = BufferWriter(self.buffer, cfg.buffer.commit_interval_s)
        self.workers, _ = self._build_workers(cfg, {})
        self.commands = CommandHandler(self)
        self.publisher = self._make_publisher(cfg)
        self._publisher_key = (cfg.mqtt, cfg.site.id)
        self.status_server = StatusServer(socket_path(cfg.agent.state_dir), self._status_request)
        self.scheduler: AsyncIOScheduler | None = None
        self.reloads = 0
        self.last_reload: dict[str, Any] | None = None
        self.missed_ticks = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = asyncio.Event()
        self._stopping = False
        self._reloading = False
        self._shut_down = False
        self._reload_lock: asyncio.Lock | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._on_demand: set[str] = set()
        self._rl = RateLimitedLog(log)
        self.supervision = Supervision(self)
        self._next_publisher: Publisher | None = None

    # -- construction ------------------------------------------------------------------------

    def _make_publisher(self, cfg: SiteConfig) -> Publisher:
        return Publisher(cfg, self.buffer, health=self.health, commands=self.commands)

    def _build_workers(self, cfg: SiteConfig, old: Mapping[str, LinkWorker]) -> tuple[dict[str, LinkWorker], set[str]]:
        """Workers for cfg. A link whose settings did not change keeps its Modbus client (and its
        counters), and a device on it whose link, unit and map did not change keeps its state
        (online, failures, backoff, learned splits): a reload is not an outage. Returns the
        workers and the ids of the devices that start afresh."""
        workers: dict[str, LinkWorker] = {}
        carried: list[tuple[LinkWorker, DeviceState, Device]] = []
        fresh: set[str] = set()
        for link in cfg.links:
            devices = cfg.devices_on(link.id)
            if not devices:
                continue
            prev = old.get(link.id)
            same_link = prev is not None and prev.link == link
            worker = LinkWorker(link, devices, self.writer.put, self.buffer.put_identity,
                                client=prev.client if prev is not None and same_link else None)
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
        return workers, fresh

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._reload_lock = asyncio.Lock()
        self.notifier.status("starting")
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        try:
            self.writer.start()
            self.publisher.start()
            self._start_workers()
            self._start_scheduler(poll_now=[d.id for d in self.cfg.devices])
            await self.status_server.start()
            self._spawn(self.supervision.heartbeat(), "heartbeat")
            self.supervision.arm_test_wedge()
            log.info("device=_site pvgate %s running: site %s, %d links, %d devices, buffer %s",
                     __version__, self.cfg.site.id, len(self.workers), len(self.cfg.devices), self.cfg.buffer.path)
            self.notifier.ready()
            self.notifier.status(self.supervision.status_line())
            self.supervision.start_watchdog()
            await self._stop.wait()
        finally:
            await self.shutdown()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        return 0

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _start_workers(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = {lid: loop.create_task(w.run(), name=f"link-{lid}") for lid, w in self.workers.items()}

    async def _stop_workers(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = {}

    def _start_scheduler(self, poll_now: Iterable[str]) -> None:
        sched = AsyncIOScheduler(timezone=timezone.utc, job_defaults={
            "coalesce": True, "max_instances": 1, "misfire_grace_time": 5})
        for device in self.cfg.devices:
            worker = self.workers[device.link]
            trigger = IntervalTrigger(seconds=device.interval_s, start_date=aligned_start(device.interval_s),
                                      timezone=timezone.utc)
            sched.add_job(self._tick, trigger, args=(worker, device.id), id=f"poll-{device.id}",
                          misfire_grace_time=max(1, int(device.interval_s)))
        sched.add_job(self._prune, IntervalTrigger(minutes=10, timezone=timezone.utc), id="prune")
        sched.add_listener(self._job_missed, EVENT_JOB_MISSED)
        sched.start()
        self.scheduler = sched
        # Poll once right away: a technician restarting the agent wants data now, not at :10.
        for device_id in poll_now:
            owner = self._worker_of(device_id)
            if owner is not None:
                owner.request(device_id)

    def _stop_scheduler(self) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
            self.scheduler = None

    async def _tick(self, worker: LinkWorker, device_id: str) -> None:
        state = worker.states.get(device_id)
        if state is not None and state.queued and device_id in self._on_demand:
            return  # an on-demand read is this tick's poll: not an overrun
        worker.request(device_id)

    def _job_missed(self, event: JobExecutionEvent) -> None:
        job_id = str(event.job_id)
        if not job_id.startswith("poll-"):
            return
        self.missed_ticks += 1
        device = job_id[len("poll-"):]
        self._rl.warning(f"missed:{device}", "device=%s poll tick missed: the agent was too busy (counted as overrun)",
                         device)

    async def _prune(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.buffer.prune_sent)

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
        if self._reload_lock is not None and self._reload_lock.locked():
            try:  # a reload in progress finishes first (it is bounded); later ones see _stopping
                await asyncio.wait_for(self._reload_lock.acquire(), RELOAD_DRAIN_S + STOP_GRACE_S + 5)
                self._reload_lock.release()
            except asyncio.TimeoutError:
                log.warning("device=_site stopping while a reload is still in progress")
        self._stop_scheduler()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.status_server.stop()
        await self._stop_workers()
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
        self._spawn(self.reload("SIGHUP"), "reload")

    def reload_coro(self, origin: str) -> Coroutine[Any, Any, dict[str, Any]]:
        """For the remote command: a publisher change is finished after the reply went out."""
        return self.reload(origin, defer_publisher=True)

    async def reload(self, origin: str, defer_publisher: bool = False) -> dict[str, Any]:
        """Re-read the site file and apply it, or keep the running configuration. Never raises."""
        if self._stopping or self._reload_lock is None:
            return {"ok": False, "error": "the agent is stopping"}
        async with self._reload_lock:
            if self._stopping:
                return {"ok": False, "error": "the agent is stopping"}
            self.notifier.reloading()
            self.notifier.status(f"reloading {self.cfg.file}")
            try:
                result = await self._reload_locked(origin)
            except Exception as err:  # the agent must keep running whatever a reload does
                log.error("device=_site reload (%s) failed unexpectedly: %s", origin, err, exc_info=True)
                result = {"ok": False, "error": f"internal error: {err}"}
            finally:
                self._reloading = False
            swap = result.get("ok") and (self.cfg.mqtt, self.cfg.site.id) != self._publisher_key
            if swap and not defer_publisher:
                await self._swap_publisher()
            if result.get("ok") and result.get("changed"):
                self.reloads += 1
            self.last_reload = {"ts": int(time.time() * 1000), "origin": origin, "ok": bool(result.get("ok")),
                                **({"error": result["error"]} if "error" in result else {})}
            self.notifier.ready()
            self.notifier.status(self.supervision.status_line())
        if swap and defer_publisher:
            self._spawn(self._deferred_swap(), "publisher-swap")
        return result

    async def _reload_locked(self, origin: str) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        path = self.cfg.file
        try:
            new_cfg = await loop.run_in_executor(None, load_site, path)
        except ConfigError as err:
            for problem in err.problems:
                log.error("device=_site reload rejected: %s", problem)
            n = len(err.problems)
            log.error("device=_site reload (%s) rejected: %d problem%s in %s; the running configuration is kept",
                      origin, n, "s" if n != 1 else "", path)
            return {"ok": False, "error": f"invalid site file: {n} problem{'s' if n != 1 else ''}; "
                                          "the running configuration is kept",
                    "problems": [str(p) for p in err.problems]}
        except (PvgateError, OSError) as err:
            log.error("device=_site reload (%s) rejected: %s; the running configuration is kept", origin, err)
            return {"ok": False, "error": f"cannot load {path}: {err}; the running configuration is kept"}
        new_cfg, restart_needed = self._reloadable(new_cfg)
        for what in restart_needed:
            log.warning("device=_site reload: %s changed; it takes effect at the next restart", what)
        old = self.cfg
        self._next_publisher = None
        if (new_cfg.mqtt, new_cfg.site.id) != self._publisher_key:
            try:  # e.g. a TLS key that cannot be used: refuse before anything changes
                self._next_publisher = self._make_publisher(new_cfg)
            except ConfigError as err:
                for problem in err.problems:
                    log.error("device=_site reload rejected: %s", problem)
                log.error("device=_site reload (%s) rejected: the new MQTT settings cannot be used; "
                          "the running configuration is kept", origin)
                return {"ok": False, "error": "invalid MQTT settings; the running configuration is kept",
                        "problems": [str(p) for p in err.problems]}
        if new_cfg == old:
            log.info("device=_site reload (%s): %s unchanged", origin, path)
            return {"ok": True, "changed": False, "restart_needed": restart_needed, **self._summary()}
        diff = _diff_devices(old, new_cfg)
        await self._apply(new_cfg)
        for did in diff["added"]:
            log.info("device=%s added by reload", did)
        for did in diff["removed"]:
            log.info("device=%s removed by reload: no longer polled", did)
        for did in diff["changed"]:
            log.info("device=%s settings changed by reload", did)
        log.info("device=_site reload (%s) applied %s: %d links, %d devices (%d added, %d removed, %d changed)",
                 origin, path, len(self.workers), len(new_cfg.devices), len(diff["added"]), len(diff["removed"]),
                 len(diff["changed"]))
        return {"ok": True, "changed": True, "devices_added": diff["added"], "devices_removed": diff["removed"],
                "devices_changed": diff["changed"], "restart_needed": restart_needed, **self._summary()}

    def _reloadable(self, new: SiteConfig) -> tuple[SiteConfig, list[str]]:
        """Keep what cannot change under a running agent (the buffer); say so."""
        old = self.cfg
        restart: list[str] = []
        if new.buffer != old.buffer:
            restart.append("buffer settings")
        if new.agent.state_dir != old.agent.state_dir:
            restart.append("agent.state_dir")
        agent = dataclasses.replace(new.agent, state_dir=old.agent.state_dir)
        return dataclasses.replace(new, buffer=old.buffer, agent=agent), restart

    def _summary(self) -> dict[str, Any]:
        return {"links": [link.id for link in self.cfg.links], "devices": [d.id for d in self.cfg.devices]}

    async def _apply(self, new_cfg: SiteConfig) -> None:
        """Stop polling (in-flight polls finish), commit, rebuild workers and scheduler, retarget the publisher."""
        loop = asyncio.get_running_loop()
        self._reloading = True
        self._stop_scheduler()
        deadline = time.monotonic() + RELOAD_DRAIN_S
        while self.supervision.any_busy() and time.monotonic() < deadline and not self._stopping:
            await asyncio.sleep(0.02)
        if self.supervision.any_busy():
            log.warning("device=_site reload: polls still running after %.0f s are abandoned", RELOAD_DRAIN_S)
        await self._stop_workers()
        await loop.run_in_executor(None, self.writer.flush, 10.0)
        old_cfg, old_workers = self.cfg, self.workers
        try:
            workers, fresh = self._build_workers(new_cfg, old_workers)
        except Exception:
            log.error("device=_site reload: cannot build link workers; resuming the previous configuration",
                      exc_info=True)
            self._start_workers()
            self._start_scheduler(poll_now=())
            raise
        self.cfg = new_cfg
        self.workers = workers
        self._start_workers()
        self._start_scheduler(poll_now=sorted(fresh))
        if new_cfg.agent.log_level != old_cfg.agent.log_level:
            logging.getLogger().setLevel(new_cfg.agent.log_level)
        if (new_cfg.mqtt, new_cfg.site.id) == self._publisher_key:
            self._retarget_publisher(new_cfg, old_cfg)

    def _retarget_publisher(self, new_cfg: SiteConfig, old_cfg: SiteConfig) -> None:
        """Same broker, same session: the publisher only needs the new device list (meta)."""
        pub = self.publisher
        pub.cfg = new_cfg
        meta_sent = getattr(pub, "_meta_sent", None)
        if isinstance(meta_sent, dict):
            meta_sent.clear()  # republish every device's retained meta
        if hasattr(pub, "_next_meta"):
            pub._next_meta = 0.0
        if new_cfg.agent.health_interval_s != old_cfg.agent.health_interval_s and hasattr(pub, "_next_health"):
            pub._next_health = 0.0

    async def _deferred_swap(self) -> None:
        if self._reload_lock is None:
            return
        async with self._reload_lock:
            if not self._stopping:
                await self._swap_publisher()

    async def _swap_publisher(self) -> None:
        key = (self.cfg.mqtt, self.cfg.site.id)
        if key == self._publisher_key or self._stopping:
            return
        log.info("device=_site reload: MQTT settings changed; reconnecting to %s:%d (unsent data is kept)",
                 self.cfg.mqtt.host, self.cfg.mqtt.port)
        new = self._next_publisher
        self._next_publisher = None
        if new is None or new.cfg is not self.cfg:
            try:
                new = self._make_publisher(self.cfg)
            except ConfigError as err:  # checked at reload; the files may have changed since
                log.error("device=_site new MQTT settings unusable, staying with the old ones: %s", err)
                return
        old = self.publisher
        await asyncio.get_running_loop().run_in_executor(None, old.stop, STOP_GRACE_S)
        self.publisher = new
        self._publisher_key = key
        new.start()

    # -- on-demand read (remote command) -----------------------------------------------------

    def _worker_of(self, device_id: str) -> LinkWorker | None:
        for worker in self.workers.values():
            if device_id in worker.states:
                return worker
        return None

    def read_coro(self, device_id: str, points: list[str] | None,
                  timeout_s: float) -> Coroutine[Any, Any, dict[str, Any]]:
        return self._read_now(device_id, points, timeout_s)

    async def _read_now(self, device_id: str, points: list[str] | None, timeout_s: float) -> dict[str, Any]:
        """One extra poll by the device's own link worker (queued behind the current one)."""
        deadline = time.monotonic() + timeout_s
        while self._reloading and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        worker = self._worker_of(device_id)
        if worker is None:
            return {"ok": False, "error": f"unknown device {device_id!r}"}
        state = worker.states[device_id]
        polls0, failed0 = state.polls, state.failed_polls
        self._on_demand.add(device_id)
        try:
            while True:
                if self._stopping:
                    return {"ok": False, "error": "the agent is stopping"}
                if worker is not self._worker_of(device_id):
                    return {"ok": False, "error": "the configuration was reloaded during the read; ask again"}
                if not state.queued:
                    if state.polls > polls0:
                        break  # a poll that started after the request has finished
                    if state.online is False:
                        state.next_probe = 0.0  # asked for explicitly: probe now, backoff or not
                    worker.request(device_id)
                if time.monotonic() >= deadline:
                    return {"ok": False, "error": f"no poll of {device_id} finished within {timeout_s:g} s "
                                                  f"(link {worker.link.id} busy or wedged)"}
                await asyncio.sleep(0.02)
        finally:
            self._on_demand.discard(device_id)
        units = {p.key: p.unit for p in state.device.profile.points}
        if state.failed_polls > failed0:
            return {"ok": False, "error": f"device {device_id} did not answer",
                    "device": device_id, "online": state.online, "consecutive_failures": state.failures}
        values: dict[str, Value | None] = dict(state.last_values)
        if points is not None:
            values = {k: state.last_values.get(k) for k in points}
        return {"ok": True, "device": device_id, "link": worker.link.id, "unit": state.device.unit,
                "ts": state.last_good_ms, "values": values,
                "units": {k: units.get(k, "") for k in values},
                "missing": sorted(k for k, v in values.items() if v is None)}

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


def _diff_devices(old: SiteConfig, new: SiteConfig) -> dict[str, list[str]]:
    before = {d.id: d for d in old.devices}
    after = {d.id: d for d in new.devices}
    return {"added": sorted(set(after) - set(before)), "removed": sorted(set(before) - set(after)),
            "changed": sorted(i for i in set(before) & set(after) if before[i] != after[i])}


def run_agent(cfg_path: str) -> int:
    cfg = load_site(cfg_path)
    agent = Agent(cfg)
    return asyncio.run(agent.run())


def site_event(kind: str, **details: Value) -> Event:
    return Event("_site", int(time.time() * 1000), kind, dict(details))


__all__ = ["Agent", "ConfigError", "aligned_start", "run_agent"]
