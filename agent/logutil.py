"""Logging set-up for journald, and rate limiting so a dead device's 500th timeout is a counter, not a line."""

from __future__ import annotations

import logging
import sys
import time
import traceback
from typing import Any

FORMAT = "%(levelname)s %(name)s: %(message)s"


def setup(level: str = "INFO") -> None:
    """One line per event on stderr; journald adds the timestamp, a terminal gets one too."""
    handler = logging.StreamHandler(sys.stderr)
    fmt = FORMAT if not sys.stderr.isatty() else "%(asctime)s " + FORMAT
    handler.setFormatter(logging.Formatter(fmt))
    handler.addFilter(JournalLineFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)


class RateLimitedLog:
    """Logs the first occurrence of a keyed failure, then at most one summary line per window."""

    def __init__(self, logger: logging.Logger, window_s: float = 300.0) -> None:
        self.logger = logger
        self.window_s = window_s
        self._state: dict[str, tuple[float, int]] = {}  # key -> (last logged, suppressed since)

    def warning(self, key: str, msg: str, *args: Any) -> bool:
        return self._log(logging.WARNING, key, msg, *args)

    def _log(self, level: int, key: str, msg: str, *args: Any) -> bool:
        now = time.monotonic()
        last, suppressed = self._state.get(key, (0.0, 0))
        if key in self._state and now - last < self.window_s:
            self._state[key] = (last, suppressed + 1)
            return False
        if suppressed:
            msg += " (%d similar suppressed)"
            args = (*args, suppressed)
        self.logger.log(level, msg, *args)
        self._state[key] = (now, 0)
        return True

    def reset(self, key: str) -> None:
        self._state.pop(key, None)

    def suppressed(self, key: str) -> int:
        return self._state.get(key, (0.0, 0))[1]


class JournalLineFilter(logging.Filter):
    """One line per event, each naming a device: journald gets no multi-line tracebacks, and a
    record from a module that does not say which device it concerns is about the site."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        changed = False
        if record.exc_info:
            exc = "".join(traceback.format_exception(*record.exc_info)).strip()
            msg = f"{msg} | {exc}"
            record.exc_info = None
            record.exc_text = None
            changed = True
        if "device=" not in msg:
            msg = f"device=_site {msg}"
            changed = True
        if "\n" in msg:
            msg = " | ".join(line for line in msg.splitlines() if line.strip())
            changed = True
        if changed:
            record.msg = msg
            record.args = None
        return True
