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
from urllib.parse import parse_qs, urlparse

from pymodbus.framer import FramerRTU, FramerSocket
from pymodbus.framer.base import FramerBase
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU
from pymodbus.pdu.bit_message import ReadCoilsResponse, ReadDiscreteInputsResponse
from pymodbus.pdu.register_message import ReadHoldingRegistersResponse, ReadInputRegistersResponse

from drivers.model import Table
from simulator.device import EXC_BUSY, EXC_ILLEGAL_FUNCTION, SimDevice

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
        u = urlparse(url)
        q = {k: v[-1] for k, v in parse_qs(u.query).items()}
        turnaround = float(q.get("turnaround_ms", "5")) / 1000.0
        baud = int(q.get("baudrate", "0"))
        if u.scheme in ("tcp", "rtu-over-tcp"):
            if not u.hostname or not u.port:
                raise ValueError(f"{url}: expected {u.scheme}://HOST:PORT")
            return cls(u.scheme, u.hostname, u.port, baudrate=baud, turnaround_s=turnaround)
        if u.scheme == "rtu":
            if not u.path:
                raise ValueError(f"{url}: expected rtu:///dev/ttyX?baudrate=9600&parity=N")
            return cls("rtu", device=u.path, baudrate=int(q.get("baudrate", "9600")),
                       parity=q.get("parity", "N"), stopbits=int(q.get("stopbits", "1")), turnaround_s=turnaround)
        raise ValueError(f"{url}: scheme must be tcp, rtu-over-tcp or rtu")

    def char_s(self) -> float:
        """Seconds per character on the wire: 11 bits with parity or 2 stop bits, else 10."""
        bits = 11 if (self.parity != "N" or self.stopbits == 2) else 10
        return bits / self.baudrate if self.baudrate else 0.0


class Bus:
    """The units behind one listener, answering one request at a time like a real bus."""

    def __init__(self, listen: Listen, devices: dict[int, SimDevice]) -> None:
        self.listen = listen
        self.devices = devices
        self.lock = asyncio.Lock()
        self.requests = 0

    async def handle(self, pdu: ModbusPDU, received_at: float, request_len: int, framer: FramerBase) -> bytes | None:
        """The bytes to send back for one decoded request, or None for silence."""
        async with self.lock:
            self.requests += 1
            device = self.devices.get(pdu.dev_id)
            if device is None:
                # On a bus nobody answers for an absent unit; over TCP a gateway would say 0x0B.
                return None
            fault = device.fault
            if fault.kind == "silent" or (fault.kind == "intermittent" and device.rng.random() < fault.arg):
                return None
            response = self._respond(pdu, device)
            frame = framer.buildFrame(response)
            if fault.kind == "corrupt":
                frame = frame[:-1] + bytes([frame[-1] ^ 0xFF])
            delay = self.listen.turnaround_s + (fault.arg if fault.kind == "slow" else 0.0)
            wire = (request_len + 3.5 + len(frame)) * self.listen.char_s()
            ready_at = received_at + wire + delay
            wait = ready_at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            return frame

    def _respond(self, pdu: ModbusPDU, device: SimDevice) -> ModbusPDU:
        fc = pdu.function_code
        fault = device.fault
        if fault.kind == "exception":
            return self._exception(pdu, int(fault.arg))
        if fault.kind == "busy" and device.rng.random() < fault.arg:
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


def _framer(kind: str) -> FramerBase:
    return FramerSocket(DecodePDU(True)) if kind == "tcp" else FramerRTU(DecodePDU(True))


class _StreamSession:
    """Bytes in, frames out, for one TCP connection or one serial port."""

    def __init__(self, bus: Bus, send: Callable[[bytes], None]) -> None:
        self.bus = bus
        self.send = send
        self.framer = _framer(bus.listen.kind)
        self.buf = b""
        self.queue: asyncio.Queue[tuple[ModbusPDU, float, int]] = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._serve())

    def feed(self, data: bytes) -> None:
        now = time.monotonic()
        self.buf += data
        while self.buf:
            try:
                used, pdu = self.framer.handleFrame(self.buf, 0, 0)
            except Exception as err:  # undecodable request: drop what we have, like a real device
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
        self.task.cancel()


async def serve_tcp(bus: Bus) -> asyncio.Server:
    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = _StreamSession(bus, writer.write)
        try:
            while data := await reader.read(4096):
                session.feed(data)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            session.close()
            writer.close()

    return await asyncio.start_server(on_client, bus.listen.host, bus.listen.port)


class SerialListener:
    """A serial port (or one side of a socat pty pair) read without blocking the loop."""

    def __init__(self, bus: Bus) -> None:
        import serial

        lst = bus.listen
        self.port = serial.Serial(lst.device, baudrate=lst.baudrate, parity=lst.parity, stopbits=lst.stopbits,
                                  timeout=0, write_timeout=2)
        self.session = _StreamSession(bus, self._write)
        asyncio.get_running_loop().add_reader(self.port.fileno(), self._readable)

    def _write(self, data: bytes) -> None:
        self.port.write(data)

    def _readable(self) -> None:
        try:
            data = os.read(self.port.fileno(), 4096)
        except OSError:
            return
        if data:
            self.session.feed(data)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.port.fileno())
        self.session.close()
        self.port.close()
