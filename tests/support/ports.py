"""Free TCP ports on loopback and small helpers to wait for a port to open or free up."""

from __future__ import annotations

import socket
import time

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on ``host`` that was free a moment ago.

    Binds to port 0, reads the kernel-assigned port and closes the socket.
    Note the tiny race: another process may grab the port between our close()
    and the real server's bind(). ``Broker.start`` retries with a fresh port
    when it picked the port itself and the bind fails.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def port_accepts(host: str, port: int, timeout: float = 0.2) -> bool:
    """True if a TCP connect to ``host:port`` succeeds right now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def port_bindable(host: str, port: int) -> bool:
    """True if a listening socket could bind ``host:port`` now.

    Uses SO_REUSEADDR like mosquitto does, so sockets in TIME_WAIT from
    earlier connections do not count as "busy".
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def wait_port_accepts(host: str, port: int, timeout: float) -> bool:
    """Poll until ``host:port`` accepts TCP connections; False on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        if port_accepts(host, port):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def wait_port_bindable(host: str, port: int, timeout: float) -> bool:
    """Poll until ``host:port`` can be bound again; False on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        if port_bindable(host, port):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
