"""The long-running pvgate service: config, scheduling, polling, buffer, publishing, CLI."""

__version__ = "0.1.0"
