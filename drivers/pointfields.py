"""Point fields of a device map that say when a value can be believed: `valid_when` and `range`."""

from __future__ import annotations

import math

from drivers.errors import N_
from drivers.yamlsrc import Checker, LDict


def valid_when(node: LDict, path: str, chk: Checker) -> tuple[str, tuple[int, ...]] | None:
    """`valid_when: {point: status, in: [0x5500, 0x9100]}`: raw codes of another point."""
    if "valid_when" not in node:
        return None
    cond = chk.mapping(node["valid_when"], f"{path}.valid_when", chk.line_of(node, "valid_when"), ("point", "in"))
    if cond is None:
        return None
    key = chk.get(cond, "point", f"{path}.valid_when", str, required=True)
    codes = cond.get("in")
    if not isinstance(codes, list) or not codes or not all(
            isinstance(c, int) and not isinstance(c, bool) for c in codes):
        chk.problem(chk.line_of(cond, "in") if "in" in cond else cond.line, f"{path}.valid_when.in",
                    N_("expected a non-empty list of raw codes, e.g. [0x5500, 0x9100]"))
        return None
    return (key, tuple(codes)) if key else None


def plausible_range(node: LDict, path: str, chk: Checker) -> tuple[float, float] | None:
    """`range: [MIN, MAX]` in the point's unit (after scale and offset): the values this point can
    physically take. A value outside is left out and flagged `invalid:<key>` like a sentinel, so a
    garbled register (a 4 GW inverter, a meter reading -1e38 kWh) never reaches the center."""
    if "range" not in node:
        return None
    value = node["range"]
    ok = (isinstance(value, list) and len(value) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))
    if not ok or value[0] >= value[1]:
        chk.problem(chk.line_of(node, "range"), f"{path}.range",
                    N_("expected [MIN, MAX] in the point's unit, two numbers with MIN < MAX, e.g. [-5, 110]"))
        return None
    return float(value[0]), float(value[1])
