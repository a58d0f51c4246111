"""`pvgate status` as text: the agent's snapshot as tables a technician reads on an 80-column
terminal, in the current language (agent/i18n.py)."""

from __future__ import annotations

import time
import unicodedata
from typing import Any

from agent.i18n import _


def _ago(ts_ms: int | None, now_ms: int) -> str:
    if not ts_ms:
        return _("never")
    return _("{duration} ago").format(duration=_duration(max(0, now_ms - ts_ms) / 1000))


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{seconds:.0f}s" if seconds >= 1 or seconds == 0 else f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _mb(n: int | float | None) -> str:
    return f"{(n or 0) / 1048576:.1f} MB"  # MiB, as max_mb in the site file


def _width(text: str) -> int:
    """Terminal columns: a Chinese character (a heading, a site or device name) takes two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(_width(h), *(_width(r[i]) for r in rows)) if rows else _width(h) for i, h in enumerate(headers)]
    return ["  ".join(c + " " * (w - _width(c)) for c, w in zip(r, widths)).rstrip() for r in [headers, *rows]]


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _process_line(pr: dict[str, Any]) -> list[str]:
    if not pr:
        return []
    return [_("process {rss} resident, {fds} open files, {threads} threads, {tasks} asyncio tasks").format(
        rss=_mb(pr.get("rss_bytes")), fds=pr.get("fds"), threads=pr.get("threads"), tasks=pr.get("tasks"))]


def format_status(st: dict[str, Any], values: bool = True) -> str:
    """The status reply as a table a technician can read on an 80-column terminal, in the current language."""
    now = int(st.get("ts") or time.time() * 1000)
    lines = _head_lines(st) + _process_line(st.get("process") or {})
    lines.append("")
    link_rows = []
    for lid, ln in sorted(st.get("links", {}).items()):
        link_rows.append([lid, str(ln.get("type", "")), str(ln.get("endpoint", "")),
                          _("yes") if ln.get("connected") else _("no"), str(ln.get("transactions", 0)),
                          str(ln.get("errors", 0)), str(ln.get("timeouts", 0)),
                          f"{float(ln.get('mean_response_ms', 0.0)):.1f}"])
    lines += _table([_("LINK"), _("TYPE"), _("ENDPOINT"), _("CONNECTED"), _("TRANSACTIONS"), _("ERRORS"),
                     _("TIMEOUTS"), _("MEAN MS")], link_rows)
    lines.append("")
    dev_rows = []
    devices = st.get("devices", {})
    for did, d in sorted(devices.items()):
        dev_rows.append([did, str(d.get("link", "")), str(d.get("unit", "")), str(d.get("profile", "")),
                         f"{float(d.get('interval_s', 0)):g}s", str(d.get("state", "")),
                         _ago(d.get("last_good_ts"), now), str(d.get("consecutive_failures", 0)),
                         f"{d.get('polls', 0)}/{d.get('failed_polls', 0)}", str(d.get("overruns", 0))])
    lines += _table([_("DEVICE"), _("LINK"), _("UNIT"), _("PROFILE"), _("EVERY"), _("STATE"), _("LAST GOOD"),
                     _("FAILS"), _("POLLS/FAILED"), _("OVERRUNS")], dev_rows)
    if values:
        for did, d in sorted(devices.items()):
            vals = d.get("values") or {}
            if not vals:
                continue
            lines.append("")
            lines.append(_("{device}: last values ({ago})").format(device=did, ago=_ago(d.get("last_good_ts"), now)))
            units = d.get("units") or {}
            rows = [[f"  {k}", _fmt_value(v), str(units.get(k, ""))] for k, v in vals.items()]
            lines += [r for r in _table(["", "", ""], rows)[1:]]
    return "\n".join(lines)


def _head_lines(st: dict[str, Any]) -> list[str]:
    """The agent, its uplink, buffer, clock and watchdog: one line each."""
    lines = [_("pvgate {version}  site {site} ({name})  pid {pid}  up {uptime}  {state}").format(
                 version=st.get("version", "?"), site=st.get("site", "?"), name=st.get("name", ""),
                 pid=st.get("pid", "?"), uptime=_duration(float(st.get("uptime_s", 0))), state=st.get("state", "")),
             _("config  {file} (reloads: {reloads})").format(file=st.get("config", "?"), reloads=st.get("reloads", 0))]
    mq = st.get("mqtt", {})
    lines.append(_("mqtt    {host}:{port}{tls}  {connected}  {messages} messages, {acked} rows acknowledged, "
                   "{connects} connects").format(
        host=mq.get("host"), port=mq.get("port"), tls=" TLS" if mq.get("tls") else "",
        connected=_("connected") if mq.get("connected") else _("NOT CONNECTED"), messages=mq.get("messages", 0),
        acked=mq.get("acked_rows", 0), connects=mq.get("connects", 0)))
    b = st.get("buffer", {})
    lines.append(_("buffer  {unsent} unsent (oldest {oldest}), last seq {seq}, {rows} rows, {size} of {budget}, "
                   "dropped {dropped} unsent / {memory} in memory, disk free {free}").format(
        unsent=b.get("unsent", 0), oldest=_duration(float(b.get("oldest_unsent_age_s", 0))), seq=b.get("last_seq", 0),
        rows=b.get("rows", 0), size=_mb(b.get("size_bytes")), budget=_mb(b.get("budget_bytes")),
        dropped=b.get("dropped_unsent", 0), memory=b.get("memory_dropped", 0), free=_mb(st.get("disk_free_bytes"))))
    ck = st.get("clock") or {}
    if ck:
        trusted = _("trusted") if ck.get("trusted") else _("NOT TRUSTED (readings flagged clock:unsynced)")
        sync = {True: _("synchronised"), False: _("not synchronised"), None: _("sync unknown")}[ck.get("synchronised")]
        lines.append(_("clock   {trusted}, {sync}, {steps} steps, {restamped} readings re-stamped").format(
            trusted=trusted, sync=sync, steps=ck.get("steps", 0), restamped=ck.get("restamped_rows", 0)))
        offsets = ck.get("device_offsets_ms") or {}
        if offsets:
            lines.append(_("        device clocks: {offsets}").format(
                offsets=", ".join(f"{d} {o / 1000:+.0f} s" for d, o in sorted(offsets.items()))))
    wd = st.get("watchdog", {})
    if wd.get("enabled"):
        stalled = wd.get("stalled") or []
        lines.append(_("watchdog  STALLED: {tasks}").format(tasks=", ".join(stalled)) if stalled else _("watchdog  ok"))
    return lines
