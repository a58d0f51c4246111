"""SunSpec: walk a device's model chain at run time and turn the models found into a device map.

A SunSpec device announces "SunS" (0x5375 0x6E53) at base 40000, 50000 or 0 (holding registers),
followed by a chain of models: ID, L (body length), L registers of body, ..., ID 0xFFFF. Model
addresses differ between devices (the common model is 65 or 66 registers long, optional models
come and go), so nothing here hard-codes an address: `discover` walks the chain by L, and
`device_map` places the points of each known model at (model address + offset).

Only the points pvgate publishes are described (canonical keys and units) plus the scale-factor
points they need; unknown models are skipped by their L. Offsets, types and scale-factor names
are from the sunspec/models JSON (register-maps.md §1.3; tests cross-check them against the JSON
shipped with pysunspec2). Pure: the caller supplies the register reader.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from drivers.codec import SUNSPEC_INVALID
from drivers.model import DataType, DeviceMap, Point, Table
from drivers.sunspec_chain import BASES, MARKER, Discovery, DiscoveryError, ModelRef, Reader, discover, find_base

# The chain walk lives in drivers/sunspec_chain.py; its names are part of this module's face.
__all__ = ["BASES", "MARKER", "Discovery", "DiscoveryError", "ModelRef", "Reader", "device_map", "discover",
           "find_base", "layout", "model_title", "without_scale_factors"]


# --- point tables ------------------------------------------------------------------------------

# SunSpec type -> (our type, not-implemented raw values). Accumulators say "not implemented" with 0
# (pysunspec2 does the same); float NaN and all-NUL strings are caught by the codec itself.
_TYPES: dict[str, DataType] = {
    "int16": DataType.I16, "uint16": DataType.U16, "count": DataType.U16, "enum16": DataType.U16,
    "bitfield16": DataType.BITS, "acc16": DataType.U16, "int32": DataType.I32,
    "uint32": DataType.U32, "enum32": DataType.U32, "bitfield32": DataType.U32,
    "acc32": DataType.U32, "acc64": DataType.U64, "float32": DataType.F32,
    "sunssf": DataType.SUNSSF, "string": DataType.STRING,
}


def invalid_values(sunspec_type: str) -> tuple[int, ...]:
    if sunspec_type.startswith("acc"):
        return (0,)
    if sunspec_type in ("bitfield16",):
        return (0xFFFF,)
    return SUNSPEC_INVALID.get(_TYPES[sunspec_type], ())


@dataclass(frozen=True)
class SunSpecPoint:
    """One SunSpec point as pvgate reads it: where, what type, and what it is published as."""

    offset: int  # from the model's ID register (body starts at 2)
    name: str  # SunSpec name
    type: str  # SunSpec type
    key: str  # canonical key ("{n}" for the module number); "" for a scale factor
    unit: str = ""  # canonical unit
    scale: float = 1.0  # SunSpec unit -> canonical unit (W -> kW: 0.001)
    sf: str | None = None  # SunSpec name of the scale factor
    count: int = 0  # registers, strings only
    counter: bool = False
    enum: tuple[tuple[int, str], ...] = ()
    bits: tuple[tuple[int, str], ...] = ()
    identity: bool = False

    @property
    def words(self) -> int:
        return self.count or _TYPES[self.type].words


@dataclass(frozen=True)
class ModelDef:
    id: int
    family: str  # common, inverter, nameplate, status, mppt, meter: the key namespace
    title: str
    length: int  # fixed L from the definition (the common model also comes with 65)
    points: tuple[SunSpecPoint, ...]
    group_offset: int = 0  # first repeating group (model 160 modules)
    group_size: int = 0
    group: tuple[SunSpecPoint, ...] = ()


def _sf(offset: int, name: str) -> SunSpecPoint:
    return SunSpecPoint(offset, name, "sunssf", "")


def _names(*names: str) -> tuple[tuple[int, str], ...]:
    return tuple((i, n) for i, n in enumerate(names) if n)


ST_ENUM = ((1, "OFF"), (2, "SLEEPING"), (3, "STARTING"), (4, "MPPT"), (5, "THROTTLED"),
           (6, "SHUTTING_DOWN"), (7, "FAULT"), (8, "STANDBY"))
EVT1_BITS = _names("ground_fault", "dc_over_volt", "ac_disconnect", "dc_disconnect", "grid_disconnect",
                   "cabinet_open", "manual_shutdown", "over_temp", "over_frequency", "under_frequency",
                   "ac_over_volt", "ac_under_volt", "blown_string_fuse", "under_temp", "memory_loss",
                   "hw_test_failure")
METER_EVT_BITS = _names("", "", "power_failure", "under_voltage", "low_pf", "over_current", "over_voltage",
                        "missing_sensor")

_COMMON = (
    SunSpecPoint(2, "Mn", "string", "manufacturer", count=16, identity=True),
    SunSpecPoint(18, "Md", "string", "model", count=16, identity=True),
    SunSpecPoint(42, "Vr", "string", "firmware", count=8, identity=True),
    SunSpecPoint(50, "SN", "string", "serial", count=16, identity=True),
)

# Inverters: (name, key, unit, scale, sf, offset in 101-103, offset in 111-113). SunSpec type of
# the integer models is in _INT_TYPES (default uint16); the float models are all float32 except St.
_INVERTER = (
    ("AphA", "phase_a_current", "A", 1.0, "A_SF", 3, 4),
    ("AphB", "phase_b_current", "A", 1.0, "A_SF", 4, 6),
    ("AphC", "phase_c_current", "A", 1.0, "A_SF", 5, 8),
    ("PPVphAB", "line_ab_voltage", "V", 1.0, "V_SF", 7, 10),
    ("PPVphBC", "line_bc_voltage", "V", 1.0, "V_SF", 8, 12),
    ("PPVphCA", "line_ca_voltage", "V", 1.0, "V_SF", 9, 14),
    ("PhVphA", "phase_a_voltage", "V", 1.0, "V_SF", 10, 16),
    ("PhVphB", "phase_b_voltage", "V", 1.0, "V_SF", 11, 18),
    ("PhVphC", "phase_c_voltage", "V", 1.0, "V_SF", 12, 20),
    ("W", "ac_power", "kW", 0.001, "W_SF", 14, 22),
    ("Hz", "grid_frequency", "Hz", 1.0, "Hz_SF", 16, 24),
    ("VA", "apparent_power", "kVA", 0.001, "VA_SF", 18, 26),
    ("VAr", "reactive_power", "kvar", 0.001, "VAr_SF", 20, 28),
    ("PF", "power_factor", "", 0.01, "PF_SF", 22, 30),  # percent -> -1..1
    ("WH", "energy_total", "kWh", 0.001, "WH_SF", 24, 32),
    ("DCA", "dc_current", "A", 1.0, "DCA_SF", 27, 34),
    ("DCV", "dc_voltage", "V", 1.0, "DCV_SF", 29, 36),
    ("DCW", "dc_power", "kW", 0.001, "DCW_SF", 31, 38),
    ("TmpCab", "internal_temperature", "°C", 1.0, "Tmp_SF", 33, 40),
    ("TmpSnk", "heatsink_temperature", "°C", 1.0, "Tmp_SF", 34, 42),
)
_INT_TYPES = {"W": "int16", "VA": "int16", "VAr": "int16", "PF": "int16", "WH": "acc32", "DCW": "int16",
              "TmpCab": "int16", "TmpSnk": "int16"}
_INVERTER_SFS = (("A_SF", 6), ("V_SF", 13), ("W_SF", 15), ("Hz_SF", 17), ("VA_SF", 19), ("VAr_SF", 21),
                 ("PF_SF", 23), ("WH_SF", 26), ("DCA_SF", 28), ("DCV_SF", 30), ("DCW_SF", 32), ("Tmp_SF", 37))


def _inverter(floats: bool) -> tuple[SunSpecPoint, ...]:
    out = []
    for name, key, unit, scale, sf, int_offset, float_offset in _INVERTER:
        out.append(SunSpecPoint(
            float_offset if floats else int_offset, name,
            "float32" if floats else _INT_TYPES.get(name, "uint16"), key, unit, scale,
            None if floats else sf, counter=key == "energy_total"))
    st, evt = (48, 50) if floats else (38, 40)
    out.append(SunSpecPoint(st, "St", "enum16", "status", enum=ST_ENUM))
    out.append(SunSpecPoint(evt, "Evt1", "bitfield32", "alarm_1", bits=EVT1_BITS))
    if not floats:
        out.extend(_sf(offset, name) for name, offset in _INVERTER_SFS)
    return tuple(out)


_NAMEPLATE = (SunSpecPoint(3, "WRtg", "uint16", "rated_power_kw", "kW", 0.001, "WRtg_SF", identity=True),
              _sf(4, "WRtg_SF"))
_STATUS = (
    SunSpecPoint(2, "PVConn", "bitfield16", "pv_connection",
                 bits=_names("connected", "available", "operating", "test")),
    SunSpecPoint(44, "Ris", "uint16", "insulation_resistance", "MΩ", 1e-6, "Ris_SF"),
    _sf(45, "Ris_SF"),
)
_MPPT = (_sf(2, "DCA_SF"), _sf(3, "DCV_SF"), _sf(4, "DCW_SF"))
_MODULE = (  # offsets inside one 20-register module group
    SunSpecPoint(9, "DCA", "uint16", "pv{n}_current", "A", 1.0, "DCA_SF"),
    SunSpecPoint(10, "DCV", "uint16", "pv{n}_voltage", "V", 1.0, "DCV_SF"),
    SunSpecPoint(11, "DCW", "uint16", "pv{n}_power", "kW", 0.001, "DCW_SF"),
)


def _meter(model_id: int) -> tuple[SunSpecPoint, ...]:
    # Sign of W: the model JSON gives no rule, but its reactive energies follow the IEC metering
    # quadrants (VArh imported in Q1/Q2, exported in Q3/Q4), where active power is positive in
    # Q1/Q4, i.e. positive W = import from the grid. Our canonical meter ac_power is positive =
    # export, hence scale -0.001. Vendors differ (unverified per device): check on site that
    # ac_power > 0 while the station exports and that energy_export is the counter that grows.
    ll = "PPVph" if model_id == 201 else "PhVph"  # 201 names its line-line voltages PPVph..
    pts = [
        SunSpecPoint(3, "AphA", "int16", "phase_a_current", "A", 1.0, "A_SF"),
        SunSpecPoint(4, "AphB", "int16", "phase_b_current", "A", 1.0, "A_SF"),
        SunSpecPoint(5, "AphC", "int16", "phase_c_current", "A", 1.0, "A_SF"),
        SunSpecPoint(8, "PhVphA", "int16", "phase_a_voltage", "V", 1.0, "V_SF"),
        SunSpecPoint(9, "PhVphB", "int16", "phase_b_voltage", "V", 1.0, "V_SF"),
        SunSpecPoint(10, "PhVphC", "int16", "phase_c_voltage", "V", 1.0, "V_SF"),
        SunSpecPoint(12, ll + "AB", "int16", "line_ab_voltage", "V", 1.0, "V_SF"),
        SunSpecPoint(13, ll + "BC", "int16", "line_bc_voltage", "V", 1.0, "V_SF"),
        SunSpecPoint(14, ll + "CA", "int16", "line_ca_voltage", "V", 1.0, "V_SF"),
        SunSpecPoint(16, "Hz", "int16", "grid_frequency", "Hz", 1.0, "Hz_SF"),
        SunSpecPoint(18, "W", "int16", "ac_power", "kW", -0.001, "W_SF"),
        SunSpecPoint(19, "WphA", "int16", "phase_a_power", "kW", -0.001, "W_SF"),
        SunSpecPoint(20, "WphB", "int16", "phase_b_power", "kW", -0.001, "W_SF"),
        SunSpecPoint(21, "WphC", "int16", "phase_c_power", "kW", -0.001, "W_SF"),
        # Reactive power and power factor keep the meter's own sign (as the Eastron map does).
        SunSpecPoint(28, "VAR", "int16", "reactive_power", "kvar", 0.001, "VAR_SF"),
        SunSpecPoint(33, "PF", "int16", "power_factor", "", 0.01, "PF_SF"),
        SunSpecPoint(38, "TotWhExp", "acc32", "energy_export", "kWh", 0.001, "TotWh_SF", counter=True),
        SunSpecPoint(46, "TotWhImp", "acc32", "energy_import", "kWh", 0.001, "TotWh_SF", counter=True),
        SunSpecPoint(105, "Evt", "bitfield32", "alarm_1", bits=METER_EVT_BITS),
    ]
    sfs = (("A_SF", 6), ("V_SF", 15), ("Hz_SF", 17), ("W_SF", 22), ("VAR_SF", 32), ("PF_SF", 37),
           ("TotWh_SF", 54))
    return tuple(pts) + tuple(_sf(offset, name) for name, offset in sfs)


_INV_TITLES = {1: "single phase", 2: "split phase", 3: "three phase"}
_METER_TITLES = {201: "single phase", 202: "split phase", 203: "wye three phase", 204: "delta three phase"}

MODELS: dict[int, ModelDef] = {
    1: ModelDef(1, "common", "common", 66, _COMMON),
    **{100 + i: ModelDef(100 + i, "inverter", f"inverter ({t})", 50, _inverter(False))
       for i, t in _INV_TITLES.items()},
    **{110 + i: ModelDef(110 + i, "inverter", f"inverter ({t}, float)", 60, _inverter(True))
       for i, t in _INV_TITLES.items()},
    120: ModelDef(120, "nameplate", "nameplate", 26, _NAMEPLATE),
    122: ModelDef(122, "status", "measurements and status", 44, _STATUS),
    160: ModelDef(160, "mppt", "multiple MPPT", 8, _MPPT, group_offset=10, group_size=20, group=_MODULE),
    **{i: ModelDef(i, "meter", f"meter ({t})", 105, _meter(i)) for i, t in _METER_TITLES.items()},
}


def model_title(model_id: int) -> str:
    known = MODELS.get(model_id)
    return known.title if known else "not used by pvgate"


# --- device map ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placed:
    """A SunSpec point placed in one discovered model: its Point and where it came from."""

    point: Point
    spec: SunSpecPoint
    model: ModelRef
    family: str
    base_key: str  # canonical key before prefix and suffix (pv{n} already numbered)


def _point(spec: SunSpecPoint, address: int, key: str, sf_key: str | None) -> Point:
    dtype = _TYPES[spec.type]
    return Point(
        key=key, table=Table.HOLDING, address=address, type=dtype, count=spec.words,
        scale=spec.scale, scale_factor=sf_key, unit=spec.unit, counter=spec.counter,
        invalid=invalid_values(spec.type), enum=spec.enum, bits=spec.bits,
        publish=dtype is not DataType.SUNSSF and not spec.identity,
    )


def layout(discovery: Discovery) -> list[Placed]:
    """Every known point of every discovered model, at its absolute address, keyed uniquely.

    Keys: the canonical key for the first model of a family; "_2", "_3" for the next ones. A
    meter in a device that also has an inverter model gets "meter_" in front (meter_ac_power).
    Modules of model 160 are numbered across all 160 models (pv1.., pv3..). Identity comes from
    the first common and the first nameplate model. Scale factors are "<family>_<name>" (not
    published). Points that do not fit in a model's L (an older, shorter model) are left out.
    """
    has_inverter = any(MODELS[m.id].family == "inverter" for m in discovery.models if m.id in MODELS)
    seen: dict[str, int] = {}
    modules = 0
    out: list[Placed] = []
    for ref in discovery.models:
        mdef = MODELS.get(ref.id)
        if mdef is None:
            continue
        seen[mdef.family] = seen.get(mdef.family, 0) + 1
        nth = seen[mdef.family]
        if nth > 1 and mdef.family in ("common", "nameplate"):
            continue  # an aggregator's further devices: identity is the first one's
        suffix = "" if nth == 1 or mdef.family == "mppt" else f"_{nth}"
        prefix = "meter_" if mdef.family == "meter" and has_inverter else ""
        fixed = [(spec, ref.address + spec.offset, spec.key) for spec in mdef.points]
        count = max(0, (ref.length + 2 - mdef.group_offset) // mdef.group_size) if mdef.group_size else 0
        for i in range(count):
            start = ref.address + mdef.group_offset + i * mdef.group_size
            fixed += [(spec, start + spec.offset, spec.key.format(n=modules + i + 1)) for spec in mdef.group]
        modules += count
        sf_suffix = f"_{nth}" if nth > 1 else ""
        for spec, address, base_key in fixed:
            if address + spec.words > ref.address + 2 + ref.length:
                continue
            sf_key = f"{mdef.family}_{spec.sf.lower()}{sf_suffix}" if spec.sf else None
            key = f"{mdef.family}_{spec.name.lower()}{sf_suffix}" if not spec.key else (
                base_key if spec.identity else f"{prefix}{base_key}{suffix}")
            out.append(Placed(_point(spec, address, key, sf_key), spec, ref, mdef.family, base_key))
    return _drop_orphans(out)


def _drop_orphans(placed: list[Placed]) -> list[Placed]:
    """A point whose scale factor lies outside its (short) model cannot be decoded: leave it out."""
    keys = {p.point.key for p in placed}
    return [p for p in placed if p.point.scale_factor is None or p.point.scale_factor in keys]


def device_map(discovery: Discovery, name: str = "SunSpec device", map_id: str = "sunspec") -> DeviceMap:
    """The device map of one discovered device: absolute addresses, SF points, identity."""
    placed = layout(discovery)
    identity_sfs = {p.point.scale_factor for p in placed if p.spec.identity and p.point.scale_factor}
    identity = tuple(p.point for p in placed if p.spec.identity or p.point.key in identity_sfs)
    points = tuple(p.point for p in placed if p.point not in identity)
    models = ", ".join(f"{m.id}@{m.address}" for m in discovery.models)
    return DeviceMap(
        id=map_id, name=name, points=points, identity=identity, sunspec=True,
        source=f"SunSpec models discovered at base {discovery.base}: {models} (sunspec/models JSON)",
    )


def without_scale_factors(points: Iterable[Point]) -> list[Point]:
    """Identity points as the poller decodes them: published, except their scale factors."""
    return [replace(p, publish=p.type is not DataType.SUNSSF) for p in points]
