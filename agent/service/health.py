"""Health (P/S/health) and status (`pvgate status`, the status command) snapshots of a running agent.

Read-only views, called from the publisher thread, the status socket and commands; they copy
the containers they walk because the event loop may change them meanwhile.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping
from typing import Any, Protocol

from agent import __version__
from agent.config import SiteConfig
from agent.poller import LinkWorker
from agent.service.supervision import Supervision
from agent.service.timekeeping import Timekeeper
from agent.store.buffer import Buffer
from agent.store.writer import BufferWriter
from agent.uplink.commands import CommandHandler
from agent.uplink.publisher import Publisher


class AgentView(Protocol):
    """What the snapshots read of the running agent (agent.service.runtime.Agent provides it)."""

    @property
    def cfg(self) -> SiteConfig: ...
    @property
    def workers(self) -> Mapping[str, LinkWorker]: ...
    @property
    def buffer(self) -> Buffer: ...
    @property
    def writer(self) -> BufferWriter: ...
    @property
    def publisher(self) -> Publisher: ...
    @property
    def commands(self) -> CommandHandler: ...
    @property
    def supervision(self) -> Supervision: ...
    @property
    def missed_ticks(self) -> int: ...
    @property
    def timekeeper(self) -> Timekeeper: ...
    @property
    def reloads(self) -> int: ...
    @property
    def last_reload(self) -> dict[str, Any] | None: ...
    @property
    def stopping(self) -> bool: ...
    @property
    def reloading(self) -> bool: ...

    def uptime_s(self) -> int: ...

def links_and_devices(agent: AgentView, values: bool, detail: bool) -> tuple[dict[str, Any], dict[str, Any], int]:
    links: dict[str, Any] = {}
    devices: dict[str, Any] = {}
    overruns = 0
    for lid, worker in list(agent.workers.items()):
        s = worker.client.stats
        links[lid] = {"transactions": s.transactions, "errors": s.errors, "timeouts": s.timeouts,
                      "mean_response_ms": round(s.mean_response_ms, 1), "reconnects": s.reconnects,
                      "late_frames": s.late_frames, "drain_s": round(s.drain_s_total, 1),
                      "connected": worker.client.connected}
        if detail:
            links[lid].update({"type": worker.link.type.value, "endpoint": worker.link.endpoint,
                               "busy_s": round(worker.busy_s, 1)})
        for did, st in list(worker.states.items()):
            overruns += st.overruns
            state = "asleep" if st.asleep else {True: "online", False: "offline", None: "unknown"}[st.online]
            dev: dict[str, Any] = {"online": bool(st.online), "state": state, "asleep": st.asleep,
                                   "last_good_ts": st.last_good_ms,
                                   "consecutive_failures": st.failures, "polls": st.polls,
                                   "failed_polls": st.failed_polls, "overruns": st.overruns,
                                   "busy_answers": st.busy_answers, "bus_s": round(st.bus_s, 1)}
            if detail:
                dev.update({"link": lid, "unit": st.device.unit, "profile": st.device.profile.id,
                            "interval_s": st.device.interval_s,
                            **({"name": st.device.name} if st.device.name else {})})
            if values:
                units = {p.key: p.unit for p in st.device.profile.points}
                dev["values"] = dict(st.last_values)
                dev["units"] = {k: units.get(k, "") for k in st.last_values}
            devices[did] = dev
    return links, devices, overruns

def buffer_state(agent: AgentView, now_ms: int) -> dict[str, Any]:
    stats = agent.buffer.stats()
    return {"unsent": stats.unsent, "rows": stats.total, "last_seq": stats.last_seq,
            "oldest_unsent_age_s": (now_ms - stats.oldest_unsent_ts) // 1000 if stats.oldest_unsent_ts else 0,
            "size_bytes": stats.size_bytes, "budget_bytes": stats.budget_bytes,
            "dropped_unsent": stats.dropped_unsent, "memory_dropped": agent.writer.memory_dropped,
            "held_in_memory": int(getattr(agent.writer, "held_in_memory", 0)),
            "batch_waiting": int(getattr(agent.writer, "batch_waiting", 0)),
            "epoch": stats.epoch, "write_errors": dict(agent.writer.errors),
            "failed_commits": agent.writer.failed_commits, "buffer_resets": agent.writer.buffer_resets,
            "retry_s": agent.writer.retry_s, "last_write_error": agent.writer.last_error}

def disk_free(agent: AgentView) -> int | None:
    try:
        return shutil.disk_usage(agent.buffer.path.parent).free
    except OSError:
        return None

def health_message(agent: AgentView) -> dict[str, Any]:
    """The P/S/health message (called on the publisher thread)."""
    now_ms = int(time.time() * 1000)
    links, devices, overruns = links_and_devices(agent, values=False, detail=False)
    buffer = buffer_state(agent, now_ms)
    pub = agent.publisher
    return {
        "v": 1, "site": agent.cfg.site.id, "ts": now_ms, "version": __version__,
        "uptime_s": agent.uptime_s(),
        "links": links, "devices": devices, "poll_overruns": overruns + agent.missed_ticks,
        "devices_online": sum(1 for d in devices.values() if d["online"]),
        "devices_asleep": sum(1 for d in devices.values() if d["asleep"]),
        "devices_unknown": sum(1 for d in devices.values() if d["state"] == "unknown"), "devices_total": len(devices),
        "buffer": buffer,
        "dropped": {"unsent": buffer["dropped_unsent"], "memory": buffer["memory_dropped"]},
        "disk_free_bytes": disk_free(agent),
        "mqtt": {"connected": pub.connected, "messages": pub.stats.messages,
                 "acked_rows": pub.stats.acked_rows, "connects": pub.stats.connects,
                 "replayed_rows": pub.stats.replayed_rows, "resent_rows": pub.stats.resent_rows},
        "reloads": agent.reloads,
        "clock": agent.timekeeper.snapshot(),
        "commands": {"handled": agent.commands.handled, "refused": agent.commands.refused,
                     "dropped": getattr(getattr(agent.publisher, "runner", None), "dropped", 0)},
        **({"watchdog_stalled": agent.supervision.stalled} if agent.supervision.watchdog is not None else {}),
    }

def status_snapshot(agent: AgentView, values: bool = True) -> dict[str, Any]:
    """Everything `pvgate status` and the `status` command show (any thread)."""
    now_ms = int(time.time() * 1000)
    cfg = agent.cfg
    links, devices, overruns = links_and_devices(agent, values=values, detail=True)
    pub = agent.publisher
    return {
        "v": 1, "site": cfg.site.id, "name": cfg.site.name, "ts": now_ms, "version": __version__,
        "pid": os.getpid(), "uptime_s": agent.uptime_s(), "config": cfg.file,
        "state": "stopping" if agent.stopping else ("reloading" if agent.reloading else "running"),
        "reloads": agent.reloads, "last_reload": agent.last_reload,
        "mqtt": {"host": cfg.mqtt.host, "port": cfg.mqtt.port, "tls": cfg.mqtt.tls is not None,
                 "connected": pub.connected, "messages": pub.stats.messages,
                 "acked_rows": pub.stats.acked_rows, "connects": pub.stats.connects},
        "buffer": buffer_state(agent, now_ms),
        "disk_free_bytes": disk_free(agent),
        "poll_overruns": overruns + agent.missed_ticks,
        "clock": agent.timekeeper.snapshot(),
        "watchdog": {"enabled": agent.supervision.watchdog is not None, "stalled": agent.supervision.stalled},
        "links": links, "devices": devices,
    }
