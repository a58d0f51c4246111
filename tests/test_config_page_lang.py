"""The site file's status_page section and site.language: defaults, and each mistake with file:line."""

from __future__ import annotations

import os
from pathlib import Path

from test_config import BASE, edit, env, expect, write  # noqa: F401 (env is a fixture)

from agent.config import StatusPageConfig, load_site

PAGE = "\nstatus_page:\n  host: 0.0.0.0\n  port: 8088\n"


def test_no_section_no_page_and_the_locale_speaks(tmp_path: Path) -> None:
    site = load_site(write(tmp_path, BASE))
    assert site.status_page is None
    assert site.site.language is None


def test_page_and_language_as_written(tmp_path: Path) -> None:
    text = edit(BASE, "  timezone: Asia/Shanghai\n", "  timezone: Asia/Shanghai\n  language: zh-CN\n") + PAGE
    site = load_site(write(tmp_path, text))
    assert site.status_page == StatusPageConfig("0.0.0.0", 8088, None, None)
    assert site.site.language == "zh-CN"


def test_page_defaults_to_loopback(tmp_path: Path) -> None:
    site = load_site(write(tmp_path, BASE + "\nstatus_page: {port: 8090}\n"))
    assert site.status_page == StatusPageConfig("127.0.0.1", 8090, None, None)


def test_unknown_language(tmp_path: Path, env: dict[str, str]) -> None:  # noqa: F811
    text = edit(BASE, "  timezone: Asia/Shanghai\n", "  timezone: Asia/Shanghai\n  language: zh-TW\n")
    expect(write(tmp_path, text), env, (5, "site.language", "expected one of zh-CN, en"))


def test_bad_port_and_unknown_key(tmp_path: Path, env: dict[str, str]) -> None:  # noqa: F811
    text = BASE + "\nstatus_page:\n  port: 70000\n  listen: 0.0.0.0\n"
    expect(write(tmp_path, text), env, (32, "status_page.port", "1..65535"), (33, "status_page.listen", ""))


def test_auth_file_gives_the_login(tmp_path: Path) -> None:
    auth = tmp_path / "page.auth"
    auth.write_text("技术员:s3cret:with:colons\n", encoding="utf-8")
    os.chmod(auth, 0o640)
    site = load_site(write(tmp_path, BASE + PAGE + f"  auth_file: {auth}\n"))
    assert site.status_page == StatusPageConfig("0.0.0.0", 8088, "技术员", "s3cret:with:colons")


def test_auth_file_readable_by_all_is_refused(tmp_path: Path, env: dict[str, str]) -> None:  # noqa: F811
    auth = tmp_path / "page.auth"
    auth.write_text("tech:pw\n", encoding="utf-8")
    os.chmod(auth, 0o644)
    out = expect(write(tmp_path, BASE + PAGE + f"  auth_file: {auth}\n"), env,
                 (34, "status_page.auth_file", "readable by every user"))
    assert "pw" not in out.replace(str(tmp_path), "")


def test_auth_file_without_a_colon(tmp_path: Path, env: dict[str, str]) -> None:  # noqa: F811
    auth = tmp_path / "page.auth"
    auth.write_text("justapassword\n", encoding="utf-8")
    os.chmod(auth, 0o600)
    out = expect(write(tmp_path, BASE + PAGE + f"  auth_file: {auth}\n"), env,
                 (34, "status_page.auth_file", "user:password"))
    assert "justapassword" not in out
