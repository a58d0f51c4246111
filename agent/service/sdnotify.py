"""systemd service notification (``sd_notify``) and a progress-gated watchdog.

pvgate runs as a ``Type=notify`` unit with ``WatchdogSec=``. This module speaks the
notify protocol with the standard library only: one AF_UNIX datagram per message to
``$NOTIFY_SOCKET``. When pvgate is not started by systemd (no ``NOTIFY_SOCKET``) every
call is a cheap no-op, so callers never need to branch on "am I under systemd?".

:class:`ProgressWatchdog` decides *whether* to ping: it pings only while every
registered loop (polling, publishing, ...) has made progress recently. A wedged loop
therefore stops the pings and systemd restarts the service, whereas a ping timer
that merely proves the process is alive would keep a half-dead agent running forever.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

__all__ = ["ProgressWatchdog", "SdNotifier"]

log = logging.getLogger(__name__)

ProgressProbe = Callable[[], float]


def _socket_address(raw: str | None) -> str | None:
    """Translate ``$NOTIFY_SOCKET`` into an address ``socket.sendto`` accepts."""
    if not raw:
        return None
    if raw.startswith("@"):
        # Linux abstract namespace: systemd writes it with '@', the kernel wants a NUL.
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    # e.g. "vsock:..." (systemd >= 254, VMs): not something a gateway agent needs.
    log.debug("unsupported NOTIFY_SOCKET address %r: notifications disabled", raw)
    return None


def _parse_watchdog_usec(usec: str | None, pid: str | None) -> int | None:
    """Return the watchdog period meant for this process, or None."""
    if not usec:
        return None
    if pid:
        try:
            if int(pid) != os.getpid():
                # The watchdog belongs to another process (e.g. a wrapper that exec'd
                # us as a child): pinging would be rejected or, worse, hide its hang.
                return None
        except ValueError:
            log.debug("invalid WATCHDOG_PID %r: watchdog disabled", pid)
            return None
    try:
        value = int(usec)
    except ValueError:
        log.debug("invalid WATCHDOG_USEC %r: watchdog disabled", usec)
        return None
    return value if value > 0 else None


class SdNotifier:
    """Sends state notifications to the service manager.

    Safe to use from several threads: each message uses its own short-lived socket,
    as libsystemd's ``sd_notify`` does, so there is no shared state to lock.
    """

    def __init__(
        self,
        address: str | None,
        watchdog_usec: int | None = None,
        send_timeout_s: float = 0.5,
    ) -> None:
        """``address`` is the raw ``$NOTIFY_SOCKET`` value ('@' = abstract name)."""
        self._address = _socket_address(address)
        self._watchdog_usec = watchdog_usec if self._address is not None else None
        # Bounded so a stuck PID 1 cannot stall an asyncio loop that calls us; a lost
        # ping is exactly the situation the watchdog exists to handle.
        self._send_timeout_s = send_timeout_s

    @classmethod
    def from_env(cls) -> SdNotifier:
        """Build a notifier from the variables systemd puts in the environment."""
        return cls(
            os.environ.get("NOTIFY_SOCKET"),
            _parse_watchdog_usec(
                os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
            ),
        )

    @property
    def enabled(self) -> bool:
        """True when a notify socket is configured."""
        return self._address is not None

    @property
    def watchdog_enabled(self) -> bool:
        """True when systemd expects WATCHDOG=1 pings from this process."""
        return self._watchdog_usec is not None

    def watchdog_interval_s(self) -> float | None:
        """Recommended ping interval (half the watchdog timeout), None without watchdog."""
        if self._watchdog_usec is None:
            return None
        # Half the timeout, as sd_watchdog_enabled(3) recommends: one late or lost
        # ping must not be enough to get the service killed.
        return self._watchdog_usec / 2 / 1_000_000

    def notify(self, text: str) -> bool:
        """Send one notification (newline-separated ``KEY=value`` lines).

        Returns True when the datagram was handed to the kernel. Never raises on
        socket errors: a notification failure must not take the agent down.
        """
        if self._address is None:
            return False
        try:
            with socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
            ) as sock:
                sock.settimeout(self._send_timeout_s)
                sock.sendto(text.encode("utf-8"), self._address)
        except OSError as exc:
            log.debug("sd_notify %r failed: %s", text.split("\n", 1)[0], exc)
            return False
        return True

    def ready(self) -> bool:
        """Startup (or a reload) is complete: config loaded, buffer open."""
        return self.notify("READY=1")

    def stopping(self) -> bool:
        """Shutdown has begun; systemd then applies TimeoutStopSec instead of the watchdog."""
        return self.notify("STOPPING=1")

    def reloading(self) -> bool:
        """A reload has begun; send :meth:`ready` again once it is done."""
        # MONOTONIC_USEC lets systemd (>= 253, Type=notify-reload) match this message
        # to the reload request; older versions ignore the extra line.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def status(self, text: str) -> bool:
        """Free-form status line shown by ``systemctl status``."""
        # A newline would start a new KEY=value assignment in the protocol.
        one_line = " ".join(text.splitlines())
        return self.notify(f"STATUS={one_line}")

    def watchdog(self) -> bool:
        """Send one keep-alive ping, only if the watchdog is ours to feed."""
        if self._watchdog_usec is None:
            return False
        return self.notify("WATCHDOG=1")


class ProgressWatchdog:
    """Feeds the systemd watchdog only while every monitored loop makes progress.

    Each probe returns the ``time.monotonic()`` of its loop's last progress (e.g. the
    end of the last poll cycle, the last publish attempt). Initialise those timestamps
    to the start time, not 0, or the service looks stalled at startup.
    The caller drives :meth:`tick` (asyncio task, or :meth:`run_in_thread`).
    """

    def __init__(
        self,
        notifier: SdNotifier,
        probes: Mapping[str, ProgressProbe],
        stale_after_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if stale_after_s <= 0:
            raise ValueError("stale_after_s must be positive")
        self._notifier = notifier
        self._probes = dict(probes)
        self._stale_after_s = stale_after_s
        self._clock = clock
        # Remember what was already reported so a stall is logged once, not per tick
        # (a 30 s ping interval would otherwise flood the journal during an outage).
        self._reported_stall: frozenset[str] = frozenset()
        self._lock = threading.Lock()

    @property
    def stalled(self) -> frozenset[str]:
        """Names of the loops found stale by the last :meth:`tick`."""
        with self._lock:
            return self._reported_stall

    def _stale_loops(self, now: float) -> dict[str, float | None]:
        """Map each stale loop to its age in seconds (None if the probe failed)."""
        stale: dict[str, float | None] = {}
        for name, probe in self._probes.items():
            try:
                age = now - probe()
            except Exception:  # noqa: BLE001 - a broken probe is a stall, not a crash
                log.debug("progress probe %r raised", name, exc_info=True)
                stale[name] = None
                continue
            if age > self._stale_after_s:
                stale[name] = age
        return stale

    def tick(self, now: float | None = None) -> bool:
        """Ping the watchdog if all loops progressed recently; return whether it pinged."""
        if now is None:
            now = self._clock()
        stale = self._stale_loops(now)
        with self._lock:
            names = frozenset(stale)
            if names and names != self._reported_stall:
                # New or changed stall: worth one line; an unchanged one is not.
                details = ", ".join(
                    f"{name} (no progress for {age:.0f} s)"
                    if age is not None
                    else f"{name} (probe failed)"
                    for name, age in sorted(stale.items())
                )
                log.warning(
                    "withholding systemd watchdog ping, stalled: %s; "
                    "systemd will restart pvgate if this persists",
                    details,
                )
            elif not names and self._reported_stall:
                log.info(
                    "loops progressing again (%s): watchdog pings resumed",
                    ", ".join(sorted(self._reported_stall)),
                )
            self._reported_stall = names
        if names:
            return False
        return self._notifier.watchdog()

    def run_in_thread(
        self, interval_s: float, stop_event: threading.Event
    ) -> threading.Thread:
        """Tick every ``interval_s`` in a daemon thread until ``stop_event`` is set.

        A thread keeps pinging while an asyncio loop is busy, but only as long as the
        probes show that loop still advancing, so a blocked event loop is still caught.
        """
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")

        def _run() -> None:
            while not stop_event.is_set():
                try:
                    self.tick()
                except Exception:  # noqa: BLE001 - keep the thread; no ping was sent
                    log.exception("watchdog tick failed")
                stop_event.wait(interval_s)

        thread = threading.Thread(target=_run, name="sd-watchdog", daemon=True)
        thread.start()
        return thread
