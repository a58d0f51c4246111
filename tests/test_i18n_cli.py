"""The technician's commands in Simplified Chinese and English: check, plan, scan and status.

The language: `--lang`, else the site file's site.language, else the locale, else English.
Chinese site and device-map names pass intact through the YAML, the log, the MQTT payloads and
`pvgate status`, also when the agent runs with no locale at all (as under systemd).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import string
import subprocess
import sys
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from babel.messages.pofile import read_po
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_config import BASE
from test_fuzz_config import scalars

from agent import i18n
from agent.commission import budget, scan
from agent.config import format_problems, load_site, site_language
from agent.service.statustext import format_status
from drivers.errors import ConfigError, Msg, Problem
from drivers.model import Link, LinkType
from support.broker import Broker
from support.chain import SimDev, start_sim, write_site
from support.collector import Collector, publish
from support.ports import free_port
from support.procs import Proc

CJK = re.compile(r"[\u4e00-\u9fff]")
# No locale of our own: each test says which one it runs under.
NO_LOCALE = {"LANG": None, "LANGUAGE": None, "LC_ALL": None, "LC_MESSAGES": None}

BROKEN = """\
site:
  id: guchengcun
  name: 故城村
  timezon: Asia/Shanghai
{language}mqtt:
  host: mqtt://center.example
links:
  - id: bus1
    type: rtu
    port: /dev/ttyUSB0
    baudrate: 9601
devices:
  - id: inv01
    link: bus1
    unit: 0
    profile: huawei-sun2000
    interval: 1:00
    retries: yes
"""

VALID = """\
site:
  id: guchengcun
  name: 故城村
mqtt:
  host: 127.0.0.1
agent:
  state_dir: {state}
links:
  - {{id: bus1, type: rtu, port: /dev/ttyUSB0, baudrate: 9600}}
  - {{id: lan, type: tcp, host: 127.0.0.1}}
devices:
  - {{id: inv01, link: bus1, unit: 1, profile: huawei-sun2000, interval: 10s}}
  - {{id: meter, link: bus1, unit: 11, profile: chint-dtsu666, interval: 10s}}
