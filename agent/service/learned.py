"""Learned register sets kept across restarts: a small JSON file in the agent's state directory.

Device knowledge, not data: it lives beside the buffer rather than in it, so a buffer set aside
after damage or replaced does not cost the bus a relearn (33 s for 30 inverters at 9600 baud).
Written atomically (temporary file, fsync, rename); a damaged file is ignored and relearned.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from agent import private
from agent.poller.learning import Learned

log = logging.getLogger(__name__)
FILE_NAME = "learned-registers.json"


class LearnedFile:
    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / FILE_NAME
        # Devices learn at the same time and each save runs on an executor thread: two writers of
        # the one temporary file renamed it away from each other and could mix their contents.
        self._lock = threading.Lock()
        self._staged: tuple[int, str] = (0, "")
        self._written = 0

    def load(self) -> dict[str, Learned]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return {str(dev): Learned.from_json(item) for dev, item in data.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            log.warning("device=_site learned register sets in %s unreadable (%s): learning again", self.path, err)
            return {}

    def save(self, learned: dict[str, Learned]) -> None:
        self.stage(learned)
        self.flush()

    def stage(self, learned: dict[str, Learned]) -> None:
        """Take the newest register sets (on the event loop, in the order they were learned)."""
        body = json.dumps({dev: item.to_json() for dev, item in sorted(learned.items())}, indent=1)
        with self._lock:
            self._staged = (self._staged[0] + 1, body)

    def flush(self) -> None:
        """Write the newest staged sets, unless a flush already did (on an executor thread)."""
        with self._lock:
            generation, body = self._staged
            if generation > self._written:
                self._write(self.path.with_name(self.path.name + ".tmp"), body)
                self._written = generation

    def _write(self, tmp: Path, body: str) -> None:
        try:
            with private.open_text(tmp) as fh:
                fh.write(body)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as err:
            log.warning("device=_site cannot save learned register sets to %s: %s", self.path, err)
