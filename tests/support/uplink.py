"""A TCP proxy standing in for a station's uplink: rate-limited towards the broker, and able to
hold the station back after a broker restart until the test's subscriber is back."""

from __future__ import annotations

import socket
import threading
import time

from .broker import Broker
from .collector import Collector


class Uplink:
    """A TCP proxy in front of the broker: the station's uplink. It carries at most `rate`
    bytes/s towards the broker (0: unlimited; a slow rural uplink otherwise); the way back is not
    limited. A stopped broker cuts every connection. While `closed()`, connections are refused:
    after a broker restart the test's subscriber is back before the station (as the county
    center's subscribers are) and sees everything the station sends."""

    def __init__(self, target_port: int, rate: int = 0) -> None:
        self.target_port = target_port
        self.rate = rate
        self.open = threading.Event()
        self.open.set()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._socks: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, name="uplink-accept", daemon=True).start()

    def restart_broker(self, broker: Broker, col: Collector, starts: int) -> None:
        """Restart the broker; let the station in once the subscriber has subscribed again."""
        self.open.clear()
        broker.restart()
        col.wait_subscribed(count=starts, timeout=15)
        self.open.set()

    def __enter__(self) -> Uplink:
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed = True
        self._server.close()
        for s in list(self._socks):
            s.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if not self.open.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
            except OSError:
                client.close()
                continue
            self._socks += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, self.rate), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, 0), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, rate: int) -> None:
        tokens, last = 0.0, time.monotonic()
        try:
            while True:
                if rate:
                    now = time.monotonic()
                    tokens = min(rate * 0.05, tokens + (now - last) * rate)
                    last = now
                    if tokens < 512:
                        time.sleep(0.01)
                        continue
                data = src.recv(int(tokens) if rate else 65536)
                if not data:
                    break
                tokens -= len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
