"""Logging set-up for journald, and rate limiting so a dead device's 500th timeout is a counter, not a line."""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from typing import Any

FORMAT = "%(levelname)s %(name)s: %(message)s"


# sd-daemon(3) priority prefixes: journald reads "<N>" at the start of a stderr line as its
# syslog priority (SyslogLevelPrefix=yes, the default), so `journalctl -p warning` works.
_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level: 2 crit, 3 err, 4 warning, 6 info, 7 debug."""
    return next((prio for floor, prio in _PRIORITY if levelno >= floor), 7)


def stderr_is_journal(stream: Any = None) -> bool:
    """True when stderr is connected to journald: $JOURNAL_STREAM ("dev:ino", set by systemd)
    names the very file stderr is, not one inherited by a child that redirected stderr."""
    stream = sys.stderr if stream is None else stream
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class JournalFormatter(logging.Formatter):
    """FORMAT with the line's syslog priority in front, for journald."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{syslog_priority(record.levelno)}>{super().format(record)}"


def setup(level: str = "INFO") -> None:
    """One line per event on stderr; journald adds the timestamp, a terminal gets one too."""
    handler = logging.StreamHandler(sys.stderr)
    if stderr_is_journal():
        handler.setFormatter(JournalFormatter(FORMAT))
    else:
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
