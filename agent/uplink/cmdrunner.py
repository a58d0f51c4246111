"""Commands run beside the publisher, never on its network thread.

A ``read`` waits for a poll on an RS-485 bus, a ``reload`` for the whole agent: seconds. Run on
the publisher's thread they would stop PUBACK processing and live data meanwhile, and a broker
that sees no traffic may even drop the connection. So the publisher hands each request to
:class:`CommandRunner`, which runs them one at a time on a worker thread and hands the replies
back, waking the publisher (`notify`), which publishes them at once.

Every command has a time limit: the handler's own (``read`` 10 s, ``reload`` 30 s) and, as a
backstop, COMMAND_LIMIT_S here. A command past the backstop gets an error reply, its worker is
left to finish alone (its late answer is discarded) and a fresh worker takes the next request.
At most MAX_WAITING requests wait; more get an immediate "busy" reply.

A flood (a thousand requests a second from a broken or hostile client) must cost neither the
polling nor the uplink: requests beyond COMMANDS_PER_S (burst COMMAND_BURST) are counted in
``dropped`` and not run, and the error replies to refused requests ("rate limited", "busy") are
themselves limited to ERROR_REPLIES_PER_S, so the reply topic does not echo the flood.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

COMMAND_LIMIT_S = 45.0
MAX_WAITING = 32
MAX_ID_BYTES = 4096
COMMANDS_PER_S = 10.0
COMMAND_BURST = 30
ERROR_REPLIES_PER_S = 1.0

Reply = tuple[str, dict[str, Any]]
Handler = Callable[[str, bytes], Reply | None]


def error_reply(name: str, payload: bytes, error: str) -> Reply:
    """An error reply that still echoes the request's id when it has one."""
    req_id: Any = None
    if len(payload) <= MAX_ID_BYTES:
        try:
            request = json.loads(payload.decode("utf-8"))
            candidate = request.get("id") if isinstance(request, dict) else None
            if isinstance(candidate, (str, int)) and not isinstance(candidate, bool) and len(str(candidate)) <= 128:
                req_id = candidate
        except (UnicodeDecodeError, ValueError):
            pass
    return name, {"v": 1, "id": req_id, "command": name, "ok": False, "ts": int(time.time() * 1000),
                  "error": error}


class TokenBucket:
    """rate tokens a second, at most burst saved up; take() spends one if there is one."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens, self.last = burst, clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class CommandRunner:
    def __init__(self, handler: Handler, limit_s: float = COMMAND_LIMIT_S, rate: float = COMMANDS_PER_S,
                 burst: int = COMMAND_BURST, error_rate: float = ERROR_REPLIES_PER_S) -> None:
        self.handler = handler
        self.limit_s = limit_s
        self.timed_out = 0
        self.busy = 0
        self.dropped = 0  # requests not run: over the rate or with too many waiting
        self._admit = TokenBucket(rate, burst)
        self._errors = TokenBucket(error_rate, max(1.0, error_rate))
        self._queue: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._replies: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._current: tuple[str, bytes, float] | None = None
        self._generation = 0
        self._stopped = False
        self._worker: threading.Thread | None = None
        self.notify: Callable[[], None] | None = None  # a reply is ready (the publisher's wake-up)

    @property
    def working(self) -> bool:
        """A command runs or waits: its time limit needs checking (poll) now and then."""
        return self._current is not None or not self._queue.empty()

    def submit(self, name: str, payload: bytes) -> None:
        """From paho's on_message: queue, never block."""
        if not self._admit.take():
            self._refuse(name, payload, f"rate limited: more than {self._admit.rate:g} commands a second; "
                                        "this one was not run")
            return
        if self._queue.qsize() >= MAX_WAITING:
            self.busy += 1
            self._refuse(name, payload, f"busy: {MAX_WAITING} commands are waiting")
            return
        self._queue.put((name, payload))
        if self._worker is None:
            self._start_worker()

    def _refuse(self, name: str, payload: bytes, error: str) -> None:
        self.dropped += 1
        if self._errors.take():
            if self.dropped > 1:
                error += f" ({self.dropped} dropped since start)"
            self._replies.append(error_reply(name[:64], payload, error))
            log.warning("device=_site command %s dropped: %s", name[:64], error)

    def poll(self) -> list[Reply]:
        """Replies ready to publish; a command past its time limit is answered here."""
        with self._lock:
            current = self._current
            if current is not None and time.monotonic() - current[2] > self.limit_s:
                self.timed_out += 1
                self._current = None
                self._generation += 1  # the stuck worker's answer will be discarded
                log.warning("device=_site command %s did not finish within %g s; answered with an error",
                            current[0][:64], self.limit_s)
                self._replies.append(error_reply(current[0], current[1],
                                                 f"{current[0]} did not finish within {self.limit_s:g} s"))
                self._worker = None
        if self._worker is None and not self._queue.empty():
            self._start_worker()
        out = []
        while self._replies:
            out.append(self._replies.popleft())
        return out

    def stop(self) -> None:
        self._stopped = True
        with self._lock:
            self._generation += 1

    def _start_worker(self) -> None:
        with self._lock:
            generation = self._generation
            worker = threading.Thread(target=self._work, args=(generation,), name="commands", daemon=True)
            self._worker = worker
        worker.start()

    def _work(self, generation: int) -> None:
        while not self._stopped and generation == self._generation:
            try:
                name, payload = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            with self._lock:
                if generation != self._generation:  # replaced while waiting: hand the request back
                    self._queue.put((name, payload))
                    return
                self._current = (name, payload, time.monotonic())
            try:
                answer = self.handler(name, payload)
            except Exception:  # a command must never take the runner down
                log.exception("device=_site command %s failed", name[:64])
                answer = error_reply(name, payload, "internal error")
            with self._lock:
                if generation != self._generation:
                    return  # answered already (time limit)
                self._current = None
                if answer is not None:
                    self._replies.append(answer)
            if self.notify is not None:
                self.notify()
