"""YAML that remembers where each value came from, and a checker that reports by file:line.

Technicians edit these files by hand, so every mistake must point at the line to fix. PyYAML
does the parsing; this module keeps line numbers, refuses duplicate keys (YAML silently keeps
the last one) and collects every problem of a file before reporting.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml

from drivers.errors import N_, ConfigError, Msg, Problem

T = TypeVar("T")


class LDict(dict[str, Any]):
    """A mapping with the line of the mapping and of each of its keys."""

    line: int = 0
    key_lines: dict[str, int]
    duplicates: list[tuple[str, int]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Set here, not only by the YAML constructor: an LDict made in code (an empty file's
        # stand-in, a point built from an identity entry) must not fail on a missing attribute.
        self.key_lines = {}
        self.duplicates = []


class LList(list[Any]):
    """A sequence with the line of the sequence and of each item."""

    line: int = 0
    item_lines: list[int]

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.item_lines = []


_BOOL, _INT, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 (core schema) scalars, as a technician reads them.

    PyYAML implements YAML 1.1, where ``yes``/``no``/``on``/``off`` are booleans, ``0100`` is octal
    64 and ``1:00`` is sexagesimal 60. Here only true/false are booleans (the rest stay text, and
    the Checker names them where a boolean is wanted), ``1:00`` is text, and a decimal with a
    leading zero is refused as ambiguous (octal to YAML 1.1, hex in many a manual).
    """

    # Every implicit resolver but YAML 1.1's bool, int and float; the 1.2 ones are added below.
    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _INT, _FLOAT)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def __init__(self, stream: str) -> None:
        self.number_problems: list[tuple[int, Msg]] = []
        self.aliases = 0
        super().__init__(stream)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        # An "alias bomb" (lists of aliases of lists of aliases...) is tiny on disk and huge in
        # memory once walked; a hand-written file needs a few aliases, never thousands.
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise yaml.composer.ComposerError(
                    None, None, f"more than {MAX_ALIASES} aliases (*name); write the values out",
                    self.peek_event().start_mark)  # type: ignore[no-untyped-call]
        return super().compose_node(parent, index)


_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    _INT, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789")
)
_Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+.0123456789"),
)
_LEADING_ZERO = re.compile(r"^[-+]?0[0-9]+$")
MAX_ALIASES = 200
MAX_DIGITS = 40  # far beyond any register, unit or size; int() itself refuses 4300
MAX_FILE_BYTES = 4 * 1024 * 1024  # a site file is a few KB, the largest device map ~100 KB


def _bool(loader: _Loader, node: yaml.ScalarNode) -> bool:
    return str(loader.construct_scalar(node)).lower() == "true"


def _int(loader: _Loader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node))
    if len(text) > MAX_DIGITS:
        loader.number_problems.append((node.start_mark.line + 1, Msg(
            N_("a number of {digits} digits; nothing here needs more than {most}"),
            digits=len(text), most=MAX_DIGITS)))
        return 0
    if text.startswith(("0x", "0o")):
        return int(text[2:], 16 if text[1] == "x" else 8)
    if _LEADING_ZERO.match(text):
        digits = text.lstrip("+-")
        octal = set(digits) <= set("01234567")
        loader.number_problems.append((node.start_mark.line + 1, Msg(
            N_("{text}: a number with a leading zero is ambiguous (YAML 1.1 tools read it as octal {octal}, a manual "
               "may mean hex); write {decimal}, or 0x{digits} if it is hex") if octal else
            N_("{text}: a number with a leading zero is ambiguous (YAML 1.1 tools read it, a manual may mean hex); "
               "write {decimal}, or 0x{digits} if it is hex"),
            text=text, octal=int(digits, 8) if octal else 0, decimal=int(text), digits=digits)))
    return int(text)


def _float(loader: _Loader, node: yaml.ScalarNode) -> float:
    text = str(loader.construct_scalar(node)).lower()
    if text.lstrip("+-") == ".inf":
        return float("-inf") if text.startswith("-") else float("inf")
    return float("nan") if text == ".nan" else float(text)


_Loader.add_constructor(_BOOL, _bool)
_Loader.add_constructor(_INT, _int)
_Loader.add_constructor(_FLOAT, _float)


def _mapping(loader: _Loader, node: yaml.MappingNode) -> LDict:
    loader.flatten_mapping(node)
    out = LDict()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    out.duplicates = []
    for key_node, value_node in node.value:
        line = key_node.start_mark.line + 1
        if not isinstance(key_node, yaml.ScalarNode):
            loader.number_problems.append((line, Msg(N_("a key cannot be a list or a mapping"))))
            continue
        key = str(loader.construct_object(key_node, deep=True))
        if key in out:
            out.duplicates.append((key, line))
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = line
    return out


def _sequence(loader: _Loader, node: yaml.SequenceNode) -> LList:
    out = LList(loader.construct_object(child, deep=True) for child in node.value)
    out.line = node.start_mark.line + 1
    out.item_lines = [child.start_mark.line + 1 for child in node.value]
    return out


