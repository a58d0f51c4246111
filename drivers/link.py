"""One pymodbus client per physical link, used by exactly one task: one transaction at a time.

The library's own retry and reconnect logic is switched off, because on a shared RS-485 bus it
does the wrong thing: it retries without draining late replies, and it closes a DTU's socket
after a few timeouts of one dead unit, taking every live unit on that bus down with it. Here a
timeout is followed by a quiet gap (late replies land in a cancelled future and are discarded),
and reconnects back off exponentially, including a first connect that fails.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

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


@dataclass
class LinkStats:
    transactions: int = 0
    errors: int = 0
    timeouts: int = 0
    response_s_total: float = 0.0
    reconnects: int = 0

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
        self._quiet_until = 0.0
        self._connected_once = False

    def _make_client(self) -> AsyncModbusTcpClient | AsyncModbusSerialClient:
        link = self.link
        if link.type is LinkType.RTU:
            assert link.serial is not None
            s = link.serial
            client: AsyncModbusTcpClient | AsyncModbusSerialClient = AsyncModbusSerialClient(
                s.port, framer=FramerType.RTU, baudrate=s.baudrate, parity=s.parity,
                stopbits=s.stopbits, bytesize=s.bytesize, timeout=link.timeout, retries=0,
                reconnect_delay=0, reconnect_delay_max=0,
            )
        else:
            framer = FramerType.RTU if link.type is LinkType.RTU_OVER_TCP else FramerType.SOCKET
            client = AsyncModbusTcpClient(
                link.host, port=link.port, framer=framer, timeout=link.timeout, retries=0,
                reconnect_delay=0, reconnect_delay_max=0,
            )
        # We decide when a link is broken, not the count of one dead unit's timeouts.
        client.set_max_no_responses(1 << 30)
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
            raise LinkError(f"link {self.link.id}: reconnect in {self._next_connect - now:.1f}s")
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
            raise LinkError(f"link {self.link.id}: cannot open {self.link.endpoint} (next try in {delay:.1f}s)")
        if self._connected_once:
            self.stats.reconnects += 1
        self._connected_once = True
        self._delay = RECONNECT_MIN_S
        self._next_connect = 0.0

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    async def read(self, table: Table, address: int, count: int, unit: int, timeout: float) -> list[int]:
        """One read transaction; registers (or bits as 0/1). Raises DeviceError or LinkError."""
        await self.connect()
        assert self._client is not None
        client = self._client
        await self._respect_quiet()
        client.comm_params.timeout_connect = timeout
        self.stats.transactions += 1
        started = time.monotonic()
        try:
            if table is Table.HOLDING:
                rr = await client.read_holding_registers(address, count=count, device_id=unit)
            elif table is Table.INPUT:
                rr = await client.read_input_registers(address, count=count, device_id=unit)
            elif table is Table.COIL:
                rr = await client.read_coils(address, count=count, device_id=unit)
            else:
                rr = await client.read_discrete_inputs(address, count=count, device_id=unit)
        except ModbusIOException as err:
            self._timed_out()
            raise DeviceError(f"no answer from unit {unit} within {timeout:g}s") from err
        except ConnectionException as err:
            self.stats.errors += 1
            self.close()
            raise LinkError(f"link {self.link.id}: connection lost ({err})") from err
        except ModbusException as err:
            self.stats.errors += 1
            self._quiet_until = time.monotonic() + self.link.inter_frame_s
            raise DeviceError(f"unit {unit}: {err}") from err
        if rr.isError():
            self.stats.errors += 1
            code = getattr(rr, "exception_code", None)
            raise DeviceError(f"unit {unit}: Modbus exception {code}", exception_code=code)
        self.stats.response_s_total += time.monotonic() - started
        if table.is_bit:
            return [int(b) for b in rr.bits[:count]]
        if len(rr.registers) != count:
            self.stats.errors += 1
            raise DeviceError(f"unit {unit}: asked {count} registers, got {len(rr.registers)}")
        return list(rr.registers)

    def _timed_out(self) -> None:
        self.stats.timeouts += 1
        # A reply that arrives now belongs to the request that timed out: stay quiet long
        # enough for it to land (and be discarded) before the next request is sent.
        self._quiet_until = time.monotonic() + max(self.link.inter_frame_s, 0.0)

    async def _respect_quiet(self) -> None:
        wait = self._quiet_until - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        if self._client is not None and self.link.type is not LinkType.TCP:
            # Bytes that straggled in after the last timeout must not prefix the next reply.
            self._client.ctx.recv_buffer = b""
