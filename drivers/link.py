"""One pymodbus client per physical link, used by exactly one task: one transaction at a time.

The library's own retry and reconnect logic is switched off, because on a shared RS-485 bus it
does the wrong thing: it retries without draining late replies, and it closes a DTU's socket
after a few timeouts of one dead unit, taking every live unit on that bus down with it.

What this module adds on top of pymodbus:

- a per-request timeout that is the device's own thinking time *plus* the time request and
  response take on the wire at the link's baud rate (RTU), so one timeout fits every block size;
- after a timeout or a garbled answer, a quiet gap: the next request waits until the line has
  been silent for `inter_frame` (bytes of a late reply that arrive meanwhile are drained and
  counted), so a late reply is never taken as the answer to the next request (limits.md §3);
- after every good answer on a serial bus, the 3.5-character silence Modbus RTU asks for;
- an answer must be the one asked for: the same function code and the number of registers
  asked (pymodbus checks neither); a frame that passes framing but not decoding (a lying byte
  count) fails the request as a garbled answer instead of the connection, and a frame that
  arrives while nothing was asked (a babbling unit, a second master) also makes the next
  request wait for a quiet line;
- reconnects with exponential backoff, including a first connect that fails, for a serial
  port that vanishes (USB adapter unplugged) and for a TCP peer (DTU) that drops.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.framer import FramerType

from drivers.errors import DeviceError, LinkError
from drivers.model import Link, LinkType, Table

log = logging.getLogger(__name__)

EXC_ILLEGAL_ADDRESS = 2
EXC_BUSY = 6
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 30.0
CONNECT_TIMEOUT_S = 3.0
RECV_BYTES = 4096  # asyncio reads 256 KiB at a time: above glibc's mmap threshold, an mmap per answer
DRAIN_MAX_S = 0.5  # a babbling line (noise, a unit stuck sending) cannot hold the bus longer than gap + this
REQUEST_CHARS = 8  # every read request: unit, function, address, count, CRC
RESPONSE_OVERHEAD_CHARS = 5  # unit, function, byte count, CRC
_FC_BY_TABLE = {Table.COIL: 1, Table.DISCRETE: 2, Table.HOLDING: 3, Table.INPUT: 4}


def char_seconds(baudrate: int, parity: str = "N", stopbits: int = 1, bytesize: int = 8) -> float:
    """Seconds one character takes on the wire: start bit, data bits, parity, stop bits."""
    bits = 1 + bytesize + (0 if parity == "N" else 1) + stopbits
    return bits / baudrate if baudrate > 0 else 0.0


def silence_seconds(baudrate: int, char_s: float) -> float:
    """The RTU inter-frame silence: 3.5 characters, fixed at 1.75 ms above 19200 baud."""
    if char_s <= 0:
        return 0.0
    return 3.5 * char_s if baudrate <= 19200 else 0.00175


def data_chars(table: Table, count: int) -> int:
    """Bytes of register (or bit) data in a read response."""
    return (count + 7) // 8 if table.is_bit else 2 * count


@dataclass
class LinkStats:
    transactions: int = 0
    errors: int = 0
    timeouts: int = 0
    response_s_total: float = 0.0
    reconnects: int = 0
    late_frames: int = 0  # receptions while no request was waiting: late replies, noise
    drain_s_total: float = 0.0  # time spent waiting for a quiet line after timeouts

    @property
    def mean_response_ms(self) -> float:
        ok = self.transactions - self.errors - self.timeouts
        return 1000.0 * self.response_s_total / ok if ok > 0 else 0.0


class LinkClient:
    """The Modbus client of one link with our own timeouts, gaps and reconnect backoff."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.stats = LinkStats()
        self._client: AsyncModbusTcpClient | AsyncModbusSerialClient | None = None
        self._next_connect = 0.0
        self._delay = RECONNECT_MIN_S
        self._connected_once = False
        self._down_logged = False
        self._lock = asyncio.Lock()
        self._waiting = False  # a request is on the line and its answer not yet in
        self._last_rx = 0.0
        self._dirty_since: float | None = None  # a timeout or garbage: drain before the next request
        self._quiet_until = 0.0
        self._garbled = False  # the pending answer failed PDU decoding
        if link.serial is not None:
            s = link.serial
            self.char_s = char_seconds(s.baudrate, s.parity, s.stopbits, s.bytesize)
            self.silence_s = silence_seconds(s.baudrate, self.char_s)
        else:
            self.char_s = 0.0
            self.silence_s = 0.0

    # -- timing ------------------------------------------------------------------------------

    def wire_seconds(self, table: Table, count: int) -> float:
        """Request plus response of one read on the wire (0 where the baud rate is unknown)."""
        chars = REQUEST_CHARS + RESPONSE_OVERHEAD_CHARS + data_chars(table, count)
        return chars * self.char_s + self.silence_s

    @property
    def gap_s(self) -> float:
        """Silence required after a timeout before the next request."""
        return max(self.link.inter_frame_s, self.silence_s)

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        if not sending:
            self._last_rx = time.monotonic()
            if not self._waiting:
                self.stats.late_frames += 1
                # A frame nobody asked for (a babbling unit, a second master): the next request
                # waits for a quiet line, so the rest of it cannot become that request's answer.
                if self._dirty_since is None:
                    self._dirty_since = self._last_rx
        return data

    def _guard_decoding(self, client: AsyncModbusTcpClient | AsyncModbusSerialClient) -> None:
        """pymodbus raises out of its data_received when a frame passes framing but not PDU
        decoding (a byte count that lies): on TCP asyncio then closes the socket, taking every
        unit of the link down, and logs a traceback. Such bytes are garbage on the line: drop
        them and fail the pending request at once as a garbled answer."""
        ctx = client.ctx
        decode = ctx.callback_data

        def guarded(data: bytes, addr: tuple[str, int] | None = None) -> int:
            try:
                used: int = decode(data, addr)
            except ModbusException as err:
                self._garbled = True
                if not ctx.response_future.done():
                    ctx.response_future.set_exception(ModbusIOException(f"undecodable answer: {err}"))
                return len(data)
            return used

        ctx.callback_data = guarded  # type: ignore[method-assign]

    # -- connection --------------------------------------------------------------------------

    def _make_client(self) -> AsyncModbusTcpClient | AsyncModbusSerialClient:
        link = self.link
        connect_timeout = max(link.timeout, CONNECT_TIMEOUT_S)
        if link.type is LinkType.RTU:
            assert link.serial is not None
            s = link.serial
            client: AsyncModbusTcpClient | AsyncModbusSerialClient = AsyncModbusSerialClient(
                s.port, framer=FramerType.RTU, baudrate=s.baudrate, parity=s.parity,
                stopbits=s.stopbits, bytesize=s.bytesize, timeout=connect_timeout, retries=0,
                reconnect_delay=0, reconnect_delay_max=0, trace_packet=self._trace_packet,
            )
        else:
            framer = FramerType.RTU if link.type is LinkType.RTU_OVER_TCP else FramerType.SOCKET
            client = AsyncModbusTcpClient(
                link.host, port=link.port, framer=framer, timeout=connect_timeout, retries=0,
                reconnect_delay=0, reconnect_delay_max=0, trace_packet=self._trace_packet,
            )
        # We decide when a link is broken, not the count of one dead unit's timeouts.
        client.set_max_no_responses(1 << 30)
        self._guard_decoding(client)
        return client

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    async def connect(self) -> None:
        """Connect unless connected; raises LinkError, and backs off the next attempt."""
        if self.connected:
            return
        now = time.monotonic()
        if now < self._next_connect:
            raise LinkError(f"link {self.link.id}: {self.link.endpoint} unavailable, "
                            f"next try in {self._next_connect - now:.1f}s")
        self.close()
        self._client = self._make_client()
        try:
            ok = await self._client.connect()
        except (OSError, ModbusException) as err:
            ok = False
            log.debug("link=%s connect error: %s", self.link.id, err)
        if not ok:
            self._client.close()
            self._client = None
            self._next_connect = time.monotonic() + self._delay * random.uniform(0.8, 1.2)
            delay, self._delay = self._delay, min(self._delay * 2, RECONNECT_MAX_S)
            if not self._down_logged:  # once per outage; the devices' own lines say the rest
                self._down_logged = True
                log.warning("link=%s cannot open %s; retrying with backoff up to %gs",
                            self.link.id, self.link.endpoint, RECONNECT_MAX_S)
            raise LinkError(f"link {self.link.id}: cannot open {self.link.endpoint} (next try in {delay:.1f}s)")
        if self._connected_once:
            self.stats.reconnects += 1
            log.warning("link=%s %s open again", self.link.id, self.link.endpoint)
        self._connected_once = True
        self._down_logged = False
        transport = getattr(self._client.ctx, "transport", None)
        if transport is not None and hasattr(transport, "max_size"):  # asyncio's socket transports
            transport.max_size = RECV_BYTES  # a Modbus answer is at most 260 bytes
        self._delay = RECONNECT_MIN_S
        self._next_connect = 0.0
        # Whatever was on the line before we listened is not an answer to anything.
        self._dirty_since = time.monotonic()

    def _lost(self, why: str) -> None:
        log.warning("link=%s %s lost: %s; reopening with backoff", self.link.id, self.link.endpoint, why)
        self._down_logged = True
        self.close()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- transactions ------------------------------------------------------------------------

    async def read(self, table: Table, address: int, count: int, unit: int, timeout: float) -> list[int]:
        """One read transaction; registers (or bits as 0/1). Raises DeviceError or LinkError.

        `timeout` is how long the device may take to start answering; the wire time of request
        and response at the link's baud rate is added to it.
        """
        async with self._lock:  # one transaction in flight per link, whoever asks
            return await self._read(table, address, count, unit, timeout)

    async def _read(self, table: Table, address: int, count: int, unit: int, timeout: float) -> list[int]:
        await self.connect()
        await self._respect_quiet()
        client = self._client
        if client is None or not client.connected:  # the line dropped while we waited for silence
            self._lost("closed while idle")
            raise LinkError(f"link {self.link.id}: connection lost")
        client.ctx.comm_params.timeout_connect = timeout + self.wire_seconds(table, count)
        self.stats.transactions += 1
        started = time.monotonic()
        self._waiting = True
        self._garbled = False
        try:
            if table is Table.HOLDING:
                rr = await client.read_holding_registers(address, count=count, device_id=unit)
            elif table is Table.INPUT:
                rr = await client.read_input_registers(address, count=count, device_id=unit)
            elif table is Table.COIL:
                rr = await client.read_coils(address, count=count, device_id=unit)
            else:
                rr = await client.read_discrete_inputs(address, count=count, device_id=unit)
        except ConnectionException as err:
            self.stats.errors += 1
            self._lost(str(err))
            raise LinkError(f"link {self.link.id}: connection lost ({err})") from err
        except ModbusIOException as err:
            if self._garbled:
                self.stats.errors += 1
                self._spoiled(timed_out=False)
                raise DeviceError(f"unit {unit}: garbled answer ({err})") from err
            # No (matching) answer in time: pymodbus also raises this for a frame of another unit.
            self._spoiled(timed_out=True)
            if not self.connected:
                self._lost("closed during the request")
                raise LinkError(f"link {self.link.id}: connection lost") from err
            raise DeviceError(f"no answer from unit {unit} within {timeout:g}s") from err
        except ModbusException as err:
            self.stats.errors += 1
            self._spoiled(timed_out=False)
            raise DeviceError(f"unit {unit}: {err}") from err
        except OSError as err:
            self.stats.errors += 1
            self._lost(str(err))
            raise LinkError(f"link {self.link.id}: {err}") from err
        except asyncio.CancelledError:
            self._spoiled(timed_out=False)
            raise
        finally:
            self._waiting = False
        self._answered()
        return self._checked(rr, table, count, unit, started)

    def _checked(self, rr: Any, table: Table, count: int, unit: int, started: float) -> list[int]:
        """The registers (bits as 0/1) of an answer that is what was asked; else DeviceError."""
        if rr.isError():
            self.stats.errors += 1
            code = getattr(rr, "exception_code", None)
            raise DeviceError(f"unit {unit}: Modbus exception {code}", exception_code=code)
        self.stats.response_s_total += time.monotonic() - started
        fc = _FC_BY_TABLE[table]
        if rr.function_code != fc:
            # pymodbus takes any response of the asking unit: an input-register answer to a
            # holding-register read has the same layout and would decode as the wrong registers.
            self.stats.errors += 1
            self._spoiled(timed_out=False)
            raise DeviceError(f"unit {unit}: answered function {rr.function_code} to a function {fc} read")
        got = len(rr.bits) if table.is_bit else len(rr.registers)
        if got < count if table.is_bit else got != count:  # bits come padded to whole bytes
            self.stats.errors += 1
            self._spoiled(timed_out=False)
            raise DeviceError(f"unit {unit}: asked {count} {'bits' if table.is_bit else 'registers'}, got {got}")
        if table.is_bit:
            return [int(b) for b in rr.bits[:count]]
        return list(rr.registers)

    def _answered(self) -> None:
        # Modbus RTU: 3.5 characters of silence after a frame before the next one may start.
        self._quiet_until = max(self._last_rx, time.monotonic()) + self.silence_s

    def _spoiled(self, *, timed_out: bool) -> None:
        if timed_out:
            self.stats.timeouts += 1
        # A reply that arrives now belongs to the request that failed: the next request waits
        # until the line is quiet, and whatever arrived meanwhile is thrown away.
        self._dirty_since = time.monotonic()

    async def _respect_quiet(self) -> None:
        if self._dirty_since is not None:
            started = time.monotonic()
            gap = self.gap_s
            deadline = self._dirty_since + gap + DRAIN_MAX_S
            while True:
                now = time.monotonic()
                quiet_at = max(self._dirty_since, self._last_rx) + gap
                if now >= quiet_at or now >= deadline:
                    break
                await asyncio.sleep(min(quiet_at, deadline) - now)
            self._dirty_since = None
            self.stats.drain_s_total += time.monotonic() - started
        else:
            wait = self._quiet_until - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        if self._client is not None:
            # Bytes that straggled in must not prefix the next reply.
            self._client.ctx.recv_buffer = b""
