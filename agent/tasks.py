"""Stopping asyncio tasks for sure.

On Python 3.11 `asyncio.wait_for` swallows a cancellation that arrives in the same loop turn
as the result it waits for (CPython gh-86296): the cancelled task carries on as if nothing had
happened. pymodbus waits for every answer that way, so cancelling a link worker in the middle
of a transaction can be lost, and an agent that then waited for that worker never stopped (it
hung in `stopping` until systemd killed it). Here a task that outlives its cancel is cancelled
again until it ends, within a bound.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

log = logging.getLogger(__name__)

RECANCEL_S = 0.5  # a swallowed cancel is repeated after this long


async def cancel_and_wait(tasks: Iterable[asyncio.Task[object]], what: str, limit_s: float = 10.0) -> bool:
    """Cancel the tasks and wait until they have ended, cancelling again any that carry on.
    False (and a warning) if some are still running after limit_s."""
    pending = {t for t in tasks if not t.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    rounds = 0
    while pending:
        for task in pending:
            task.cancel()
        rounds += 1
        _, pending = await asyncio.wait(pending, timeout=max(0.0, min(RECANCEL_S, deadline - loop.time())))
        if pending and loop.time() >= deadline:
            log.warning("device=_site %d %s task(s) still running %gs after being cancelled %d times",
                        len(pending), what, limit_s, rounds)
            return False
    if rounds > 1:
        log.info("device=_site %s: a cancel was lost and repeated (%d rounds)", what, rounds)
    return True
