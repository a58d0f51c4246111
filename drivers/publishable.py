"""Decoded values as the county center receives them: meter signs corrected, strict JSON.

Every reading passes through :func:`published_values` between decoding and the buffer.
"""

from __future__ import annotations

import math

from drivers.decode import decode_blocks
from drivers.model import Block, Device, Value
from drivers.sign import apply_sign, swap_quality


def published_values(device: Device, blocks: list[Block],
                     registers: dict[int, list[int]]) -> tuple[dict[str, Value], list[str]]:
    """Decoded values as the center receives them: meter signs corrected, strict JSON."""
    values, quality = decode_blocks(blocks, registers)
    values, quality = apply_sign(values, device), swap_quality(quality, device)
    return finite_only(values, quality)


def finite_only(values: dict[str, Value], quality: list[str]) -> tuple[dict[str, Value], list[str]]:
    """NaN and ±Infinity are not JSON: a strict parser at the center would refuse the whole batch.
    Such a point is left out and flagged `invalid:<key>` (Contract 2)."""
    bad = [k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return values, quality
    return ({k: v for k, v in values.items() if k not in bad},
            quality + [f"invalid:{k}" for k in bad if f"invalid:{k}" not in quality])
