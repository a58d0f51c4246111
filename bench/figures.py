"""Figures of one suite run, their targets, and the table (plain text or markdown) they are printed as."""

from __future__ import annotations

import operator
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

OPS: dict[str, Callable[[float, float], bool]] = {"<=": operator.le, "<": operator.lt, ">=": operator.ge,
                                                  "==": operator.eq}


@dataclass
class Figure:
    section: str
    name: str
    value: float | None  # None: could not be measured here (see note)
    unit: str = ""
    digits: int = 1
    target: tuple[str, float] | None = None  # ("<=", 1.5)
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.target is None:
            return ""
        if self.value is None:
            return "n/a"
        op, limit = self.target
        return "PASS" if OPS[op](self.value, limit) else "FAIL"

    def measured(self) -> str:
        if self.value is None:
            return "n/a"
        return f"{self.value:,.{self.digits}f}{(' ' + self.unit) if self.unit else ''}"

    def target_text(self) -> str:
        if self.target is None:
            return "—"
        op, limit = self.target
        return f"{op.replace('<=', '≤').replace('>=', '≥')} {limit:g}{(' ' + self.unit) if self.unit else ''}"


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} CPUs ({model or platform.machine()}), {platform.system()} {platform.release()}, "
            f"Python {sys.version.split()[0]}")


def table(figures: list[Figure], markdown: bool) -> str:
    rows = [(f.section, f.name, f.measured(), f.target_text(), f.verdict, f.note) for f in figures]
    head = ("section", "figure", "measured", "target", "result", "note")
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head) - 1)]
    out = []
    for r in [head, *rows]:
        cells = [str(c).ljust(w) for c, w in zip(r[:-1], widths)]
        out.append("  ".join(cells) + ("  " + r[-1] if r[-1] else ""))
    return "\n".join(out)


def header(started: float, load_start: str, load_end: str, sections: list[str], quick: bool) -> str:
    return (f"pvgate benchmark suite, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, "
            f"{time.time() - started:.0f} s; sections: {' '.join(sections)}{' (--quick)' if quick else ''}\n"
            f"machine: {machine()}; load average {load_start} at the start, {load_end} at the end")
