"""Drives paho's socket for the publisher thread, by readiness: nothing runs without work.

The publisher used to call paho's loop() every 20 ms: an idle agent woke 50 times a second to
poll its socket, the buffer and the clock. Now its thread sleeps in one select() on the broker's
socket and a wake-up socket pair until one of them is ready or the earliest deadline it was
given comes (keepalive, health, a retry). Other threads that have work for it (the buffer
writer's commit, a command's reply, a resend request, stop) call :meth:`Pump.wake`.

paho's own loop() is never called: it would create paho's internal socket pair, and every
publish would then write a byte to it as well. loop_read / loop_write / loop_misc do the work,
on this thread only, so PUBACK callbacks still run where the mid -> seqs bookkeeping is.
"""

from __future__ import annotations

import select
import socket
import threading
from typing import Any

import paho.mqtt.client as mqtt


class Pump:
    """The publisher thread's wait: the broker's socket, a wake-up pair and a timeout."""

    def __init__(self) -> None:
        self._wake_r, self._wake_w = socket.socketpair()  # open from the start: wake() may come first
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._woken = threading.Event()
        self.waiting = False  # True while blocked in select(): an idle thread, not a wedged one
        self.wakeups = 0  # select() returns: what tests count to prove an idle agent sleeps
        self.reads = 0

    def wake(self) -> None:
        """Thread-safe; a wake-up that is already pending costs no system call."""
        if self._woken.is_set():
            return
        self._woken.set()
        try:
            self._wake_w.send(b"w")
        except (BlockingIOError, OSError):
            pass  # full (a wake-up is pending anyway) or closed (stopping)

    def close(self) -> None:
        for s in (self._wake_r, self._wake_w):
            try:
                s.close()
            except OSError:
                pass

    def run(self, client: mqtt.Client | None, timeout: float) -> None:
        """Wait up to timeout for the broker or a wake-up, then let paho read, write and keep alive."""
        sock = client.socket() if client is not None else None
        rlist: list[Any] = [self._wake_r]
        wlist: list[Any] = []
        pending = 0
        if client is not None and sock is not None:
            rlist.append(sock)
            if client.want_write():
                wlist.append(sock)
            has_pending = getattr(sock, "pending", None)  # TLS: bytes already decrypted
            pending = has_pending() if callable(has_pending) else 0
        # A wake-up may be pending with its byte already read: a wake() that set the flag after
        # _drain() cleared it, and sent its byte before _drain() finished reading. The flag, not
        # the byte, is what counts; waiting on the byte alone lost that wake-up, and every later
        # one (the flag stayed set): live data then waited for the keepalive deadline.
        woken = self._woken.is_set()
        self.waiting = True
        try:
            readable, writable, _ = select.select(rlist, wlist, [], 0.0 if pending or woken else max(0.0, timeout))
        except (OSError, ValueError):  # the socket was closed under us: paho notices below
            readable, writable = [], []
        finally:
            self.waiting = False
        self.wakeups += 1
        if woken or self._wake_r in readable:
            self._drain()
        if client is None or sock is None or client.socket() is not sock:
            return
        if sock in readable or pending:
            self.reads += 1
            client.loop_read()
            quickack(client)
        if client.socket() is sock and (sock in writable or client.want_write()):
            client.loop_write()
        if client.socket() is sock:
            client.loop_misc()

    def _drain(self) -> None:
        self._woken.clear()  # before reading: a wake() from now on is seen by the next select()
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass


def keepalive_due(client: mqtt.Client, keepalive: float, now: float) -> float:
    """When paho's loop_misc() next has something to do (send PINGREQ, or give up on PINGRESP).
    paho keeps these times privately: without them, a quarter keepalive is early enough."""
    last_out = getattr(client, "_last_msg_out", None)
    last_in = getattr(client, "_last_msg_in", None)
    ping_t = getattr(client, "_ping_t", 0)
    if not isinstance(last_out, float) or not isinstance(last_in, float):
        return now + keepalive / 4
    due = min(last_out, last_in) + keepalive
    if isinstance(ping_t, (int, float)) and ping_t > 0:
        due = min(due, ping_t + keepalive)
    return max(now, due) + 0.01


def quickack(client: mqtt.Client) -> None:
    """Acknowledge TCP segments at once. mosquitto leaves Nagle on (set_tcp_nodelay false), so
    its second PUBACK in a row waits for our TCP ACK, which Linux delays by up to 40 ms: every
    PUBACK that waits is a duplicate if the agent dies meanwhile. Quick-ack mode lapses, so it
    is set again after every read (not on a timer)."""
    sock = client.socket()
    if isinstance(sock, socket.socket) and hasattr(socket, "TCP_QUICKACK"):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        except OSError:
            pass
