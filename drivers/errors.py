"""The project's error hierarchy; every error we raise on purpose derives from PvgateError."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class PvgateError(Exception):
    """Root of the errors pvgate raises on purpose."""


def N_(message: str) -> str:
    """Marks an English message template for the catalog (`./dev i18n` extracts drivers/ too).

    drivers/ must not import agent/, so it never translates: it keeps the template and its
    parameters (:class:`Msg`), and agent/ translates them where a person reads them."""
    return message


def _english(message: str) -> str:
    return message


class Msg:
    """A message as an English str.format template and its parameters, translated late.

    str() is the English text, the same as an f-string would give (logs, tests and exceptions
    stay English); render(translate) gives it in the reader's language. A parameter may be a Msg
    itself (a fragment such as "a whole number"), rendered in the same language."""

    __slots__ = ("template", "params")

    def __init__(self, template: str, **params: Any) -> None:
        self.template = template
        self.params = params

    def render(self, translate: Callable[[str], str] = _english) -> str:
        text = translate(self.template)
        if not self.params:
            return text  # not a template: braces in it are literal
        args = {k: v.render(translate) if isinstance(v, Msg) else v for k, v in self.params.items()}
        try:
            return text.format(**args)
        except (KeyError, IndexError, ValueError):
            # A broken translation must not hide the problem: English says it.
            return self.template.format(**args)

    def __str__(self) -> str:
        return self.render()

    def __repr__(self) -> str:
        return f"Msg({self.template!r}, **{self.params!r})"


@dataclass(frozen=True)
class Problem:
    """One configuration mistake, located for the technician."""

    file: str
    line: int  # 1-based; 0 when the whole file is concerned
    path: str  # key path such as devices[2].profile
    message: str  # English, as logs and tests read it
    # The message as template and parameters, for a translated display; None: English only.
    msg: Msg | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, file: str, line: int, path: str, msg: Msg) -> Problem:
        return cls(file, line, path, str(msg), msg)

    def __str__(self) -> str:
        return self.text()

    def text(self, translate: Callable[[str], str] = _english) -> str:
        """The located problem, its message in the language of translate."""
        message = self.msg.render(translate) if self.msg is not None else self.message
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path}: {message}" if self.path else f"{where}: {message}"


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
