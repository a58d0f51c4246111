"""Modbus listeners of the simulator: TCP, RTU over TCP, and RTU on a serial port or pty.

pymodbus does the framing and CRC (its framers and PDU classes); this module owns the transport
loop, because a bus simulator must do what pymodbus's server cannot: stay silent like a dead
unit, answer late or with a broken CRC, and hold a reply back until the wire at the configured
baud rate could have carried request and reply (limits.md §1).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlparse

from pymodbus.framer import FramerRTU, FramerSocket
from pymodbus.framer.base import FramerBase
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU
from pymodbus.pdu.bit_message import ReadCoilsResponse, ReadDiscreteInputsResponse
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersResponse,
    ReadInputRegistersResponse,
)

from drivers.link import char_seconds
from drivers.model import Table
from simulator.device import EXC_BUSY, EXC_ILLEGAL_FUNCTION, SimDevice
from simulator.frames import mangle

log = logging.getLogger(__name__)

_TABLE_BY_FC = {1: Table.COIL, 2: Table.DISCRETE, 3: Table.HOLDING, 4: Table.INPUT}
_RESPONSE_BY_FC: dict[int, Callable[..., ModbusPDU]] = {
    1: ReadCoilsResponse, 2: ReadDiscreteInputsResponse,
    3: ReadHoldingRegistersResponse, 4: ReadInputRegistersResponse,
}


@dataclass(frozen=True)
class Listen:
    """A parsed --listen URL."""

    kind: str  # tcp | rtu-over-tcp | rtu
    host: str = "127.0.0.1"
    port: int = 502
    device: str = ""
    baudrate: int = 0  # 0: no wire-timing emulation
    parity: str = "N"
    stopbits: int = 1
    turnaround_s: float = 0.005

    @classmethod
    def parse(cls, url: str) -> Listen:
        """tcp://HOST:PORT, rtu-over-tcp://HOST:PORT[?baudrate=9600...] or rtu:///dev/ttyX?baudrate=9600&parity=N.

        Query: baudrate (rtu: default 9600; over TCP: 0 = no wire timing, else the DTU's serial
        side), parity N|E|O, stopbits 1|2, turnaround_ms (how long a unit thinks, default 5).
        """
        u = urlparse(url)
        q = {k: v[-1] for k, v in parse_qs(u.query).items()}
        unknown = set(q) - {"baudrate", "parity", "stopbits", "turnaround_ms"}
        if unknown:
            raise ValueError(f"{url}: unknown option {', '.join(sorted(unknown))}; "
                             "known: baudrate, parity, stopbits, turnaround_ms")
        try:
            turnaround = float(q.get("turnaround_ms", "5")) / 1000.0
            baud = int(q.get("baudrate", "9600" if u.scheme == "rtu" else "0"))
            stopbits = int(q.get("stopbits", "1"))
        except ValueError:
            raise ValueError(f"{url}: baudrate, stopbits and turnaround_ms must be numbers") from None
        parity = q.get("parity", "N").upper()
        if parity not in ("N", "E", "O") or stopbits not in (1, 2) or baud < 0 or turnaround < 0:
            raise ValueError(f"{url}: expected parity N, E or O, stopbits 1 or 2, baudrate and turnaround_ms >= 0")
        if u.scheme in ("tcp", "rtu-over-tcp"):
            if not u.hostname or not u.port:
                raise ValueError(f"{url}: expected {u.scheme}://HOST:PORT")
            return cls(u.scheme, u.hostname, u.port, baudrate=baud, parity=parity, stopbits=stopbits,
                       turnaround_s=turnaround)
        if u.scheme == "rtu":
            if not u.path:
                raise ValueError(f"{url}: expected rtu:///dev/ttyX?baudrate=9600&parity=N")
            return cls("rtu", device=u.path, baudrate=baud or 9600, parity=parity, stopbits=stopbits,
                       turnaround_s=turnaround)
        raise ValueError(f"{url}: scheme must be tcp, rtu-over-tcp or rtu")

    def char_s(self) -> float:
        """Seconds per character on the wire (8 data bits): 11 with parity or 2 stop bits, else 10."""
        return char_seconds(self.baudrate, self.parity, self.stopbits) if self.baudrate else 0.0


class Bus:
    """The units behind one listener, answering one request at a time like a real bus.

    With a baud rate the wire is emulated: a request occupies the bus for its own length plus
    3.5 characters of silence, the unit thinks for its turnaround, its response occupies the
    bus for its length, and the bus is free again 3.5 characters later. A response is not sent
    before that time, and a request that arrives while the bus is still busy waits for it.
    """

    def __init__(self, listen: Listen, devices: dict[int, SimDevice]) -> None:
        self.listen = listen
        self.devices = devices
        self.lock = asyncio.Lock()
        self.requests = 0
        self.free_at = 0.0  # monotonic time at which the emulated wire is idle again
        self.clients: set[asyncio.StreamWriter] = set()  # TCP connections (a DTU's, a gateway's)
        self.sessions: set[_StreamSession] = set()  # where unsolicited frames go (chaos: babble)
        self.on_chaos: Callable[[dict[str, Any]], None] | None = None  # each frame fault, as it strikes

    def drop_clients(self) -> int:
        """Close every TCP connection, like a DTU that reboots or a 4G link that drops."""
        n = len(self.clients)
        for writer in list(self.clients):
            writer.close()
        self.clients.clear()
        return n

    async def handle(self, pdu: ModbusPDU, received_at: float, request_len: int, framer: FramerBase) -> bytes | None:
        """The bytes to send back for one decoded request, or None for silence."""
        async with self.lock:
            self.requests += 1
            char_s = self.listen.char_s()
            start = max(received_at, self.free_at)
            request_done = start + (request_len + 3.5) * char_s
            self.free_at = request_done
            device = self.devices.get(pdu.dev_id)
            if device is None:
                # On a bus nobody answers for an absent unit; over TCP a gateway would say 0x0B.
                return None
            device.requests += 1
            if device.asleep():
                return None  # an inverter asleep for the night: its interface is off
            fault = device.fault
            if fault.kind in ("silent", "intermittent") and fault.strikes(device.rng):
                return None
            response = self._respond(pdu, device)
            frame = framer.buildFrame(response)
            if fault.kind == "corrupt" and fault.strikes(device.rng):
                frame = frame[:-1] + bytes([frame[-1] ^ 0xFF])
            elif fault.kind in _REPLY_FRAME_FAULTS and fault.strikes(device.rng):
                broken = mangle(fault.kind, response, framer, device.rng)
                if broken != frame:  # an MBAP fault on RTU, or a layout fault on an exception, changes nothing
                    frame = broken
                    self.chaos_event(pdu.dev_id, fault.kind, frame)
            turnaround = device.turnaround_s if device.turnaround_s is not None else self.listen.turnaround_s
            if fault.kind == "slow" and fault.strikes(device.rng):
                turnaround += fault.arg
            ready_at = request_done + turnaround + len(frame) * char_s
            self.free_at = ready_at + 3.5 * char_s
            wait = ready_at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            return frame

    def chaos_event(self, unit: int, kind: str, frame: bytes) -> None:
        if self.on_chaos is not None:
            self.on_chaos({"event": "chaos-frame", "t": round(time.time(), 3), "listen": self.listen.kind,
                           "unit": unit, "fault": kind, "frame": frame.hex()})

    def framer(self) -> FramerBase:
        return _framer(self.listen.kind)

    def idle(self) -> bool:
        """Nobody is talking and no request waits: the moment a babbling unit or a second master speaks."""
        return (not self.lock.locked() and time.monotonic() >= self.free_at
                and all(s.queue.empty() and not s.buf for s in self.sessions))

    def unsolicited(self, frame: bytes) -> None:
        """Put a frame on the line that answers no request; it holds the emulated wire like any other."""
        self.free_at = time.monotonic() + (len(frame) + 3.5) * self.listen.char_s()
        for session in list(self.sessions):
            session.send(frame)

    def _respond(self, pdu: ModbusPDU, device: SimDevice) -> ModbusPDU:
        fc = pdu.function_code
        fault = device.fault
        if fault.kind == "exception" and fault.strikes(device.rng):
            return self._exception(pdu, int(fault.arg))
        if fault.kind == "busy" and fault.strikes(device.rng):
            return self._exception(pdu, EXC_BUSY)
        table = _TABLE_BY_FC.get(fc)
        if table is None:
            return self._exception(pdu, EXC_ILLEGAL_FUNCTION)
        result = device.read(table, pdu.address, pdu.count)
        if isinstance(result, int):
            return self._exception(pdu, result)
        if table.is_bit:
            response = _RESPONSE_BY_FC[fc](bits=[bool(b) for b in result], dev_id=pdu.dev_id,
                                           transaction_id=pdu.transaction_id)
        else:
            response = _RESPONSE_BY_FC[fc](registers=result, dev_id=pdu.dev_id, transaction_id=pdu.transaction_id)
        return response

    @staticmethod
    def _exception(pdu: ModbusPDU, code: int) -> ModbusPDU:
        return ExceptionResponse(pdu.function_code, code, device_id=pdu.dev_id, transaction=pdu.transaction_id)


_REPLY_FRAME_FAULTS = frozenset(("noise", "truncated", "overlong", "wrong-unit", "wrong-function", "byte-count",
                                 "junk", "wrong-length", "wrong-tid", "mbap-length"))


def _framer(kind: str) -> FramerBase:
    return FramerSocket(DecodePDU(True)) if kind == "tcp" else FramerRTU(DecodePDU(True))


class _StreamSession:
    """Bytes in, frames out, for one TCP connection or one serial port."""

    def __init__(self, bus: Bus, send: Callable[[bytes], None]) -> None:
        self.bus = bus
        self.send = send
        self.framer = _framer(bus.listen.kind)
        self.buf = b""
        self.last_rx = 0.0
        # RTU frames are delimited by silence: a partial frame older than this is line noise.
        self.stale_s = max(3.5 * bus.listen.char_s(), 0.05) if bus.listen.kind != "tcp" else 0.0
        self.queue: asyncio.Queue[tuple[ModbusPDU, float, int]] = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._serve())
        bus.sessions.add(self)

    def feed(self, data: bytes) -> None:
        now = time.monotonic()
        if self.stale_s and self.buf and now - self.last_rx > self.stale_s:
            log.debug("dropping a partial request %s", self.buf.hex())
            self.buf = b""
        self.last_rx = now
        self.buf += data
        while self.buf:
            try:
                used, pdu = self.framer.handleFrame(self.buf, 0, 0)
            except Exception as err:  # noqa: BLE001 - undecodable request: drop what we have, like a real device
                log.debug("undecodable request %s: %s", self.buf.hex(), err)
                self.buf = b""
                return
            if not used:
                return
            frame_len = used
            self.buf = self.buf[used:]
            if pdu is not None:
                self.queue.put_nowait((pdu, now, frame_len))

    async def _serve(self) -> None:
        while True:
            pdu, received_at, frame_len = await self.queue.get()
            try:
                reply = await self.bus.handle(pdu, received_at, frame_len, self.framer)
            except Exception:  # one bad request must not end the listener
                log.exception("unit %s: request failed", pdu.dev_id)
                continue
            if reply is not None:
                self.send(reply)

    def close(self) -> None:
        self.bus.sessions.discard(self)
        self.task.cancel()


async def serve_tcp(bus: Bus) -> asyncio.Server:
    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = _StreamSession(bus, writer.write)
        bus.clients.add(writer)
        try:
            while data := await reader.read(4096):
                session.feed(data)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            bus.clients.discard(writer)
            session.close()
            writer.close()

    return await asyncio.start_server(on_client, bus.listen.host, bus.listen.port)


class SerialListener:
    """A serial port (or one side of a socat pty pair) read without blocking the loop.

    If the port goes away (USB adapter unplugged, socat restarted) the listener closes it and
    tries to open it again every half second, like a device that waits for its bus.
    """

    REOPEN_S = 0.5

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.loop = asyncio.get_running_loop()
        self.port: Any = None
        self.session = _StreamSession(bus, self._write)
        self._reopen: asyncio.TimerHandle | None = None
        self._closed = False
        self._open()

    def _open(self) -> None:
        import serial

        lst = self.bus.listen
        self.port = serial.Serial(lst.device, baudrate=lst.baudrate, parity=lst.parity, stopbits=lst.stopbits,
                                  timeout=0, write_timeout=2)
        self.session.buf = b""
        self.loop.add_reader(self.port.fileno(), self._readable)

    def _write(self, data: bytes) -> None:
        if self.port is None:
            return  # the port is gone: the answer is lost on the wire, as on a real bus
        try:
            self.port.write(data)
        except (OSError, ValueError) as err:
            self._lost(err)

    def _readable(self) -> None:
        try:
            data = os.read(self.port.fileno(), 4096)
        except OSError as err:
            self._lost(err)
            return
        if not data:
            self._lost(EOFError("end of file"))
            return
        self.session.feed(data)

    def _lost(self, err: BaseException) -> None:
        if self.port is None:
            return
        log.warning("serial port %s lost (%s): reopening every %gs", self.bus.listen.device, err, self.REOPEN_S)
        self.loop.remove_reader(self.port.fileno())
        try:
            self.port.close()
        except OSError:
            pass
        self.port = None
        self._schedule_reopen()

    def _schedule_reopen(self) -> None:
        if not self._closed:
            self._reopen = self.loop.call_later(self.REOPEN_S, self._try_reopen)

    def _try_reopen(self) -> None:
        try:
            self._open()
        except (OSError, ValueError):
            self._schedule_reopen()
            return
        log.warning("serial port %s open again", self.bus.listen.device)

    def close(self) -> None:
        self._closed = True
        if self._reopen is not None:
            self._reopen.cancel()
        self.session.close()
        if self.port is not None:
            self.loop.remove_reader(self.port.fileno())
            self.port.close()
            self.port = None
