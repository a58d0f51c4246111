"""Reload: re-read the site file and apply it without a restart, or keep the running configuration.

A valid file is applied without a restart (same buffer, same seq, same publisher unless the
MQTT settings changed); an invalid one is rejected, each problem logged as file:line, and the
running configuration is kept. Devices whose link, unit and map did not change keep their state:
a reload is not an outage. The agent is seen through :class:`ReloadHost`, so this module does
not import the wiring.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Coroutine, Iterable, Mapping
from typing import Any, Protocol

from agent.config import SiteConfig, StatusPageConfig, load_site
from agent.poller import LinkWorker
from agent.service.sdnotify import SdNotifier
from agent.store.writer import BufferWriter
from agent.uplink.publisher import Publisher
from drivers.errors import ConfigError, PvgateError

log = logging.getLogger(__name__)
STOP_GRACE_S = 5.0
RELOAD_DRAIN_S = 10.0


class Busy(Protocol):
    def any_busy(self) -> bool: ...

    def status_line(self) -> str: ...


class PageHost(Protocol):
    async def apply(self, cfg: StatusPageConfig | None) -> None: ...


class ReloadHost(Protocol):
    """What a reload changes and uses in the running agent (agent.service.runtime.Agent)."""

    cfg: SiteConfig
    workers: dict[str, LinkWorker]
    publisher: Publisher
    writer: BufferWriter
    notifier: SdNotifier

    @property
    def web(self) -> PageHost: ...

    @property
    def supervision(self) -> Busy: ...

    @property
    def stopping(self) -> bool: ...

    def make_publisher(self, cfg: SiteConfig) -> Publisher: ...

    def build_workers(self, cfg: SiteConfig,
                      old: Mapping[str, LinkWorker]) -> tuple[dict[str, LinkWorker], set[str]]: ...

    def start_workers(self) -> None: ...

    async def stop_workers(self) -> None: ...

    def start_scheduler(self, poll_now: Iterable[str]) -> None: ...

    def stop_scheduler(self) -> None: ...

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]: ...


class Reloader:
    """Serialises reloads (SIGHUP, the remote command) and counts them for health and status."""

    def __init__(self, agent: ReloadHost) -> None:
        self.agent = agent
        self.reloads = 0
        self.last_reload: dict[str, Any] | None = None
        self.reloading = False
        self.lock: asyncio.Lock | None = None  # made on the event loop (run)
        self._publisher_key = (agent.cfg.mqtt, agent.cfg.site.id)
        self._next_publisher: Publisher | None = None

    def reload_coro(self, origin: str) -> Coroutine[Any, Any, dict[str, Any]]:
        """For the remote command: a publisher change is finished after the reply went out."""
        return self.reload(origin, defer_publisher=True)

    async def reload(self, origin: str, defer_publisher: bool = False) -> dict[str, Any]:
        """Re-read the site file and apply it, or keep the running configuration. Never raises."""
        if self.agent.stopping or self.lock is None:
            return {"ok": False, "error": "the agent is stopping"}
        async with self.lock:
            if self.agent.stopping:
                return {"ok": False, "error": "the agent is stopping"}
            self.agent.notifier.reloading()
            self.agent.notifier.status(f"reloading {self.agent.cfg.file}")
            try:
                result = await self._reload_locked(origin)
            except Exception as err:  # the agent must keep running whatever a reload does
                log.error("device=_site reload (%s) failed unexpectedly: %s", origin, err, exc_info=True)
                result = {"ok": False, "error": f"internal error: {err}"}
            finally:
                self.reloading = False
            swap = result.get("ok") and (self.agent.cfg.mqtt, self.agent.cfg.site.id) != self._publisher_key
            if swap and not defer_publisher:
                await self._swap_publisher()
            if result.get("ok") and result.get("changed"):
                self.reloads += 1
            self.last_reload = {"ts": int(time.time() * 1000), "origin": origin, "ok": bool(result.get("ok")),
                                **({"error": result["error"]} if "error" in result else {})}
            self.agent.notifier.ready()
            self.agent.notifier.status(self.agent.supervision.status_line())
        if swap and defer_publisher:
            self.agent.spawn(self._deferred_swap(), "publisher-swap")
        return result

    async def _reload_locked(self, origin: str) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        path = self.agent.cfg.file
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
        old = self.agent.cfg
        self._next_publisher = None
        if (new_cfg.mqtt, new_cfg.site.id) != self._publisher_key:
            try:  # e.g. a TLS key that cannot be used: refuse before anything changes
                self._next_publisher = self.agent.make_publisher(new_cfg)
            except ConfigError as err:
                for problem in err.problems:
                    log.error("device=_site reload rejected: %s", problem)
                log.error("device=_site reload (%s) rejected: the new MQTT settings cannot be used; "
                          "the running configuration is kept", origin)
                return {"ok": False, "error": "invalid MQTT settings; the running configuration is kept",
                        "problems": [str(p) for p in err.problems]}
        await self.agent.web.apply(new_cfg.status_page)  # also retries a port that was taken
        if new_cfg == old:
            log.info("device=_site reload (%s): %s unchanged", origin, path)
            return {"ok": True, "changed": False, "restart_needed": restart_needed, **self._summary()}
        if dataclasses.replace(new_cfg, status_page=old.status_page) == old:
            self.agent.cfg = new_cfg  # only the page changed: polling goes on untouched
            log.info("device=_site reload (%s) applied %s: only the status page changed", origin, path)
            return {"ok": True, "changed": True, "devices_added": [], "devices_removed": [], "devices_changed": [],
                    "restart_needed": restart_needed, **self._summary()}
        diff = _diff_devices(old, new_cfg)
        await self._apply(new_cfg)
        for did in diff["added"]:
            log.info("device=%s added by reload", did)
        for did in diff["removed"]:
            log.info("device=%s removed by reload: no longer polled", did)
        for did in diff["changed"]:
            log.info("device=%s settings changed by reload", did)
        log.info("device=_site reload (%s) applied %s: %d links, %d devices (%d added, %d removed, %d changed)",
                 origin, path, len(self.agent.workers), len(new_cfg.devices), len(diff["added"]), len(diff["removed"]),
                 len(diff["changed"]))
        return {"ok": True, "changed": True, "devices_added": diff["added"], "devices_removed": diff["removed"],
                "devices_changed": diff["changed"], "restart_needed": restart_needed, **self._summary()}

    def _reloadable(self, new: SiteConfig) -> tuple[SiteConfig, list[str]]:
        """Keep what cannot change under a running agent (the buffer); say so."""
        old = self.agent.cfg
        restart: list[str] = []
        if new.buffer != old.buffer:
            restart.append("buffer settings")
        if new.agent.state_dir != old.agent.state_dir:
            restart.append("agent.state_dir")
        agent = dataclasses.replace(new.agent, state_dir=old.agent.state_dir)
        return dataclasses.replace(new, buffer=old.buffer, agent=agent), restart

    def _summary(self) -> dict[str, Any]:
        cfg = self.agent.cfg
        return {"links": [link.id for link in cfg.links], "devices": [d.id for d in cfg.devices]}

    async def _apply(self, new_cfg: SiteConfig) -> None:
        """Stop polling (in-flight polls finish), commit, rebuild workers and scheduler, retarget the publisher."""
        loop = asyncio.get_running_loop()
        self.reloading = True
        self.agent.stop_scheduler()
        deadline = time.monotonic() + RELOAD_DRAIN_S
        while self.agent.supervision.any_busy() and time.monotonic() < deadline and not self.agent.stopping:
            await asyncio.sleep(0.02)
        if self.agent.supervision.any_busy():
            log.warning("device=_site reload: polls still running after %.0f s are abandoned", RELOAD_DRAIN_S)
        await self.agent.stop_workers()
        await loop.run_in_executor(None, self.agent.writer.flush, 10.0)
        old_cfg, old_workers = self.agent.cfg, self.agent.workers
        try:
            workers, fresh = self.agent.build_workers(new_cfg, old_workers)
        except Exception:
            log.error("device=_site reload: cannot build link workers; resuming the previous configuration",
                      exc_info=True)
            self.agent.start_workers()
            self.agent.start_scheduler(poll_now=())
            raise
        self.agent.cfg = new_cfg
        self.agent.workers = workers
        self.agent.start_workers()
        self.agent.start_scheduler(poll_now=sorted(fresh))
        if new_cfg.agent.log_level != old_cfg.agent.log_level:
            logging.getLogger().setLevel(new_cfg.agent.log_level)
        if (new_cfg.mqtt, new_cfg.site.id) == self._publisher_key:
            self._retarget_publisher(new_cfg, old_cfg)

    def _retarget_publisher(self, new_cfg: SiteConfig, old_cfg: SiteConfig) -> None:
        """Same broker, same session: the publisher only needs the new device list (meta)."""
        self.agent.publisher.retarget(new_cfg.uplink(),
                                      health_changed=new_cfg.agent.health_interval_s != old_cfg.agent.health_interval_s)

    async def _deferred_swap(self) -> None:
        if self.lock is None:
            return
        async with self.lock:
            if not self.agent.stopping:
                await self._swap_publisher()

    async def _swap_publisher(self) -> None:
        key = (self.agent.cfg.mqtt, self.agent.cfg.site.id)
        if key == self._publisher_key or self.agent.stopping:
            return
        log.info("device=_site reload: MQTT settings changed; reconnecting to %s:%d (unsent data is kept)",
                 self.agent.cfg.mqtt.host, self.agent.cfg.mqtt.port)
        new = self._next_publisher
        self._next_publisher = None
        if new is None or new.cfg != self.agent.cfg.uplink():
            try:
                new = self.agent.make_publisher(self.agent.cfg)
            except ConfigError as err:  # checked at reload; the files may have changed since
                log.error("device=_site new MQTT settings unusable, staying with the old ones: %s", err)
                return
        old = self.agent.publisher
        await asyncio.get_running_loop().run_in_executor(None, old.stop, STOP_GRACE_S)
        self.agent.publisher = new
        self._publisher_key = key
        new.start()


def _diff_devices(old: SiteConfig, new: SiteConfig) -> dict[str, list[str]]:
    before = {d.id: d for d in old.devices}
    after = {d.id: d for d in new.devices}
    return {"added": sorted(set(after) - set(before)), "removed": sorted(set(before) - set(after)),
            "changed": sorted(i for i in set(before) & set(after) if before[i] != after[i])}


