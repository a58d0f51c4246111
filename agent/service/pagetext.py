"""The words of the status page (agent/service/page.html), marked for the catalog.

The page is rendered once per language: headings are filled in by the server, and the labels its
script needs are handed to it as a JSON object, so the browser never fetches a catalog. A key is
what the template (``{{t:key}}``) and the script (``T.key``) use; device states are keyed
``state_<state>``, and a state the agent reports that has no label here is shown as it is.
"""

from __future__ import annotations

import html
import json
from typing import Final

from agent.i18n import N_, translator

LABELS: Final[dict[str, str]] = {
    "title": N_("Station status"),
    "station": N_("Station"),
    "devices": N_("Devices"),
    "links": N_("Links"),
    "todays_power": N_("Today's power"),
    "device": N_("Device"),
    "state": N_("State"),
    "last_poll": N_("Last poll"),
    "power": N_("Power"),
    "energy_today": N_("Today's energy"),
    "link": N_("Link"),
    "unit": N_("Unit address"),
    "polls": N_("Polls / failed"),
    "state_online": N_("online"),
    "state_offline": N_("offline"),
    "state_asleep": N_("asleep"),
    "state_unknown": N_("not yet polled"),
    "devices_online": N_("Devices online"),
    "station_power": N_("Station power"),
    "uplink": N_("Uplink (MQTT)"),
    "connected": N_("connected"),
    "not_connected": N_("not connected"),
    "connected_h": N_("Connected"),
    "buffer": N_("Buffer"),
    "unsent": N_("{0} unsent"),
    "oldest_unsent": N_("oldest unsent {0}"),
    "clock": N_("Clock"),
    "trusted": N_("trusted"),
    "not_trusted": N_("NOT trusted: readings are flagged"),
    "synchronised": N_("synchronised"),
    "not_synchronised": N_("not synchronised"),
    "agent": N_("Agent"),
    "running": N_("running"),
    "reloading": N_("reloading"),
    "stopping": N_("stopping"),
    "up": N_("up {0}"),
    "type": N_("Type"),
    "endpoint": N_("Address"),
    "transactions": N_("Transactions"),
    "errors": N_("Errors"),
    "timeouts": N_("Timeouts"),
    "mean_response": N_("Mean response"),
    "bus_use": N_("Bus use"),
    "yes": N_("yes"),
    "no": N_("no"),
    "never": N_("never"),
    "ago": N_("{0} ago"),
    "sec": N_("s"),
    "min": N_("min"),
    "hour": N_("h"),
    "day": N_("d"),
    "updated": N_("Updated {0}"),
    "unreachable": N_("Cannot reach the agent; showing the last data received"),
    "no_data": N_("No power readings yet today"),
    "station_total": N_("Station total"),
    "every": N_("every {0}"),
    "read_only": N_("Read-only view; refreshes by itself"),
}


def labels(lang: str) -> dict[str, str]:
    """Every label in `lang` (English where the catalog has none)."""
    gettext = translator(lang).gettext
    return {key: gettext(text) for key, text in LABELS.items()}


def render(template: str, lang: str) -> str:
    """The page in one language: {{lang}}, {{t:key}} (HTML-escaped) and {{labels}} (JSON for the script)."""
    words = labels(lang)
    out = template.replace("{{lang}}", lang)
    for key, text in words.items():
        out = out.replace("{{t:" + key + "}}", html.escape(text))
    # Inside <script type="application/json">: no "</" may close the element early.
    data = json.dumps(words, ensure_ascii=False).replace("</", "<\\/")
    return out.replace("{{labels}}", data)
