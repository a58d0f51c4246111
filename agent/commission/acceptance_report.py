"""The acceptance report: Markdown, and one self-contained HTML file (inline CSS and SVG, no
fetches, prints on A4) that the technician hands over with the station.

Both are laid out from the same tables: the station, the verdict, every check, each device's
identity, its readings during the check, the plot, and the sign-off lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from html import escape
from pathlib import Path
from zoneinfo import ZoneInfo

from agent.commission.acceptance_devices import identity_text, rated_kw
from agent.commission.acceptance_model import FAIL, PASS, Acceptance, DeviceResult
from agent.commission.acceptance_plot import legend, svg_chart
from agent.i18n import _
from drivers.model import Value

Table = tuple[list[str], list[list[str]]]
READING_KEYS = ("ac_power", "dc_power", "phase_a_voltage", "grid_frequency", "power_factor",
                "internal_temperature", "energy_today", "energy_total", "energy_export", "energy_import")
PLOT_KEY = "ac_power"


@dataclass(frozen=True)
class Chart:
    title: str
    svg: str
    legend: list[tuple[str, str, str]]  # (device, colour, dash)
    file: str  # the .svg beside the Markdown report


def write_reports(result: Acceptance, out_dir: Path) -> list[Path]:
    """report.html, report.md and the plots' .svg files in out_dir; their paths."""
    stamp = datetime.fromtimestamp(result.started_ms / 1000, _zone(result)).strftime("%Y%m%d-%H%M%S")
    stem = f"acceptance-{result.site_id}-{stamp}"
    charts = _charts(result, stem)
    paths = [out_dir / f"{stem}.html", out_dir / f"{stem}.md"]
    paths[0].write_text(render_html(result, charts), encoding="utf-8")
    paths[1].write_text(render_markdown(result, charts), encoding="utf-8")
    for chart in charts:
        paths.append(out_dir / chart.file)
        paths[-1].write_text(chart.svg + "\n", encoding="utf-8")
    return paths


def _zone(result: Acceptance) -> ZoneInfo:
    return ZoneInfo(result.timezone)


def _charts(result: Acceptance, stem: str) -> list[Chart]:
    out = []
    for meters, title, suffix in ((False, _("Inverters: AC power during the check"), ""),
                                  (True, _("Meters: AC power during the check"), "-meters")):
        svg = svg_chart(result, PLOT_KEY, title, _("seconds since the start of the check"), _("AC power (kW)"), meters)
        if svg:
            out.append(Chart(title, svg, legend(result, PLOT_KEY, meters), f"{stem}{suffix}.svg"))
    return out


# --- the tables ---------------------------------------------------------------------------------


def headings() -> dict[str, str]:
    """The report's section headings (translated here: a message inside an f-string is not extracted)."""
    return {"result": _("Result"), "checks": _("Checks"), "identity": _("Device identity"),
            "readings": _("Readings during the check"),
            "signoff": _("Sign-off"), "signature": _("Signature"), "date": _("Date")}


def reading_labels() -> dict[str, str]:
    return {"ac_power": _("AC power"), "dc_power": _("DC power"), "phase_a_voltage": _("Phase A voltage"),
            "line_ab_voltage": _("Line voltage AB"), "grid_frequency": _("Frequency"),
            "power_factor": _("Power factor"), "internal_temperature": _("Temperature"),
            "energy_today": _("Energy today"), "energy_total": _("Energy total"),
            "energy_export": _("Energy exported"), "energy_import": _("Energy imported")}


def title(result: Acceptance) -> str:
    return _("Acceptance report: {name}").format(name=result.site_name)


def verdict(result: Acceptance) -> str:
    return _("PASSED") if result.passed else _("FAILED")


def station_rows(result: Acceptance) -> list[tuple[str, str]]:
    when = datetime.fromtimestamp(result.started_ms / 1000, _zone(result))
    rows = [(_("Station"), result.site_name), (_("Station id"), result.site_id),
            (_("Capacity"), f"{result.capacity_kwp:g} kWp" if result.capacity_kwp else "-")]
    if result.location:
        rows.append((_("Location"), f"{result.location[0]:.4f}° N, {result.location[1]:.4f}° E"))
    rows += [(_("Checked at"), f"{when:%Y-%m-%d %H:%M:%S} ({result.timezone}, UTC{when:%z})"),
             (_("Readings taken over"), _("{s:g} s").format(s=result.duration_s)),
             (_("Devices"), str(len(result.devices))), (_("Site file"), result.site_file),
             (_("Software"), f"pvgate {result.version}"), (_("Result"), verdict(result))]
    return rows


