"""Chinese and English: the catalogs match their sources, every marked message is translated, and
the language follows the site file, then the locale."""

from __future__ import annotations

import gettext
import re
import string
from pathlib import Path

import pytest
from babel.messages.extract import extract_from_dir
from babel.messages.pofile import read_po

from agent import i18n

ROOT = Path(__file__).resolve().parents[1]
PO = ROOT / "agent/locale/zh_CN/LC_MESSAGES/pvgate.po"
KEYWORDS = {"_": None, "N_": None, "ngettext": (1, 2), "plural": (1, 2)}


def catalog() -> object:
    with PO.open("rb") as f:
        return read_po(f, locale="zh_CN")


def marked_messages() -> set[str]:
    """Every message the code marks for translation, as `./dev i18n` extracts them (agent/ and drivers/)."""
    found: set[str] = set()
    for top in ("agent", "drivers"):
        for _file, _line, message, _comments, _ctx in extract_from_dir(str(ROOT / top), keywords=KEYWORDS):
            found.add(message if isinstance(message, str) else message[0])
    return found


def fields(text: str) -> list[str]:
    """The placeholders of a str.format message ({name}, {n:.1f}) and %-style ones, in order of name."""
    names = [name for _lit, name, _spec, _conv in string.Formatter().parse(text) if name is not None]
    return sorted(names + re.findall(r"%\(\w+\)[sdif]|%[sdif]", text))


def test_the_compiled_catalog_is_the_source() -> None:
    """pvgate.mo is what `./dev i18n` makes of pvgate.po: edit the .po, then run it."""
    trans = gettext.translation(i18n.DOMAIN, i18n.LOCALE_DIR, languages=["zh_CN"])
    for msg in catalog():  # type: ignore[attr-defined]
        if not msg.id or not msg.string:
            continue
        if isinstance(msg.id, tuple):
            assert trans.ngettext(msg.id[0], msg.id[1], 1) == msg.string[0], msg.id
        else:
            assert trans.gettext(msg.id) == msg.string, f"pvgate.mo is stale for {msg.id!r}: run ./dev i18n"


def test_every_marked_message_is_translated_with_the_same_placeholders() -> None:
    cat = catalog()
    missing, broken = [], []
    for text in sorted(marked_messages()):
        msg = cat.get(text)  # type: ignore[attr-defined]
        target = None if msg is None else (msg.string[0] if isinstance(msg.string, tuple) else msg.string)
        if not target:
            missing.append(text)
        elif fields(text) != fields(target):
            broken.append((text, target))
    assert not missing, f"untranslated (run ./dev i18n, then translate in {PO.name}): {missing[:10]}"
    assert not broken, f"placeholders differ between English and Chinese: {broken[:5]}"


@pytest.mark.parametrize(("tag", "lang"), [
    ("zh_CN.UTF-8", "zh-CN"), ("zh-CN", "zh-CN"), ("zh", "zh-CN"), ("zh-Hans", "zh-CN"),
    ("en_US.UTF-8", "en"), ("en", "en"), ("C", None), ("POSIX", None), ("de_DE", None), ("", None),
])
def test_normalize(tag: str, lang: str | None) -> None:
    assert i18n.normalize(tag) == lang


@pytest.mark.parametrize(("env", "lang"), [
    ({}, "en"),
    ({"LANG": "zh_CN.UTF-8"}, "zh-CN"),
    ({"LANG": "zh_CN.UTF-8", "LC_ALL": "C"}, "en"),  # LC_ALL wins over LANG, as for gettext
    ({"LANGUAGE": "fr:zh_CN", "LANG": "en_US.UTF-8"}, "zh-CN"),  # the first known of LANGUAGE's list
    ({"LC_MESSAGES": "zh_CN.UTF-8", "LANG": "en_US.UTF-8"}, "zh-CN"),
])
def test_the_locale_picks_the_language(env: dict[str, str], lang: str) -> None:
    assert i18n.from_environment(env) == lang


def test_the_site_file_forces_a_language(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LANG", "en_US.UTF-8")
    monkeypatch.delenv("LANGUAGE", raising=False)
    monkeypatch.delenv("LC_ALL", raising=False)
    monkeypatch.delenv("LC_MESSAGES", raising=False)
    try:
        assert i18n.set_language("zh-CN") == "zh-CN"
        assert i18n.language() == "zh-CN"
        assert i18n.set_language(None) == "en"
    finally:
        i18n.set_language(None)


def test_a_message_without_translation_stays_english() -> None:
    i18n.set_language("zh-CN")
    try:
        assert i18n._("no such message in any catalog") == "no such message in any catalog"
    finally:
        i18n.set_language(None)
