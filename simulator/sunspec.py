"""A simulated SunSpec device: a full model chain at 40000 whose values come from the plant physics.

Chain: "SunS", 1 common (L=66), 103 inverter (or 113 float), 120 nameplate, 160 MPPT with one
module per string, 203 meter, end 0xFFFF. The points are laid out by drivers.sunspec from the
same chain a client discovers, and encoded with the codec, so what pvgate decodes is what was
served; an independent client (pysunspec2) checks that the encoding is SunSpec. Scale factors
are fixed per device, chosen from the rated power so every value fits its register. Registers
outside the chain answer exception 2 (illegal address), like real devices.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from drivers.codec import encode_invalid, encode_point
from drivers.errors import DecodeError
from drivers.model import DeviceMap, Table, Value
from drivers.sunspec import MARKER, Discovery, ModelRef, Placed, device_map, layout
from simulator.device import EXC_ILLEGAL_ADDRESS, Fault, SimDevice
from simulator.physics import DAILY_PEAK_HOURS, PvPlant, SimClock

BASE = 40000
MANUFACTURER = "pvgate"
FIRMWARE = "1.0.0"
COMMON_L = 66
MODULE_SIZE = 20
# (model id, L) of the chain after the marker; 160's L is 8 + 20 per module, set per device.
CHAIN_INT = ((1, COMMON_L), (103, 50), (120, 26), (160, 0), (203, 105))
CHAIN_FLOAT = ((1, COMMON_L), (113, 60), (120, 26), (160, 0), (203, 105))
ST_MPPT = 4
ST_SLEEPING = 2
DER_TYPE_PV = 4


def chain(float_model: bool, modules: int, base: int = BASE) -> Discovery:
    """The models this simulator serves, as a client would discover them."""
    models = []
    addr = base + 2
    for model_id, length in CHAIN_FLOAT if float_model else CHAIN_INT:
        length = length or 8 + MODULE_SIZE * modules
        models.append(ModelRef(model_id, addr, length))
        addr += 2 + length
    return Discovery(base, tuple(models))


def _fit(largest: float, limit: int, finest: int) -> int:
    """Smallest scale factor (from `finest` up) with which `largest` fits a register."""
    sf = finest
    while largest / 10.0**sf > limit and sf < 10:
        sf += 1
    return sf


def scale_factors(rated_kw: float, modules: int) -> dict[tuple[str, str], int]:
    """(family, SunSpec SF name) -> value, fixed for a device of this size."""
    watts = rated_kw * 1000.0 * 1.1
    amps = watts / (3 * 200.0)
    wh = rated_kw * 1000.0 * DAILY_PEAK_HOURS * 365 * 25 + 5e7
    i16, u16, u32 = 32767, 65535, 0xFFFFFFFF
    return {
        ("inverter", "A_SF"): _fit(amps, u16, -2), ("inverter", "V_SF"): -1,
        ("inverter", "W_SF"): _fit(watts, i16, 0), ("inverter", "Hz_SF"): -2,
        ("inverter", "VA_SF"): _fit(watts, i16, 0), ("inverter", "VAr_SF"): _fit(watts, i16, 0),
        ("inverter", "PF_SF"): -2, ("inverter", "WH_SF"): _fit(wh, u32, 0),
        ("inverter", "DCA_SF"): _fit(watts / 600.0, u16, -2), ("inverter", "DCV_SF"): -1,
        ("inverter", "DCW_SF"): _fit(watts, i16, 0), ("inverter", "Tmp_SF"): -1,
        ("nameplate", "WRtg_SF"): _fit(rated_kw * 1000.0, u16, 0),
        ("mppt", "DCA_SF"): _fit(watts / modules / 400.0, u16, -2), ("mppt", "DCV_SF"): -1,
        ("mppt", "DCW_SF"): _fit(watts / modules, u16, 0),
        ("meter", "A_SF"): _fit(amps, i16, -2), ("meter", "V_SF"): -1, ("meter", "Hz_SF"): -2,
        ("meter", "W_SF"): _fit(watts, i16, 0), ("meter", "VAR_SF"): _fit(watts, i16, 0),
        ("meter", "PF_SF"): -2, ("meter", "TotWh_SF"): _fit(wh, u32, 0),
    }


@dataclass
class SunSpecSimDevice(SimDevice):
    """SimDevice's interface (unit, plant, clock, fault, served, overrides, rng, values_at, read).

    `profile` is replaced by the device map of the served chain, so `overrides` take the keys
    pvgate publishes (ac_power, meter_ac_power, pv1_voltage, ...) and values_at() returns them.
    The meter sits at the inverter's grid connection: same plant seen as a meter.
    """

    float_model: bool = False
    discovery: Discovery = field(init=False)
    placed: list[Placed] = field(init=False)
    sfs: dict[tuple[str, str], int] = field(init=False)

    def __post_init__(self) -> None:
        modules = max(1, self.plant.strings)
        self.discovery = chain(self.float_model, modules)
        self.placed = layout(self.discovery)
        self.profile = device_map(self.discovery, name=f"pvgate SunSpec simulator ({self.model_name})")
        self.sfs = scale_factors(self.plant.rated_kw, modules)
        self._meter = replace(self.plant, meter=True)
        self._end = self.discovery.models[-1].address + 2 + self.discovery.models[-1].length + 2
        self._static = self._static_image()

    @property
    def model_name(self) -> str:
        return f"SIM-SUNSPEC-{self.plant.rated_kw:g}"

    def _static_image(self) -> list[int]:
        """Marker, model headers, fixed fields and the end model; values are written per read."""
        image = [0] * (self._end - BASE)
        image[0:2] = MARKER
        for ref in self.discovery.models:
            at = ref.address - BASE
            image[at], image[at + 1] = ref.id, ref.length
            if ref.id == 1:
                image[at + 2 + 64] = self.unit  # DA
            elif ref.id == 120:
                image[at + 2] = DER_TYPE_PV
            elif ref.id == 160:
                image[at + 8] = (ref.length - 8) // MODULE_SIZE  # N
                for i in range(image[at + 8]):
                    group = at + 10 + i * MODULE_SIZE
                    image[group] = i + 1  # module ID
                    text = f"PV{i + 1}".encode().ljust(16, b"\x00")
                    image[group + 1:group + 9] = [int.from_bytes(text[j:j + 2], "big") for j in range(0, 16, 2)]
        image[-2:] = [0xFFFF, 0]
        return image

    def values_at(self, sim_t: float) -> dict[str, Value]:
        """Every point's engineering value (by published key) at simulated time sim_t."""
        inverter = self.plant.state(sim_t)
        meter = self._meter.state(sim_t)
        out: dict[str, Value] = {}
        for p in self.placed:
            key = p.point.key
            if key in self.overrides:
                out[key] = self.overrides[key]
            elif not p.spec.key:
                out[key] = self.sfs.get((p.family, p.spec.name), 0)
            elif p.spec.identity:
                out[key] = self._identity(p.base_key)
            else:
                out[key] = self._measured(p, meter if p.family == "meter" else inverter)
        return out

    def _identity(self, key: str) -> Value:
        identity: dict[str, Value] = {
            "manufacturer": MANUFACTURER, "model": self.model_name, "firmware": FIRMWARE,
            "serial": f"SIM{self.unit:03d}{self.plant.seed:05d}", "rated_power_kw": self.plant.rated_kw}
        return identity.get(key, "")

    @staticmethod
    def _measured(p: Placed, state: dict[str, float | int]) -> Value:
        key = p.base_key
        if key == "status":
            return ST_MPPT if float(state.get("ac_power", 0.0)) > 0 else ST_SLEEPING
        if key.startswith("alarm"):
            return 0
        if key == "heatsink_temperature":
            return float(state.get("internal_temperature", 25.0)) + 6.0
        if key == "dc_voltage":
            return state.get("pv1_voltage", 0.0)
        if key == "dc_current":
            volts = float(state.get("pv1_voltage", 0.0))
            return float(state.get("dc_power", 0.0)) * 1000.0 / volts if volts else 0.0
        if key.startswith("pv") and key.endswith("_power"):
            n = key[2:-len("_power")]
            return float(state.get(f"pv{n}_voltage", 0.0)) * float(state.get(f"pv{n}_current", 0.0)) / 1000.0
        return state.get(key, 0.0)

    def read(self, table: Table, address: int, count: int, real_t: float | None = None) -> list[int] | int:
        """Holding registers of the chain, or exception 2 for anything outside it."""
        if table is not Table.HOLDING or address < BASE or address + count > self._end or count < 1:
            return EXC_ILLEGAL_ADDRESS
        values = self.values_at(self.clock.sim(real_t))
        image = list(self._static)
        for p in self.placed:
            at = p.point.address - BASE
            image[at:at + p.point.count] = self._encode_placed(p, values.get(p.point.key), values)
        self.served += 1
        return image[address - BASE:address - BASE + count]

    def _encode_placed(self, p: Placed, value: Value | None, values: dict[str, Value]) -> list[int]:
        point = p.point
        if value is None:
            return encode_invalid(point)
        sf = None
        if point.scale_factor is not None:
            sf_value = values.get(point.scale_factor, 0)
            sf = int(sf_value) if isinstance(sf_value, (int, float)) else 0
        try:
            return encode_point(point, value, sf)
        except DecodeError:
            return encode_invalid(point)


def make_sim_device(unit: int, plant: PvPlant, clock: SimClock, float_model: bool = False,
                    fault: Fault | None = None, modules: int = 2) -> SunSpecSimDevice:
    """The simulator CLI's SunSpec device (profile id "sunspec"): one MPPT module per string."""
    plant = replace(plant, strings=modules, meter=False)
    placeholder = DeviceMap(id="sunspec", name="SunSpec device", source="pvgate simulator", points=(), sunspec=True)
    return SunSpecSimDevice(unit, placeholder, plant, clock, fault or Fault(), float_model=float_model)