def status_word(status: str) -> str:
    return {PASS: _("pass"), FAIL: _("fail")}.get(status, _("warning"))


def checks_table(result: Acceptance) -> Table:
    header = ["#", _("Check"), _("Device"), _("Result"), _("Details")]
    names = {r.device.id: f"{r.device.id} ({r.device.name})" for r in result.devices if r.device.name}
    rows = [[str(i), c.name, names.get(c.subject, c.subject) or _("station"), status_word(c.status), c.detail]
            for i, c in enumerate(result.all_checks(), 1)]
    return header, rows


def _nameplate(r: DeviceResult) -> str:
    exp = r.device.expect
    if exp is None:
        return "-"
    parts = [v for v in (exp.model, exp.serial, f"{exp.rated_kw:g} kW" if exp.rated_kw else None) if v]
    return ", ".join(parts)


def identity_table(result: Acceptance) -> Table:
    header = [_("Device"), _("Name"), _("Link / unit"), _("Device map"), _("Model"), _("Serial number"),
              _("Rated power"), _("Site file (expect)")]
    rows = []
    for r in result.devices:
        dmap = r.dmap or r.device.profile
        points = {p.key: p for p in dmap.identity}
        rated = r.identity.get("rated_power_kw")
        rows.append([r.device.id, r.device.name or "-", f"{r.device.link} / {r.device.unit}", dmap.id,
                     identity_text(r.identity.get("model"), points.get("model")),
                     identity_text(r.identity.get("serial"), points.get("serial")),
                     f"{rated:g} kW" if isinstance(rated, (int, float)) else "-", _nameplate(r)])
    return header, rows


def _cell(values: list[Value], counter: bool) -> str:
    nums = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not nums:
        return str(values[-1]) if values else "-"
    lo, hi, last = (_num(x) for x in (min(nums), max(nums), nums[-1]))
    # An energy counter only grows: its last value is the one to compare with the display.
    return last if lo == hi or counter else f"{last} ({lo}–{hi})"


