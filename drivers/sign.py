"""Meter sign correction for a meter installed the other way round (`invert_power`).

Every meter map publishes `ac_power` and the phase powers as positive = export to the grid and
`energy_import` / `energy_export` by their meaning, for a meter wired as its vendor documents.
A meter whose current transformers (or the whole meter) sit the other way round measures the
current reversed: every active and reactive power and every power factor comes out with the
wrong sign, and the meter counts export as import and import as export. `apply_sign` undoes
exactly that, so the published values mean what the canonical keys say.

Voltages, currents (magnitudes), frequency, apparent power and the lifetime yield of an
inverter do not depend on the direction of the current and are left alone.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from drivers.model import Device, Value

# Keys whose sign follows the direction of the measured current.
_SIGNED = re.compile(
    r"(ac_power|reactive_power|power_factor"
    r"|phase_[abc]_(power|reactive_power|power_factor))"
)
# Counter pairs a reversed meter fills the wrong way round.
_SWAPPED = (("energy_import", "energy_export"), ("energy_import_today", "energy_export_today"))


def is_direction_signed(key: str) -> bool:
    """Whether a canonical key changes sign when the measured current is reversed."""
    return _SIGNED.fullmatch(key) is not None


def apply_sign(values: Mapping[str, Value], device_or_flag: Device | bool) -> dict[str, Value]:
    """The values a correctly installed meter would give (a new dict; the input is untouched).

    `device_or_flag` is the Device (its `invert_power` decides) or the flag itself. Without
    inversion the values are returned unchanged. A quality flag naming a swapped counter
    (`invalid:energy_import`) is not renamed here: use `swap_quality` on the flags as well.
    """
    invert = device_or_flag if isinstance(device_or_flag, bool) else device_or_flag.invert_power
    out = dict(values)
    if not invert:
        return out
    for key, value in values.items():
        if is_direction_signed(key) and isinstance(value, (int, float)) and not isinstance(value, bool):
            # 0 stays 0 (never -0.0, which JSON would publish as "-0.0").
            out[key] = -value if value else value
    for a, b in _SWAPPED:
        _swap(out, values, a, b)
    return out


def swap_quality(quality: list[str], device_or_flag: Device | bool) -> list[str]:
    """Quality flags renamed for a reversed meter: `invalid:energy_export` becomes
    `invalid:energy_import`, because that is the key the missing value would have had."""
    invert = device_or_flag if isinstance(device_or_flag, bool) else device_or_flag.invert_power
    if not invert:
        return list(quality)
    names = {a: b for a, b in _SWAPPED} | {b: a for a, b in _SWAPPED}
    out = []
    for flag in quality:
        kind, sep, key = flag.partition(":")
        out.append(f"{kind}:{names[key]}" if sep and key in names else flag)
    return out


def _swap(out: dict[str, Value], values: Mapping[str, Value], a: str, b: str) -> None:
    out.pop(a, None)
    out.pop(b, None)
    if a in values:
        out[b] = values[a]
    if b in values:
        out[a] = values[b]


# SunSpec meter models 201-204 leave the sign of W to the vendor. pvgate reads W as IEC
# metering does (positive = import, the way Fronius and generic SunSpec meters report it) and
# negates it. These vendors report positive = export instead, with counters by their meaning:
# evcc reads SolarEdge "203:W" with scale -1 (templates solaredge-hybrid.yaml) and
# WillCodeForCats/solaredge-modbus-multi#69 documents "positive = export".
EXPORT_POSITIVE_SUNSPEC_VENDORS = ("solaredge",)


def sunspec_meter_exports_positive(manufacturer: str) -> bool:
    """Whether a SunSpec meter of this manufacturer (common model `Mn`) reports W + = export."""
    name = manufacturer.strip().lower()
    return any(name.startswith(v) for v in EXPORT_POSITIVE_SUNSPEC_VENDORS)
