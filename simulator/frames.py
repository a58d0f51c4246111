"""Broken frames on purpose: what a sick unit, a bad cable or a second master puts on the line.

Each frame fault takes the good reply the unit would send and returns the bytes it sends
instead. Whatever is re-framed goes through pymodbus's own framer (`encode` adds the RTU CRC or
the MBAP header), so a "valid CRC on garbage" frame carries exactly the CRC a client checks.

Kinds (FRAME_KINDS), both for RTU and for Modbus TCP unless said:

noise            random bytes instead of a reply
truncated        the reply cut short; the rest never comes
overlong         the reply followed by stray bytes
wrong-unit       a well-formed reply carrying another unit id
wrong-function   a well-formed reply with another function code of the same layout (3<->4, 1<->2)
byte-count       the byte-count field disagrees with the data that follows (framing otherwise valid)
junk             a well-formed reply, right length, random register values: only plausibility catches it
wrong-length     a well-formed reply with more or fewer registers than asked
wrong-tid        (Modbus TCP) a reply with another transaction id; on RTU the reply is unchanged
mbap-length      (Modbus TCP) an MBAP length field that lies; on RTU the reply is unchanged
babble           (not a reply fault) the unit also sends frames when nobody asked it (see Bus.babble)
"""

from __future__ import annotations

import random

from pymodbus.framer import FramerRTU, FramerSocket
from pymodbus.framer.base import FramerBase
from pymodbus.pdu import ModbusPDU
from pymodbus.pdu.register_message import ReadHoldingRegistersRequest

FRAME_KINDS = ("noise", "truncated", "overlong", "wrong-unit", "wrong-function", "byte-count", "junk",
               "wrong-length", "wrong-tid", "mbap-length", "babble")
# Function codes with the same response layout: a swap decodes cleanly, only the code is wrong.
_SWAP_FC = {1: 2, 2: 1, 3: 4, 4: 3}
# Unit ids the second master asks for: nobody on a simulated bus answers them.
SECOND_MASTER_UNITS = range(200, 248)


def mangle(kind: str, response: ModbusPDU, framer: FramerBase, rng: random.Random) -> bytes:
    """The bytes a unit with frame fault `kind` sends instead of `response`."""
    frame = framer.buildFrame(response)
    fc = response.function_code
    pdu = bytes([fc]) + response.encode()
    unit, tid = response.dev_id, response.transaction_id
    is_error = fc & 0x80 != 0
    if kind == "noise":
        return rng.randbytes(rng.randint(1, 24))
    if kind == "truncated":
        return frame[:rng.randint(1, len(frame) - 1)]
    if kind == "overlong":
        return frame + rng.randbytes(rng.randint(1, 8))
    if kind == "wrong-unit":
        return framer.encode(pdu, rng.choice([u for u in range(1, 248) if u != unit]), tid)
    if kind == "wrong-function" and not is_error and fc in _SWAP_FC:
        return framer.encode(bytes([_SWAP_FC[fc]]) + pdu[1:], unit, tid)
    if kind == "byte-count" and not is_error:
        lie = (pdu[1] + rng.choice([-3, -2, -1, 1, 2, 3, 50])) % 256
        return framer.encode(pdu[:1] + bytes([lie]) + pdu[2:], unit, tid)
    if kind == "junk" and not is_error:
        return framer.encode(pdu[:2] + rng.randbytes(len(pdu) - 2), unit, tid)
    if kind == "wrong-length" and not is_error and fc in (3, 4):
        words = max(0, (len(pdu) - 2) // 2 + rng.choice([-2, -1, 1, 2]))
        data = (pdu[2:] + rng.randbytes(4))[: 2 * words]
        return framer.encode(bytes([fc, len(data)]) + data, unit, tid)
    if isinstance(framer, FramerSocket):
        if kind == "wrong-tid":
            return framer.encode(pdu, unit, (tid + rng.randint(1, 0xFFFE)) % 0x10000)
        if kind == "mbap-length":
            length = int.from_bytes(frame[4:6], "big") + rng.choice([-3, -2, -1, 1, 2, 40])
            return frame[:4] + max(0, length).to_bytes(2, "big") + frame[6:]
    return frame


def stray_reply(unit: int, framer: FramerBase, rng: random.Random) -> bytes:
    """A reply nobody asked for, from `unit`: a well-formed read answer with random registers."""
    words = rng.randint(1, 16)
    fc = rng.choice((3, 4))
    return framer.encode(bytes([fc, 2 * words]) + rng.randbytes(2 * words), unit,
                         rng.randint(1, 0xFFFF) if isinstance(framer, FramerSocket) else 0)


def second_master_request(framer: FramerBase, rng: random.Random) -> bytes:
    """Another master on the line asking a unit that is not ours (an RTU request frame)."""
    request = ReadHoldingRegistersRequest(address=rng.randint(0, 0xFF00), count=rng.randint(1, 60),
                                          dev_id=rng.choice(SECOND_MASTER_UNITS))
    request.transaction_id = rng.randint(1, 0xFFFF) if isinstance(framer, FramerSocket) else 0
    return framer.buildFrame(request)


def crc_ok(frame: bytes) -> bool:
    """Whether an RTU frame's last two bytes are its CRC (for tests and the event log)."""
    return len(frame) >= 4 and FramerRTU.check_CRC(frame[:-2], int.from_bytes(frame[-2:], "big"))