def _num(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def readings_table(result: Acceptance) -> Table:
    """The last value of the main points (min–max during the check where it moved)."""
    keys = [k for k in READING_KEYS if any(k in s.values for r in result.devices for s in r.samples)]
    header, labels = [_("Device"), _("Samples")], reading_labels()
    for k in keys:
        unit = next((r.unit_of(k) for r in result.devices if r.unit_of(k)), "")
        header.append(f"{labels.get(k, k)} ({unit})" if unit else labels.get(k, k))
    rows = []
    for r in result.devices:
        row = [r.device.id, f"{len(r.samples)}"]
        counters = {p.key for p in (r.dmap or r.device.profile).points if p.counter}
        row += [_cell([s.values[k] for s in r.samples if k in s.values], k in counters) for k in keys]
        rows.append(row)
    return header, rows


def signoff_roles() -> list[str]:
    return [_("Commissioning technician"), _("County inspector"), _("Station owner (village committee)")]


def _note(result: Acceptance) -> str:
    limits = [f"{r.device.id} ≤ {1.5 * kw:g} kW" for r in result.devices if (kw := rated_kw(r, result.capacity_kwp))]
    text = _("A reading is implausible when it lies outside the device map's range or the physical one "
             "(phase voltage 50–500 V, frequency 45–65 Hz, power factor within ±1), or when the AC power "
             "exceeds 1.5 × the rated power.")
    return text + (" " + "; ".join(limits[:6]) + (" …" if len(limits) > 6 else "") if limits else "")


# --- Markdown -----------------------------------------------------------------------------------


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(_md_escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return out


def render_markdown(result: Acceptance, charts: list[Chart]) -> str:
    lines = [f"# {title(result)}", ""]
    lines += _md_table([_("Item"), _("Value")], [[k, v] for k, v in station_rows(result)])
    h = headings()
    lines += ["", f"**{h['result']}: {verdict(result)}** — " + _("{p} passed, {w} warnings, {f} failed").format(
        p=result.count(PASS), w=result.count("warn"), f=result.count(FAIL)), ""]
    lines += [f"## {h['checks']}", "", *_md_table(*checks_table(result)), ""]
    lines += [f"## {h['identity']}", "", *_md_table(*identity_table(result)), ""]
    lines += [f"## {h['readings']}", "", *_md_table(*readings_table(result)), "", _note(result), ""]
    for chart in charts:
        lines += [f"### {chart.title}", "", f"![{chart.title}]({chart.file})", ""]
    lines += [f"## {h['signoff']}", ""]
    for role in signoff_roles():
        lines += [f"{role}: ____________________　{h['signature']}: ____________________　{h['date']}: ____________", ""]
    return "\n".join(lines)


# --- HTML ---------------------------------------------------------------------------------------


CSS = """
body { font-family: "Noto Sans CJK SC", "Source Han Sans SC", "WenQuanYi Micro Hei", "Microsoft YaHei",
       "PingFang SC", sans-serif; margin: 24px; color: #222; font-size: 14px; }
h1 { font-size: 22px; margin: 0 0 12px; } h2 { font-size: 17px; margin: 22px 0 8px; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; width: 100%; margin: 6px 0; }
th, td { border: 1px solid #bbb; padding: 4px 6px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
table.station { width: auto; } table.readings { font-size: 12px; } table.station th { width: 10em; }
.verdict { font-size: 20px; font-weight: bold; padding: 8px 14px; display: inline-block; margin: 8px 0; }
.passed { background: #dff3e0; color: #17612a; border: 2px solid #2e8b57; }
.failed { background: #fbe0e0; color: #9b1c1c; border: 2px solid #c0392b; }
td.pass, td.fail, td.warn { white-space: nowrap; } td.pass { color: #17612a; font-weight: bold; }
td.fail { color: #fff; background: #c0392b; font-weight: bold; }
td.warn { color: #8a5a00; background: #fff4d6; font-weight: bold; }
.legend span { display: inline-block; margin: 2px 10px 2px 0; white-space: nowrap; }
.legend i { display: inline-block; width: 22px; height: 0; border-top: 3px solid; vertical-align: middle;
            margin-right: 4px; }
.note { color: #555; font-size: 12px; }
.sign { display: grid; grid-template-columns: 1fr 1fr 1fr; gap: 24px; margin-top: 18px; }
.sign div { border-top: 1px solid #333; padding-top: 4px; min-height: 90px; }
@media print { body { margin: 10mm; font-size: 11px; } h2 { break-after: avoid; } tr { break-inside: avoid; } }
"""


def _html_table(header: list[str], rows: list[list[str]], status_col: int | None = None, cls: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for i, c in enumerate(row):
            klass = f' class="{_status_class(c)}"' if i == status_col else ""
            cells.append(f"<td{klass}>{escape(c)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    klass = f' class="{cls}"' if cls else ""
    return f"<table{klass}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _status_class(word: str) -> str:
    return {status_word(PASS): "pass", status_word(FAIL): "fail"}.get(word, "warn")


def render_html(result: Acceptance, charts: list[Chart]) -> str:
    lang = "zh-CN" if result.language == "zh-CN" else "en"
    h = headings()
    station = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in station_rows(result))
    cls = "passed" if result.passed else "failed"
    summary = _("{p} passed, {w} warnings, {f} failed").format(
        p=result.count(PASS), w=result.count("warn"), f=result.count(FAIL))
    parts = [f'<!DOCTYPE html>\n<html lang="{lang}"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{escape(title(result))}</title><style>{CSS}</style></head><body>",
             f"<h1>{escape(title(result))}</h1>", f'<table class="station">{station}</table>',
             f'<div class="verdict {cls}">{escape(h["result"])}: {escape(verdict(result))}</div> {escape(summary)}',
             f"<h2>{escape(h['checks'])}</h2>", _html_table(*checks_table(result), status_col=3),
             f"<h2>{escape(h['identity'])}</h2>", _html_table(*identity_table(result)),
             f"<h2>{escape(h['readings'])}</h2>", _html_table(*readings_table(result), cls="readings"),
             f'<p class="note">{escape(_note(result))}</p>']
    for chart in charts:
        keys = "".join(f'<span><i style="border-color:{c};{"border-top-style:dashed;" if d else ""}"></i>'
                       f"{escape(dev)}</span>" for dev, c, d in chart.legend)
        parts += [f"<h2>{escape(chart.title)}</h2>", chart.svg, f'<div class="legend">{keys}</div>']
    parts.append(f"<h2>{escape(h['signoff'])}</h2><div class=\"sign\">")
    for role in signoff_roles():
        parts.append(f"<div><b>{escape(role)}</b><br>{escape(h['signature'])}:<br><br>{escape(h['date'])}:</div>")
    parts.append("</div></body></html>\n")
    return "\n".join(parts)
