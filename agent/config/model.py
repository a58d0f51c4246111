"""The typed site file: what the loader (agent.config.site) builds and the rest of the agent reads."""

from __future__ import annotations

from dataclasses import dataclass

from agent.uplink.settings import MqttConfig, UplinkConfig
from drivers.model import Device, Link

EX_CONFIG = 78  # sysexits.h EX_CONFIG: what systemd and the technician see for a bad site file
DEFAULT_STATE_DIR = "/var/lib/pvgate"
DEFAULT_SITE_FILE = "/etc/pvgate/site.yaml"  # where systemd/install.sh puts it; every -c defaults to it


@dataclass(frozen=True)
class SiteInfo:
    id: str
    name: str
    timezone: str
    capacity_kwp: float | None
    lat: float | None = None  # site.location: sunrise and sunset for night mode
    lon: float | None = None
    # site.meter_tolerance: the share by which the meter's export may differ from the inverters'
    # sum in a day before the daily report flags it (docs/energy.md)
    meter_tolerance: float = 0.05
    # site.language: the language of what people read (check, status, the status page, the
    # acceptance report); None follows the locale (agent/i18n.py)
    language: str | None = None


@dataclass(frozen=True)
class BufferConfig:
    path: str
    max_mb: float = 1024.0
    keep_sent_days: float = 7.0
    commit_interval_s: float = 1.0
    min_free_mb: float = 64.0


@dataclass(frozen=True)
class AgentConfig:
    state_dir: str
    health_interval_s: float = 60.0
    log_level: str = "INFO"
    # kernel: the clock is trusted when the kernel says it is synchronised (NTP, chrony, timesyncd);
    # assume: trusted whenever it is past the release date (a battery RTC set by the technician).
    clock_sync: str = "kernel"


@dataclass(frozen=True)
class StatusPageConfig:
    """status_page: the read-only web page on the gateway's LAN (off unless the section is there)."""
    host: str = "127.0.0.1"
    port: int = 8080
    # basic auth from status_page.auth_file ("user:password", owner/group-only); None: no login
    username: str | None = None
    password: str | None = None


@dataclass(frozen=True)
class SiteConfig:
    file: str
    site: SiteInfo
    mqtt: MqttConfig
    buffer: BufferConfig
    agent: AgentConfig
    links: tuple[Link, ...]
    devices: tuple[Device, ...]
    status_page: StatusPageConfig | None = None

    def link(self, link_id: str) -> Link:
        return next(link for link in self.links if link.id == link_id)

    def devices_on(self, link_id: str) -> list[Device]:
        return [d for d in self.devices if d.link == link_id]

    def uplink(self) -> UplinkConfig:
        """The publisher's settings: the broker, the site's topics and the devices it announces."""
        return UplinkConfig(self.site.id, self.mqtt, self.devices, self.agent.health_interval_s, self.file)
