"""The project's error hierarchy; every error we raise on purpose derives from PvgateError."""

from __future__ import annotations

from dataclasses import dataclass


class PvgateError(Exception):
    """Root of the errors pvgate raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One configuration mistake, located for the technician."""

    file: str
    line: int  # 1-based; 0 when the whole file is concerned
    path: str  # key path such as devices[2].profile
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(PvgateError):
    """A site file or device map is wrong; carries every problem found, not just the first."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class LinkError(PvgateError):
    """A link (serial port, socket) could not be opened or broke."""


class DeviceError(PvgateError):
    """A device did not answer, or answered with a Modbus exception."""

    def __init__(self, message: str, exception_code: int | None = None) -> None:
        super().__init__(message)
        self.exception_code = exception_code


class DecodeError(PvgateError):
    """Registers could not be turned into a value; spoils one point, never the poll."""


class StorageError(PvgateError):
    """The local buffer failed in a way the caller must handle (disk full, corruption)."""


class PublishError(PvgateError):
    """Something on the MQTT side failed."""
