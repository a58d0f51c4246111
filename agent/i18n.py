"""Messages in Simplified Chinese and English: gettext catalogs under agent/locale/.

The source strings are English; agent/locale/zh_CN/LC_MESSAGES/pvgate.po holds their Chinese.
Which language a process speaks: the site file's `site.language` when it sets one (the
technician's choice wins over the box's locale), else the locale (LANGUAGE, LC_ALL, LC_MESSAGES,
LANG, as gettext reads them), else English. A message with no translation falls back to English,
never to an empty string. Machine-facing text (MQTT payloads, JSON, log lines a center greps) is
not translated: only what a person reads on a screen or on paper.

The catalogs are edited as .po and compiled to .mo with `./dev i18n` (Babel); a test checks that
the compiled catalog matches its source and that every marked message is translated.
"""

from __future__ import annotations

import gettext
import os
from pathlib import Path

DOMAIN = "pvgate"
LOCALE_DIR = Path(__file__).resolve().parent / "locale"
LANGUAGES = ("zh-CN", "en")  # what `site.language` accepts, as BCP 47 tags
DEFAULT = "en"
_ENV_KEYS = ("LANGUAGE", "LC_ALL", "LC_MESSAGES", "LANG")

_current = DEFAULT
_translations: dict[str, gettext.NullTranslations] = {}


def normalize(tag: str | None) -> str | None:
    """A BCP 47 tag or POSIX locale name as one of LANGUAGES, or None when it names neither.

    zh, zh-CN, zh_CN.UTF-8, zh-Hans, zh_SG -> zh-CN (Simplified); en, en_US.UTF-8 -> en;
    C, POSIX and anything else -> None."""
    if not tag:
        return None
    base = tag.split(".")[0].split("@")[0].replace("_", "-").lower()
    if base == "zh" or base.startswith(("zh-cn", "zh-hans", "zh-sg")):
        return "zh-CN"
    if base == "en" or base.startswith("en-"):
        return "en"
    return None


def from_environment(environ: dict[str, str] | None = None) -> str:
    """The language the locale asks for, as gettext reads the variables; English when none is ours."""
    env = os.environ if environ is None else environ
    for key in _ENV_KEYS:
        value = env.get(key)
        if not value:
            continue
        # LANGUAGE may list several, "zh_CN:en"; the first we know wins.
        for part in value.split(":") if key == "LANGUAGE" else [value]:
            lang = normalize(part)
            if lang:
                return lang
        if key != "LANGUAGE":
            return DEFAULT  # LC_ALL=C or an unknown language: gettext stops at the first one set
    return DEFAULT


def translator(lang: str) -> gettext.NullTranslations:
    """The catalog for one language (cached); English is the source text itself."""
    if lang not in _translations:
        if lang == "en":
            _translations[lang] = gettext.NullTranslations()
        else:
            _translations[lang] = gettext.translation(
                DOMAIN, LOCALE_DIR, languages=[lang.replace("-", "_")], fallback=True)
    return _translations[lang]


def set_language(lang: str | None) -> str:
    """Speak `lang` (one of LANGUAGES) from now on, or the locale's language when None."""
    global _current
    _current = normalize(lang) or from_environment()
    return _current


def language() -> str:
    return _current


def _(message: str) -> str:
    """The message in the current language."""
    return translator(_current).gettext(message)


def ngettext(singular: str, plural: str, n: int) -> str:
    return translator(_current).ngettext(singular, plural, n)


def N_(message: str) -> str:
    """Marks a message for the catalog where it is defined; it is translated where it is shown."""
    return message


set_language(None)
