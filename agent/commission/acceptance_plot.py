"""The readings taken during the acceptance check as one SVG line chart: a line per device.

Plain SVG text with its own styles: the HTML report inlines it (nothing fetched when the report is
opened, on a laptop with no network), the Markdown report links the same file beside it.
"""

from __future__ import annotations

import math
from html import escape

from agent.commission.acceptance_model import Acceptance, DeviceResult

# Distinguishable on paper and on a projector, for 30 or more devices the colours repeat with dashes.
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
           "#7f7f7f", "#bcbd22")
W, H = 960, 380
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 20, 50


def series(result: Acceptance, key: str, meters: bool) -> list[tuple[DeviceResult, list[tuple[float, float]]]]:
    """Each inverter's (or each meter's: a station meter would flatten the inverters' lines) samples."""
    out = []
    for r in result.devices:
        if r.meter != meters:
            continue
        points = [(s.t_s, float(v)) for s in r.samples if isinstance((v := s.values.get(key)), (int, float))
                  and not isinstance(v, bool)]
        if points:
            out.append((r, points))
    return out


def colour(i: int) -> tuple[str, str]:
    """(stroke colour, dash pattern) of the i-th line."""
    dash = ("", "6 3", "2 3")[(i // len(PALETTE)) % 3]
    return PALETTE[i % len(PALETTE)], dash


def _nice_step(span: float, ticks: int = 5) -> float:
    raw = span / ticks if span > 0 else 1.0
    mag = 10.0 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)


def svg_chart(result: Acceptance, key: str, title: str, x_label: str, y_label: str, meters: bool = False) -> str:
    """The chart; an empty string when no device read `key`."""
    lines = series(result, key, meters)
    if not lines:
        return ""
    xs = [t for _, pts in lines for t, _v in pts]
    ys = [v for _, pts in lines for _t, v in pts]
    x_max = max(max(xs), result.duration_s, 1.0)
    y_lo, y_hi = min(0.0, min(ys)), max(ys)
    step = _nice_step(y_hi - y_lo)
    y_lo, y_hi = math.floor(y_lo / step) * step, max(math.ceil(y_hi / step) * step, y_lo + step)
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def px(t: float) -> float:
        return LEFT + t / x_max * pw

    def py(v: float) -> float:
        return TOP + (y_hi - v) / (y_hi - y_lo) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
           f'role="img" aria-label="{escape(title)}" font-family="sans-serif" font-size="12">',
           f"<title>{escape(title)}</title>",
           f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="#fff" stroke="#999"/>']
    y = y_lo
    while y <= y_hi + step / 2:
        out.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#e4e4e4"/>')
        out.append(f'<text x="{LEFT - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
        y += step
    xstep = _nice_step(x_max, 6)
    t = 0.0
    while t <= x_max + 1e-9:
        out.append(f'<text x="{px(t):.1f}" y="{TOP + ph + 16}" text-anchor="middle">{t:g}</text>')
        t += xstep
    out.append(f'<text x="{LEFT + pw / 2}" y="{H - 8}" text-anchor="middle">{escape(x_label)}</text>')
    out.append(f'<text x="14" y="{TOP + ph / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {TOP + ph / 2})">{escape(y_label)}</text>')
    for i, (r, pts) in enumerate(lines):
        stroke, dash = colour(i)
        coords = " ".join(f"{px(t):.1f},{py(v):.1f}" for t, v in pts)
        dashed = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<polyline fill="none" stroke="{stroke}" stroke-width="2"{dashed} points="{coords}">'
                   f"<title>{escape(r.device.id)}</title></polyline>")
        out += [f'<circle cx="{px(t):.1f}" cy="{py(v):.1f}" r="2.5" fill="{stroke}"/>' for t, v in pts]
    out.append("</svg>")
    return "\n".join(out)


def legend(result: Acceptance, key: str, meters: bool = False) -> list[tuple[str, str, str]]:
    """(device id, colour, dash) in the chart's order, for the legend under it."""
    return [(r.device.id, *colour(i)) for i, (r, _pts) in enumerate(series(result, key, meters))]
