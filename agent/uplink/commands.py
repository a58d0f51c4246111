"""Remote commands from the county center: ``P/S/cmd/<name>`` -> ``P/S/reply/<name>``.

The publisher hands every message on ``P/S/cmd/+`` to a worker thread (cmdrunner.py), which
calls :class:`CommandHandler`; the returned ``(name, reply)`` goes to ``P/S/reply/<name>``. A request is one
JSON object with an ``id`` (a string of at most 128 characters, or an integer), echoed in the
reply so the center can match answers to questions.

Every request gets exactly one reply. A request that is too large, not JSON, not an object,
without a valid id, for an unknown command or with unknown or wrong fields gets
``{"ok": false, "error": ...}`` and changes nothing. No command writes to a device: ``read``
asks the device's link worker for one extra poll, served in turn with the scheduled ones, so
an RS-485 bus still sees one transaction at a time.

Work that belongs to the event loop (``read``, ``reload``) is scheduled onto it with
``asyncio.run_coroutine_threadsafe`` and awaited here with a timeout; this thread never
touches a Modbus client. A ``resend`` gets a second reply when it is done or abandoned
(agent/uplink/resend.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import time
from datetime import date
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Protocol

from agent import __version__
from agent.logutil import RateLimitedLog

log = logging.getLogger(__name__)

MAX_COMMAND_BYTES = 4096
MAX_ID_CHARS = 128
MAX_POINTS = 200
READ_TIMEOUT_S = 10.0
RELOAD_TIMEOUT_S = 30.0
PROCESS_TIMEOUT_S = 2.0
COMMANDS = ("ping", "status", "reload", "read", "resend", "report")
MAX_INT = 2**63 - 1  # ids and seqs: what SQLite and every JSON parser at the center can hold

Reply = tuple[str, dict[str, Any]]


class CommandTarget(Protocol):
    """What the command handler needs from the agent (agent.service.runtime.Agent provides it)."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None: ...

    @property
    def publisher(self) -> Any: ...

    def site_id(self) -> str: ...

    def uptime_s(self) -> int: ...

    def device_points(self) -> Mapping[str, tuple[str, ...]]:
        """Device id -> keys of its published points, for the current configuration."""
        ...

    def status_snapshot(self, values: bool = True) -> dict[str, Any]: ...

    def process_coro(self) -> Coroutine[Any, Any, dict[str, Any]]:
        """The `process` object of `pvgate status` (RSS, descriptors, threads, tasks), taken on the loop."""
        ...

    def reload_coro(self, origin: str) -> Coroutine[Any, Any, dict[str, Any]]: ...

    def read_coro(self, device_id: str, points: list[str] | None,
                  timeout_s: float) -> Coroutine[Any, Any, dict[str, Any]]: ...


class CommandError(Exception):
    """A request that is refused; the message goes into the error reply."""

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.details = details


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _too_big(value: int) -> bool:
    return not -MAX_INT - 1 <= value <= MAX_INT


