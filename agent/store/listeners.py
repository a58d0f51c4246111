"""Who the buffer tells of new rows: the publisher sleeps until then instead of polling the file."""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


class Listeners:
    """listener("records") after every commit that added rows, listener("identity") after a
    nameplate was stored; called on the writing thread, outside the buffer's lock."""

    def __init__(self) -> None:
        self._listeners: list[Callable[[str], None]] = []

    def add_listener(self, listener: Callable[[str], None]) -> None:
        self._listeners = [*self._listeners, listener]

    def remove_listener(self, listener: Callable[[str], None]) -> None:
        self._listeners = [f for f in self._listeners if f != listener]

    def _tell(self, what: str) -> None:
        for listener in self._listeners:
            try:
                listener(what)
            except Exception:  # a listener must never fail a write that is already committed
                log.exception("device=_site buffer listener failed")

