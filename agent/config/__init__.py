"""The site file (Contract 1): loaded, checked and turned into typed objects.

Owns: the site file's sections and their checks (every problem with file:line), the typed
:class:`SiteConfig`. May import: uplink/ (its settings types, and its TLS loader to check key
material the way the publisher will use it), store/, the agent's base modules and drivers/.
"""

from agent.config.model import (
    DEFAULT_SITE_FILE,
    DEFAULT_STATE_DIR,
    EX_CONFIG,
    AgentConfig,
    BufferConfig,
    SiteConfig,
    SiteInfo,
    StatusPageConfig,
)
from agent.config.site import format_problems, load_site, site_language
from agent.uplink.settings import MqttConfig, TlsConfig

__all__ = ["DEFAULT_SITE_FILE", "DEFAULT_STATE_DIR", "EX_CONFIG", "AgentConfig", "BufferConfig", "MqttConfig", "SiteConfig", "SiteInfo", "StatusPageConfig",
           "TlsConfig", "format_problems", "load_site",
           "site_language"]