_Loader.add_constructor("tag:yaml.org,2002:map", _mapping)
_Loader.add_constructor("tag:yaml.org,2002:seq", _sequence)


# What a technician can do about PyYAML's terse parser messages.
_YAML_HINTS = (
    ("'\\t'", N_("indent with spaces, not tabs")),
    ("mapping values are not allowed", N_("a ':' inside a value? put the value in quotes; else check the indentation")),
    ("expected <block end>", N_("check this line's indentation against the lines above")),
    ("while scanning a quoted scalar", N_("a quote is not closed")),
    ("while parsing a flow", N_("a [ or {brace} is not closed, or a ',' is missing")),
    ("found unhashable key", N_("a key cannot be a list or a mapping")),
)


def load_text(text: str, file: str) -> Any:
    """Parse YAML text; syntax errors become a ConfigError naming file:line."""
    loader: _Loader | None = None
    try:
        loader = _Loader(text)
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as err:
        raise ConfigError([_syntax_problem(err, text, file)]) from err
    except yaml.reader.ReaderError as err:
        code = ord(err.character) if isinstance(err.character, str) else int(err.character)
        raise ConfigError([Problem.of(file, text.count("\n", 0, err.position) + 1, "", Msg(N_(
            "not valid YAML: character U+{code:04X} is not allowed (binary data? a control character?)"),
            code=code))]) from err
    except yaml.YAMLError as err:
        raise ConfigError([Problem.of(file, 1, "", Msg(N_("not valid YAML: {problem}"), problem=str(err)))]) from err
    except RecursionError as err:
        line = loader.line + 1 if loader is not None else 1
        raise ConfigError([Problem.of(file, line, "", Msg(N_(
            "nested too deeply (brackets or indentation); a site file or device map is a few levels deep")))]) from err
    finally:
        if loader is not None:
            loader.dispose()
    if loader.number_problems:
        raise ConfigError([Problem.of(file, line, "", msg) for line, msg in loader.number_problems])
    return data


def _syntax_problem(err: yaml.MarkedYAMLError, text: str, file: str) -> Problem:
    end = len(text.rstrip())
    last_line = max(1, text.count("\n", 0, end) + 1)
    mark = err.problem_mark or err.context_mark
    # An unclosed quote or bracket is only noticed at the end of the file; the line to fix is
    # where it was opened (the context), not the end of the file.
    if (err.problem_mark is not None and err.problem_mark.index >= end
            and err.context_mark is not None and err.context_mark.index < end):
        mark = err.context_mark
    line = min(mark.line + 1, last_line) if mark is not None else 0
    # PyYAML's own words (err.problem, err.context) stay English; what pvgate adds is translated.
    message = Msg(N_("not valid YAML: {problem}"), problem=str(err.problem or err))
    if err.context and err.context_mark is not None and err.context_mark is not mark:
        message = Msg(N_("{message} ({context} at line {line})"), message=message, context=err.context,
                      line=min(err.context_mark.line + 1, last_line))
    found = f"{err.problem or ''} {err.context or ''}"
    hints = [hint for needle, hint in _YAML_HINTS if needle in found]
    if hints:
        message = Msg(N_("{message}; {hint}"), message=message, hint=Msg(hints[0], brace="{"))
    return Problem.of(file, line, "", message)


