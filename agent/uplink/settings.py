"""The uplink's settings as plain values: what the publisher and the TLS loader need, no more.

The site file's loader (agent.config) builds these; the uplink never reads the site file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from drivers.model import Device


@dataclass(frozen=True)
class TlsConfig:
    ca_file: str
    cert_file: str | None
    key_file: str | None
    key_password: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class MqttConfig:
    host: str
    port: int
    topic_prefix: str
    tls: TlsConfig | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    client_id: str = ""
    keepalive: int = 60
    batch_max: int = 200  # readings per data message
    inflight: int = 50  # QoS 1 messages awaiting PUBACK (paho is happiest at 20-100)
    protocol: str = "5"  # "5" (reason codes, Maximum Packet Size) or "3.1.1"
    # Every PUBLISH packet (payload, topic and header) stays at or below this: ThingsBoard's MQTT
    # transport takes 65536 bytes by default, AWS IoT 128 KiB (docs/mqtt.md, "Size limits").
    max_message_kb: float = 64.0
    # Resend (cmd/resend) bytes per minute: a day's resend must not eat a metered 4G plan.
    resend_kb_per_min: float = 256.0


@dataclass(frozen=True)
class UplinkConfig:
    """Everything the publisher uses: the broker, the site's topics, the devices it announces."""

    site_id: str
    mqtt: MqttConfig
    devices: tuple[Device, ...]
    health_interval_s: float = 60.0
    source: str = ""  # the site file, for error messages
