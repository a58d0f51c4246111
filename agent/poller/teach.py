"""Learning on the bus: a refused read starts a bisection (agent/poller/learning.py); what one device
learns, the devices of the same model on its link start from."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from agent.poller.learning import Bisection, Learned, Reader
from agent.poller.state import DeviceState
from drivers.model import Block

log = logging.getLogger("agent.poller.worker")
LearnedSink = Callable[[str, Learned], None]  # device id, what it serves: kept across restarts


async def learn_from_refusal(read: Reader, state: DeviceState, block: Block, siblings: Iterable[DeviceState],
                             sink: LearnedSink | None) -> None:
    """Bisect a refused block, replan, and pass what was learned on (siblings, then the sink)."""
    device = state.device
    bisection = Bisection(read, state.learned)
    before = state.learned.to_json()
    try:
        await bisection.run(list(block.points))
    finally:
        state.replan()
        if state.learned.to_json() != before:
            state.learned.learned_at = time.time()
            log.info("device=%s block %s %d+%d refused: learned in %d reads; now %d reads per poll%s",
                     device.id, block.table.name.lower(), block.start, block.count, bisection.transactions,
                     len(state.blocks), f", not served: {', '.join(sorted(state.learned.unsupported))}"
                     if state.learned.unsupported else "")
            taught = [state, *share(state, before, siblings)]
            if sink is not None:
                for s in taught:
                    sink(s.device.id, s.learned)


def share(taught: DeviceState, before: dict[str, Any], siblings: Iterable[DeviceState]) -> list[DeviceState]:
    """Devices of one model serve the same registers: what one learned, its siblings on this link
    that knew what it knew before start from (one learns, thirty do not pay for it). A sibling
    that still refuses something learns on from there; another identity relearns (the runtime)."""
    out = []
    for state in siblings:
        if (state is not taught and state.learned.fingerprint == taught.learned.fingerprint
                and _known(state.learned.to_json()) == _known(before)):
            state.learned = Learned.from_json(taught.learned.to_json())
            state.replan()
            out.append(state)
    return out


def _known(learned: dict[str, Any]) -> tuple[object, ...]:
    """What a learned set says about the registers (not when or on which identity)."""
    return learned["holes"], learned["splits"], learned["unsupported"]