def load_file(path: Path) -> Any:
    try:
        if path.is_file() and path.stat().st_size > MAX_FILE_BYTES:
            raise ConfigError([Problem.of(str(path), 0, "", Msg(N_(
                "{size} bytes: far too large for a site file or device map (at most {most} MiB); is it the right file?"),
                size=path.stat().st_size, most=MAX_FILE_BYTES // 1048576))])
        data = path.read_bytes()
    except FileNotFoundError as err:
        raise ConfigError([Problem.of(str(path), 0, "", Msg(N_("file not found")))]) from err
    except IsADirectoryError as err:
        raise ConfigError([Problem.of(str(path), 0, "", Msg(N_("is a directory, not a file")))]) from err
    except OSError as err:
        raise ConfigError([Problem.of(str(path), 0, "", Msg(N_("cannot read: {reason}"),
                                                             reason=str(err.strerror or err)))]) from err
    try:
        # utf-8-sig: Windows Notepad starts UTF-8 files with a byte-order mark.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        # Chinese Windows editors save GBK by default; name the line and the way out.
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError([Problem.of(str(path), line, "", Msg(N_(
            "not UTF-8 text (byte 0x{byte:02x}); save the file as UTF-8 (e.g. Notepad: Save as, Encoding UTF-8)"),
            byte=data[err.start]))]) from err
    return load_text(text, str(path))


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float | None:
    """'10s', '500ms', '1m', '2h' or a number of seconds; None when it is none of those."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and (m := _DURATION.match(value)):
        return float(m.group(1)) * _UNIT_S[m.group(2)]
    return None


class Checker:
    """Reads values out of LDict/LList trees and collects located problems."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[Problem] = []

    def problem(self, line: int, path: str, message: str | Msg, **params: Any) -> None:
        """A problem at line; message is an English template (marked N_) filled from params, or a Msg."""
        msg = message if isinstance(message, Msg) else Msg(message, **params)
        self.problems.append(Problem.of(self.file, line, path, msg))

    def raise_if_any(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)

    def mapping(self, node: Any, path: str, line: int, allowed: Iterable[str]) -> LDict | None:
        """node as a mapping whose keys are all allowed; None (and a problem) otherwise."""
        if not isinstance(node, LDict):
            self.problem(line, path, N_("expected a mapping, got {got}"), got=_kind(node))
            return None
        allowed = tuple(allowed)
        for key, kline in node.duplicates:
            self.problem(kline, _join(path, key), N_("duplicate key (YAML would keep only the last)"))
        for key in node:
            if key not in allowed:
                # Most unknown keys are typos ("adress", "baud_rate"): name the likely one.
                close = difflib.get_close_matches(key.lower(), allowed, n=1, cutoff=0.7)
                msg = (N_("unknown key; did you mean {guess!r}? allowed here: {allowed}") if close
                       else N_("unknown key; allowed here: {allowed}"))
                self.problem(node.key_lines.get(key, node.line), _join(path, key), msg,
                             guess=close[0] if close else "", allowed=", ".join(allowed))
        return node

    def sequence(self, node: Any, path: str, line: int) -> Iterator[tuple[int, Any, int]]:
        """(index, item, line) of a sequence; a problem if node is not one."""
        if not isinstance(node, LList):
            self.problem(line, path, N_("expected a list, got {got}"), got=_kind(node))
            return
        yield from ((i, item, node.item_lines[i]) for i, item in enumerate(node))

    def line_of(self, node: LDict, key: str) -> int:
        return node.key_lines.get(key, node.line)

    def get(
        self,
        node: LDict,
        key: str,
        path: str,
        kind: type[T] | tuple[type, ...],
        default: T | None = None,
        required: bool = False,
        expected: str | Msg = "",
    ) -> Any:
        """node[key] checked against kind; default when absent; a problem when wrong."""
        if key not in node:
            if required:
                self.problem(node.line, _join(path, key), N_("required key is missing"))
            return default
        value = node[key]
        ok = isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, float))
        if kind == float and isinstance(value, int) and not isinstance(value, bool):
            ok, value = True, float(value)
        if not ok:
            want = expected or _kind_name(kind)
            self.problem(node.key_lines[key], _join(path, key), N_("expected {want}, got {got}{hint}"),
                         want=want, got=_kind(value), hint=_hint(kind, value))
            return default
        return value

    def choice(
        self, node: LDict, key: str, path: str, choices: Iterable[str], default: str | None
    ) -> str | None:
        choices = tuple(choices)
        value = self.get(node, key, path, str, default, expected=Msg(N_("one of {choices}"), choices=", ".join(choices)))
        if value is not None and value not in choices:
            self.problem(self.line_of(node, key), _join(path, key),
                         N_("{value!r} is not allowed; expected one of {choices}"),
                         value=value, choices=", ".join(choices))
            return default
        return value  # type: ignore[no-any-return]

    def duration(
        self, node: LDict, key: str, path: str, default: float, minimum: float = 0.0
    ) -> float:
        if key not in node:
            return default
        seconds = parse_duration(node[key])
        if seconds is None or seconds < minimum:
            msg = (N_("expected a duration such as 10s, 500ms or 1m (at least {minimum:g}s), got {value!r}; "
                      "h:mm or m:ss is not read as a duration, write 60s or 1m") if isinstance(node[key], str)
                   and ":" in node[key] else
                   N_("expected a duration such as 10s, 500ms or 1m (at least {minimum:g}s), got {value!r}"))
            self.problem(node.key_lines[key], _join(path, key), msg, minimum=minimum, value=node[key])
            return default
        return seconds


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: Any) -> Msg:
    if value is None or isinstance(value, (dict, list)):
        return Msg(N_("nothing") if value is None else N_("a mapping") if isinstance(value, dict) else N_("a list"))
    if isinstance(value, bool):
        return Msg(N_("true/false ({value!r})"), value=value)
    kinds = {str: N_("text {value!r}"), int: N_("int {value!r}"), float: N_("float {value!r}")}
    return Msg(kinds.get(type(value), "{type} {value!r}"), type=type(value).__name__, value=value)


_YAML11_BOOLS = frozenset({"yes", "no", "on", "off", "y", "n"})


def _hint(kind: type | tuple[type, ...], value: Any) -> Msg | str:
    """The way out of YAML 1.1 habits: yes/no/on/off are text here."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if bool in kinds and isinstance(value, str) and value.lower() in _YAML11_BOOLS:
        return Msg(N_("; write true or false ({value!r} is text in YAML 1.2, which pvgate reads)"), value=value)
    return ""


_KIND_NAMES = {str: N_("text"), int: N_("a whole number"), float: N_("a number"), bool: N_("true or false")}


def _kind_name(kind: type | tuple[type, ...]) -> Msg:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    out: Msg | None = None
    for k in kinds:
        name = Msg(_KIND_NAMES.get(k, k.__name__))
        out = name if out is None else Msg(N_("{first} or {second}"), first=out, second=name)
    return out or Msg("")
