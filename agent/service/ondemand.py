"""On-demand reads (the remote `read` command): one extra poll by the device's own link worker.

The poll is queued behind the current one, so an RS-485 bus still sees one transaction at a
time. A scheduled tick that finds the device already queued by such a read is not an overrun.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any, Protocol

from agent.poller import LinkWorker
from drivers.model import Value


class ReadHost(Protocol):
    @property
    def workers(self) -> Mapping[str, LinkWorker]: ...

    @property
    def stopping(self) -> bool: ...

    @property
    def reloading(self) -> bool: ...


def worker_of(workers: Mapping[str, LinkWorker], device_id: str) -> LinkWorker | None:
    for worker in workers.values():
        if device_id in worker.states:
            return worker
    return None


class OnDemandReads:
    def __init__(self, host: ReadHost) -> None:
        self.host = host
        self.pending: set[str] = set()  # devices with an on-demand read in progress

    async def read(self, device_id: str, points: list[str] | None, timeout_s: float) -> dict[str, Any]:
        """One extra poll by the device's own link worker (queued behind the current one)."""
        deadline = time.monotonic() + timeout_s
        while self.host.reloading and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        worker = worker_of(self.host.workers, device_id)
        if worker is None:
            return {"ok": False, "error": f"unknown device {device_id!r}"}
        state = worker.states[device_id]
        polls0, failed0 = state.polls, state.failed_polls
        self.pending.add(device_id)
        try:
            while True:
                if self.host.stopping:
                    return {"ok": False, "error": "the agent is stopping"}
                if worker is not worker_of(self.host.workers, device_id):
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
            self.pending.discard(device_id)
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