"""


@pytest.fixture(autouse=True)
def _english_after() -> Iterator[None]:
    yield
    i18n.set_language("en")


def pvgate(*args: str, lang: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in NO_LOCALE}
    if lang is not None:
        env["LANG"] = lang
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True,
                          encoding="utf-8", timeout=60, env=env, stdin=subprocess.DEVNULL, cwd=cwd)


def broken_site(tmp_path: Path, language: str = "") -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(BROKEN.format(language=f"  language: {language}\n" if language else ""), encoding="utf-8")
    return path


def located(line: str) -> str:
    """`file:line: key.path:` of a problem line; the rest is the message."""
    m = re.match(r"^(.+?:\d+: [\w.\[\]]+:) ", line)
    assert m, line
    return m.group(1)


# -- check -------------------------------------------------------------------------------------


def test_check_in_chinese_names_the_same_file_line_and_key_path(tmp_path: Path) -> None:
    site = broken_site(tmp_path)
    en = pvgate("check", "-c", str(site), lang="en_US.UTF-8")
    zh = pvgate("check", "-c", str(site), lang="zh_CN.UTF-8")
    assert en.returncode == zh.returncode == 78, zh.stderr
    assert "Traceback" not in zh.stderr
    en_lines, zh_lines = en.stderr.splitlines(), zh.stderr.splitlines()
    assert len(en_lines) == len(zh_lines) == 7, zh.stderr
    assert [located(line) for line in zh_lines[:-1]] == [located(line) for line in en_lines[:-1]]
    for en_line, zh_line in zip(en_lines[:-1], zh_lines[:-1]):
        assert CJK.search(zh_line) and not CJK.search(en_line.replace("故城村", "")), zh_line
    assert f"{site}:4: site.timezon: 未知的配置项；是不是 'timezone'？" in zh.stderr
    assert f"{site}:15: devices[0].unit: rtu 链路 'bus1' 上的 Modbus 从站地址应为 1..247（0 是广播地址）" in zh.stderr
    # A fragment inside a message (what was given, the YAML 1.1 hint) is translated with it.
    assert f"{site}:18: devices[0].retries: 应为整数，实际为文本 'yes'" in zh.stderr
    assert zh_lines[-1] == "共发现 6 个问题；未启动任何服务。"
    assert en_lines[-1] == "6 problems found; nothing was started."
    assert f"{site}:4: site.timezon: unknown key; did you mean 'timezone'? allowed here:" in en.stderr


def test_the_site_files_language_wins_over_the_locale(tmp_path: Path) -> None:
    english = pvgate("check", "-c", str(broken_site(tmp_path, "en")), lang="zh_CN.UTF-8")
    assert english.returncode == 78
    assert not CJK.search(english.stderr.replace("故城村", "")), english.stderr
    assert english.stderr.splitlines()[-1] == "6 problems found; nothing was started."
    chinese = pvgate("check", "-c", str(broken_site(tmp_path, "zh-CN")), lang="en_US.UTF-8")
    assert chinese.returncode == 78
    assert chinese.stderr.splitlines()[-1] == "共发现 6 个问题；未启动任何服务。"


def test_lang_overrides_the_site_file_and_the_locale(tmp_path: Path) -> None:
    site = broken_site(tmp_path, "zh-CN")
    out = pvgate("--lang", "en", "check", "-c", str(site), lang="zh_CN.UTF-8")
    assert out.returncode == 78
    assert out.stderr.splitlines()[-1] == "6 problems found; nothing was started."
    out = pvgate("--lang", "zh_CN", "check", "-c", str(broken_site(tmp_path, "en")))
    assert out.stderr.splitlines()[-1] == "共发现 6 个问题；未启动任何服务。"
    bad = pvgate("--lang", "fr", "check", "-c", str(site))
    assert bad.returncode == 2 and "'fr': expected one of zh-CN, en" in bad.stderr


def test_a_file_that_is_not_yaml_is_reported_in_the_locales_language(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text("site:\n  language: en\n  name: \"故城村\n", encoding="utf-8")
    out = pvgate("check", "-c", str(site), lang="zh_CN.UTF-8")
    assert out.returncode == 78
    assert f"{site}:3: 不是有效的 YAML：" in out.stderr and "引号没有闭合" in out.stderr, out.stderr
    assert site_language(site) is None
    assert site_language(broken_site(tmp_path, "zh-CN")) == "zh-CN"


def test_run_reports_problems_to_the_journal_in_english(tmp_path: Path) -> None:
    out = pvgate("run", "-c", str(broken_site(tmp_path, "zh-CN")), lang="zh_CN.UTF-8")
    assert out.returncode == 78
    assert out.stderr.splitlines()[-1] == "6 problems found; nothing was started."


def test_help_follows_the_language(tmp_path: Path) -> None:
    zh = pvgate("--lang", "zh-CN", "check", "--help")
    assert zh.returncode == 0 and "站点文件（默认 /etc/pvgate/site.yaml）" in zh.stdout, zh.stdout
    site = broken_site(tmp_path, "zh-CN")
    plan = pvgate("plan", "-c", str(site), "--help", lang="C")
    assert "设备开始应答所需的时间" in plan.stdout, plan.stdout
    assert "validate the site file and its device maps" in pvgate("--help", lang="C").stdout


def test_no_locale_is_english(tmp_path: Path) -> None:
    out = pvgate("check", "-c", str(broken_site(tmp_path)))
    assert out.stderr.splitlines()[-1] == "6 problems found; nothing was started."


def test_a_valid_file_summary_in_chinese(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(VALID.format(state=tmp_path), encoding="utf-8")
    out = pvgate("check", "-c", str(site), lang="zh_CN.UTF-8")
    assert out.returncode == 0, out.stderr
    assert f"{site}：正常 —— 站点 guchengcun（故城村），MQTT 服务器 127.0.0.1:1883" in out.stdout
    assert "  链路 bus1（rtu /dev/ttyUSB0@9600）：2 台设备" in out.stdout
    assert "    inv01：从站地址 1，点表 huawei-sun2000，每 10 秒" in out.stdout
    en = pvgate("check", "-c", str(site), lang="C")
    assert f"{site}: OK — site guchengcun (故城村), broker 127.0.0.1:1883" in en.stdout


def test_english_problem_text_is_what_str_gives(tmp_path: Path) -> None:
    """English through the translated path is byte for byte the untranslated text."""
    with pytest.raises(ConfigError) as err:
        load_site(broken_site(tmp_path))
    i18n.set_language("en")
    assert format_problems(err.value) == "\n".join(
        [str(p) for p in err.value.problems] + ["6 problems found; nothing was started."])
    i18n.set_language("zh-CN")
    text = format_problems(err.value)
    assert text.count("\n") == 6 and "timezon: 未知的配置项" in text
    assert [str(p) for p in err.value.problems] == [p.text() for p in err.value.problems]  # str stays English


def test_a_broken_translation_falls_back_to_english() -> None:
    msg = Msg("expected {want}, got {got}", want=Msg("a whole number"), got="text 'x'")
    assert str(msg) == "expected a whole number, got text 'x'"
    assert msg.render(lambda t: "应为{wanted}" if t.startswith("expected") else t) == str(msg)
    problem = Problem.of("site.yaml", 3, "mqtt.port", msg)
    assert str(problem) == "site.yaml:3: mqtt.port: expected a whole number, got text 'x'"
    assert problem == Problem("site.yaml", 3, "mqtt.port", str(msg))  # equal whatever carries the template


def strict_render(msg: Msg, translate: Callable[[str], str]) -> str:
    """Msg.render without its fall-back to English: a translation that does not fit raises here."""
    args = {k: strict_render(v, translate) if isinstance(v, Msg) else v for k, v in msg.params.items()}
    text = translate(msg.template)
    return text.format(**args) if msg.params else text


def specs(text: str) -> list[tuple[str, str, str]]:
    return sorted((name, spec or "", conv or "") for _lit, name, spec, conv in string.Formatter().parse(text)
                  if name is not None)


def test_every_translation_has_the_same_placeholders_formats_and_conversions() -> None:
    """{load:.0%} stays {load:.0%} and {id!r} stays {id!r}: a different spec would print other figures."""
    with (Path(i18n.__file__).parent / "locale/zh_CN/LC_MESSAGES/pvgate.po").open("rb") as f:
        catalog = read_po(f, locale="zh_CN")
    for msg in catalog:
        if not msg.id:
            continue
        ids = list(msg.id) if isinstance(msg.id, (tuple, list)) else [msg.id]
        strings = list(msg.string) if isinstance(msg.string, (tuple, list)) else [msg.string]
        for english in ids:  # Chinese has one plural form for both English ones
            assert specs(str(english)) == specs(str(strings[0])), (english, strings)


@settings(max_examples=120, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(line=st.integers(0, len(BASE.splitlines()) - 1), value=scalars)
def test_any_problem_renders_in_chinese_at_the_same_place(tmp_path_factory: pytest.TempPathFactory, line: int,
                                                          value: str) -> None:
    lines = BASE.splitlines()
    key, sep, _rest = lines[line].partition(":")
    lines[line] = f"{key}{sep} {value}" if sep else f"{lines[line]} {value}"
    path = tmp_path_factory.mktemp("zh") / "site.yaml"
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8", "surrogatepass"))
    try:
        load_site(path)
    except ConfigError as err:
        zh = i18n.translator("zh-CN").gettext
        for p in err.problems:
            chinese = p.text(zh)
            assert chinese.startswith(p.text().removesuffix(p.message)), (str(p), chinese)
            if p.msg is not None:
                strict_render(p.msg, zh)


# -- plan --------------------------------------------------------------------------------------


def test_plan_in_chinese(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(VALID.format(state=tmp_path), encoding="utf-8")
    zh = pvgate("plan", "-c", str(site), lang="zh_CN.UTF-8")
    assert zh.returncode == 0, zh.stderr
    assert "链路 bus1（rtu /dev/ttyUSB0@9600）" in zh.stdout
    assert "  inv01（从站地址 1，点表 huawei-sun2000，每 10 秒）：" in zh.stdout and "个寄存器，线路上耗时" in zh.stdout
    assert "  总线时间预算（9600 波特，每次应答的设备响应时间 20 毫秒）：" in zh.stdout
    assert "    按所配轮询周期的总线负载：" in zh.stdout and "  （无设备）" in zh.stdout
    en = pvgate("--lang", "en", "plan", "-c", str(site), lang="zh_CN.UTF-8")
    assert "  budget at 9600 baud, 20 ms turnaround per answer:" in en.stdout and not CJK.search(en.stdout)


def test_budget_warning_in_chinese(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(VALID.format(state=tmp_path).replace("interval: 10s", "interval: 0.2s"), encoding="utf-8")
    cfg = load_site(site)
    i18n.set_language("en")
    english = budget.budget_warnings(cfg)
    i18n.set_language("zh-CN")
    chinese = budget.budget_warnings(cfg)
    assert len(english) == len(chinese) == 1
    assert english[0].startswith("link bus1: the poll intervals cannot be met")
    assert chinese[0].startswith("链路 bus1：轮询周期无法满足，总线太慢")
    numbers = re.compile(r"\d+(?:\.\d+)?%?")
    assert sorted(numbers.findall(english[0])) == sorted(numbers.findall(chinese[0]))  # the same figures


# -- scan --------------------------------------------------------------------------------------


def test_scan_findings_and_summary_in_chinese() -> None:
    link = Link("bus1", LinkType.TCP, host="192.168.1.20", port=502)
    args = argparse.Namespace(units=[1, 2, 3], config=None)
    found = [scan.Finding(1, "huawei-sun2000", "华为 SUN2000", ["grid_frequency 50.01 Hz"], ["sungrow-sg"]),
             scan.Finding(3, None, evidence=["x"])]
    i18n.set_language("zh-CN")
    assert scan._finding_text(found[0]) == ("从站地址 1：huawei-sun2000（华为 SUN2000）\n"
                                            "    依据：grid_frequency 50.01 Hz\n    也可能是：sungrow-sg")
    assert scan._finding_text(found[1]) == "从站地址 3：?（x）"
    summary = scan._summary(found, link, args)
    assert summary.startswith("tcp 192.168.1.20:502 上有 2 个从站应答；可写入站点文件：\nlinks:\n")
    assert scan._summary([], link, args) == "tcp 192.168.1.20:502 上没有从站应答（从站地址 1-3）"
    with pytest.raises(argparse.ArgumentTypeError, match="从站地址为 0..255"):
        scan._units("1-300")
    i18n.set_language("en")
    assert scan._summary([], link, args) == "no unit answered on tcp 192.168.1.20:502 (units 1-3)"


# -- status ------------------------------------------------------------------------------------


def snapshot() -> dict[str, object]:
    return {
        "v": 1, "site": "guchengcun", "name": "故城村", "ts": 1_764_750_000_000, "version": "1.0", "pid": 42,
        "uptime_s": 3700, "config": "/etc/pvgate/site.yaml", "state": "running", "reloads": 1,
        "mqtt": {"host": "center", "port": 8883, "tls": True, "connected": False, "messages": 9,
                 "acked_rows": 90, "connects": 2},
        "buffer": {"unsent": 12, "oldest_unsent_age_s": 65, "last_seq": 1000, "rows": 2000,
                   "size_bytes": 1048576, "budget_bytes": 1073741824, "dropped_unsent": 0, "memory_dropped": 0},
        "disk_free_bytes": 10 * 1048576,
        "clock": {"trusted": True, "synchronised": None, "steps": 0, "restamped_rows": 0},
        "watchdog": {"enabled": True, "stalled": []},
        "links": {"bus1": {"type": "rtu", "endpoint": "/dev/ttyUSB0", "connected": True, "transactions": 100,
                           "errors": 1, "timeouts": 2, "mean_response_ms": 41.5}},
        "devices": {"inv01": {"link": "bus1", "unit": 1, "profile": "yihao", "interval_s": 10, "state": "online",
                              "last_good_ts": 1_764_749_995_000, "consecutive_failures": 0, "polls": 10,
                              "failed_polls": 1, "overruns": 0, "values": {"ac_power": 12.5},
                              "units": {"ac_power": "kW"}}},
    }


def columns(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def test_status_in_chinese_with_aligned_columns() -> None:
    i18n.set_language("zh-CN")
    text = format_status(snapshot())
    lines = text.splitlines()
    assert lines[0] == "pvgate 1.0  站点 guchengcun（故城村）  pid 42  已运行 1h01m  running"
    assert "未连接" in lines[2] and "缓存    12 条未发送（最早的已等待 1m05s）" in lines[3]
    assert "同步状态未知" in lines[4] and lines[5] == "看门狗  正常"
    head = next(i for i, line in enumerate(lines) if line.startswith("设备"))
    # Headers and cells start at the same terminal column although a Chinese character is two wide.
    header, row = lines[head], lines[head + 1]
    starts = [columns(header[:m.start()]) for m in re.finditer(r"(?<=  )\S", header)]
    assert [columns(row[:m.start()]) for m in re.finditer(r"(?<=  )\S", row)] == starts
    assert row.split()[:3] == ["inv01", "bus1", "1"] and "5s前" in row
    assert "inv01：最近读数（5s前）" in text
    i18n.set_language("en")
    english = format_status(snapshot())
    assert english.splitlines()[0] == "pvgate 1.0  site guchengcun (故城村)  pid 42  up 1h01m  running"
    assert "DEVICE  LINK  UNIT  PROFILE  EVERY  STATE   LAST GOOD  FAILS  POLLS/FAILED  OVERRUNS" in english


def test_status_without_an_agent_in_chinese(tmp_path: Path) -> None:
    out = pvgate("status", "--socket", str(tmp_path / "pvgate.sock"), lang="zh_CN.UTF-8")
    assert out.returncode == 69
    assert out.stderr.strip() == (f"pvgate status: 采集程序没有运行：{tmp_path / 'pvgate.sock'} 不存在"
                                  "（服务启动了吗？`systemctl status pvgate`）")


# -- Chinese names through the agent -----------------------------------------------------------


def test_chinese_names_pass_intact_through_log_payloads_and_status(
        tmp_path: Path, broker: Broker, collector_factory: Callable[..., Collector], procs: Callable[..., Proc]
) -> None:
    port = free_port()
    start_sim(procs, port, [SimDev("inv01", 1, "huawei-sun2000")], speed=60)
    # A map of the site's own, beside the site file, named the way the station names the inverter.
    (tmp_path / "yihao.yaml").write_text("id: yihao\nname: 一号逆变器\nextends: huawei-sun2000\n", encoding="utf-8")
    site = write_site(tmp_path / "site.yaml", site_id="gcc", broker_port=broker.port, modbus_port=port,
                      devices=[SimDev("inv01", 1, "yihao")], health_interval="1s")
    site.write_text(site.read_text(encoding="utf-8").replace("测试电站 test station", "故城村"), encoding="utf-8")
    col = collector_factory(["pvgate/gcc/#"])
    # No locale at all, as systemd starts the agent.
    agent = procs([sys.executable, "-m", "agent.cli", "run", "-c", str(site)], "agent", env=NO_LOCALE)
    agent.wait_for_line(r"running: site gcc \(故城村\)", timeout=20, stream="stderr")
    assert "running: site gcc (故城村)".encode() in agent.stderr_path.read_bytes()

    # The device map's name is in the retained meta message; the site's in the remote status reply.
    publish(broker.host, broker.port, "pvgate/gcc/cmd/status", json.dumps({"id": "zh-1", "values": False}))
    msgs = col.wait_for(lambda ms: any(m.topic == "pvgate/gcc/meta/inv01" for m in ms)
                        and any(m.topic == "pvgate/gcc/reply/status" for m in ms), timeout=20)
    meta = next(m for m in msgs if m.topic == "pvgate/gcc/meta/inv01")
    reply = next(m for m in msgs if m.topic == "pvgate/gcc/reply/status")
    assert json.loads(meta.payload)["name"] == "一号逆变器" and "一号逆变器".encode() in meta.payload
    assert json.loads(reply.payload)["result"]["name"] == "故城村" and "故城村".encode() in reply.payload

    out = pvgate("status", "-c", str(site))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].startswith("pvgate ") and "site gcc (故城村)" in out.stdout
    zh = pvgate("status", "-c", str(site), "--no-values", lang="zh_CN.UTF-8")
    assert "站点 gcc（故城村）" in zh.stdout and "yihao" in zh.stdout, zh.stdout
    assert json.loads(pvgate("status", "-c", str(site), "--json").stdout)["name"] == "故城村"
    # The log stays English whatever the locale says: it is what a developer greps.
    assert "running: site" in agent.stderr() and not re.search(r"运行|站点", agent.stderr())