def _short(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class CommandHandler:
    """Parses, validates and runs one command; always returns a reply."""

    def __init__(self, agent: CommandTarget, max_bytes: int = MAX_COMMAND_BYTES,
                 read_timeout_s: float = READ_TIMEOUT_S, reload_timeout_s: float = RELOAD_TIMEOUT_S) -> None:
        self.agent = agent
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s
        self.reload_timeout_s = reload_timeout_s
        self.handled = 0
        self.refused = 0
        self._rl = RateLimitedLog(log, window_s=60.0)
        self._handlers: dict[str, tuple[tuple[str, ...], Callable[[dict[str, Any]], dict[str, Any]]]] = {
            "ping": ((), self._ping),
            "status": (("values",), self._status),
            "reload": ((), self._reload),
            "read": (("device", "points"), self._read),
            "resend": (("first_seq", "last_seq"), self._resend),
            "report": (("date",), self._report),
        }

    # -- entry point (publisher thread) -------------------------------------------------------

    def __call__(self, name: str, payload: bytes | bytearray) -> Reply:
        started = time.monotonic()
        req_id: str | int | None = None
        try:
            request = self._parse(name, bytes(payload))
            req_id = request["id"]
            allowed, handler = self._handlers[name]
            unknown = sorted(set(request) - {"id", "v", *allowed})
            if unknown:
                raise CommandError(f"unknown field(s) {', '.join(unknown)}; {name} takes "
                                   f"{', '.join(('id', *allowed))}")
            result = handler(request)
        except CommandError as err:
            self.refused += 1
            req_id = err.details.get("id", req_id)
            self._rl.warning(f"refused:{_short(name)}:{err}", "device=_site command %s id=%s refused: %s",
                             _short(name), req_id, err)
            reply: dict[str, Any] = {"v": 1, "id": req_id, "command": name, "ok": False,
                                     "ts": int(time.time() * 1000), "error": str(err)}
            reply.update(err.details)
            return name, _jsonable(reply)
        self.handled += 1
        ok = bool(result.pop("_ok", True))
        error = result.pop("_error", None)
        log.info("device=%s command %s id=%s %s in %.0f ms", result.pop("_device", "_site"), name, req_id,
                 "ok" if ok else f"failed: {error}", (time.monotonic() - started) * 1000)
        reply = {"v": 1, "id": req_id, "command": name, "ok": ok, "ts": int(time.time() * 1000)}
        if error is not None:
            reply["error"] = error
        reply["result"] = result
        return name, _jsonable(reply)

    def _parse(self, name: str, payload: bytes) -> dict[str, Any]:
        if len(payload) > self.max_bytes:
            raise CommandError(f"request too large: {len(payload)} bytes, at most {self.max_bytes}")
        try:
            request = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise CommandError(f"malformed request: not JSON ({_short(str(err), 80)})") from None
        if not isinstance(request, dict):
            raise CommandError("malformed request: expected a JSON object such as {\"id\": \"42\"}")
        if "id" not in request:
            raise CommandError("missing id: every request needs an \"id\" (string or integer), echoed in the reply")
        req_id = request["id"]
        if not ((_is_int(req_id) and not _too_big(req_id))
                or (isinstance(req_id, str) and 0 < len(req_id) <= MAX_ID_CHARS)):
            raise CommandError(f"invalid id: expected a non-empty string of at most {MAX_ID_CHARS} characters "
                               f"or an integer of at most {MAX_INT}")
        if name not in self._handlers:
            raise CommandError(f"unknown command {_short(name)!r}; known: {', '.join(COMMANDS)}", id=req_id)
        return request

    # -- commands ---------------------------------------------------------------------------

    def _ping(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"pong": True, "site": self.agent.site_id(), "version": __version__,
                "uptime_s": self.agent.uptime_s()}

    def _status(self, request: dict[str, Any]) -> dict[str, Any]:
        values = request.get("values", True)
        if not isinstance(values, bool):
            raise CommandError("values: expected true or false")
        snapshot = self.agent.status_snapshot(values=values)
        try:  # as `pvgate status` shows it, so that the center sees a gateway's footprint too
            snapshot["process"] = self._on_loop(self.agent.process_coro(), PROCESS_TIMEOUT_S, "status")
        except CommandError:
            pass  # starting or stopping, or a loop too busy to answer: the rest is still worth sending
        return snapshot

    def _reload(self, request: dict[str, Any]) -> dict[str, Any]:
        result = self._on_loop(self.agent.reload_coro("command"), self.reload_timeout_s, "reload")
        if not result.pop("ok", False):
            result["_ok"] = False
            result["_error"] = result.pop("error", "reload failed")
        return result

    def _read(self, request: dict[str, Any]) -> dict[str, Any]:
        device = request.get("device")
        if not isinstance(device, str) or not device:
            raise CommandError("device: required, the id of one device (string)")
        known = self.agent.device_points()
        if device not in known:
            raise CommandError(f"unknown device {_short(device)!r}; devices: {', '.join(sorted(known)) or 'none'}")
        points: list[str] | None = None
        if "points" in request:
            raw = request["points"]
            if (not isinstance(raw, list) or not raw or len(raw) > MAX_POINTS
                    or not all(isinstance(p, str) for p in raw)):
                raise CommandError(f"points: expected a non-empty list of at most {MAX_POINTS} point keys")
            unknown = [p for p in raw if p not in known[device]]
            if unknown:
                raise CommandError(f"device {device} has no point(s) {', '.join(_short(p) for p in unknown[:10])}",
                                   points=list(known[device]))
            points = list(dict.fromkeys(raw))
        result = self._on_loop(self.agent.read_coro(device, points, self.read_timeout_s),
                               self.read_timeout_s + 2.0, "read")
        result["_device"] = device
        if not result.get("ok", False):
            result["_ok"] = False
            result["_error"] = result.pop("error", "read failed")
        result.pop("ok", None)
        return result

    def _resend(self, request: dict[str, Any]) -> dict[str, Any]:
        first, last = request.get("first_seq"), request.get("last_seq")
        if not _is_int(first) or not _is_int(last):
            raise CommandError("first_seq and last_seq: required, integers")
        assert isinstance(first, int) and isinstance(last, int)
        if _too_big(first) or _too_big(last):
            raise CommandError(f"first_seq and last_seq: at most {MAX_INT}")
        if first < 1 or last < first:
            raise CommandError("expected 1 <= first_seq <= last_seq")
        resend = getattr(self.agent.publisher, "request_resend", None)
        if resend is None or not callable(resend):
            raise CommandError("resend is not supported by this version of pvgate")
        ok, details = resend(first, last, request["id"])
        result = dict(details) if isinstance(details, Mapping) else {"details": details}
        result.setdefault("first_seq", first)
        result.setdefault("last_seq", last)
        if not ok:
            result["_ok"] = False
            result["_error"] = str(result.pop("error", "resend refused"))
        return result

    def _report(self, request: dict[str, Any]) -> dict[str, Any]:
        """The daily report of `date` (default: today, so far), stored and sent on report/daily."""
        day = request.get("date")
        if day is not None and not (isinstance(day, str) and len(day) == 10 and _is_date(day)):
            raise CommandError("date: expected a local date YYYY-MM-DD")
        report = getattr(self.agent, "report_now", None)
        if report is None or not callable(report):
            raise CommandError("report is not supported by this agent")
        return dict(report(day))

    # -- helpers ----------------------------------------------------------------------------

    def _on_loop(self, coro: Coroutine[Any, Any, dict[str, Any]], timeout_s: float, what: str) -> dict[str, Any]:
        """Run a coroutine on the agent's event loop and wait for it here, bounded."""
        loop = self.agent.loop
        if loop is None or loop.is_closed() or not loop.is_running():
            coro.close()
            raise CommandError("the agent is not running (starting or stopping)")
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return dict(future.result(timeout=timeout_s))
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise CommandError(f"{what} did not finish within {timeout_s:g} s") from None
        except concurrent.futures.CancelledError:
            raise CommandError(f"{what} was cancelled (the agent is stopping)") from None


def _is_date(text: str) -> bool:
    try:
        date.fromisoformat(text)
    except ValueError:
        return False
    return True


def _jsonable(reply: dict[str, Any]) -> dict[str, Any]:
    """Make sure the publisher can serialise the reply (it would otherwise fail on its thread)."""
    try:
        json.dumps(reply, ensure_ascii=False)
        return reply
    except (TypeError, ValueError):
        return dict(json.loads(json.dumps(reply, ensure_ascii=False, default=str)))


__all__ = ["COMMANDS", "CommandError", "CommandHandler", "CommandTarget", "MAX_COMMAND_BYTES"]
