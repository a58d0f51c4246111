"""Log lines on stderr: syslog priority prefixes only when stderr is the journal.

A real subprocess writes to a real file; JOURNAL_STREAM is set the way systemd sets it (the
dev:ino of the stream it connected), pointing at that file or at another one.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.logutil import stderr_is_journal, syslog_priority

SCRIPT = """
import logging
from agent import logutil
logutil.setup("DEBUG")
log = logging.getLogger("pvgate.test")
log.debug("device=inv01 dbg")
log.info("device=inv01 started")
log.warning("device=inv01 slow")
log.error("device=inv01 failed")
log.critical("device=inv01 gone")
try:
    raise ValueError("multi\\nline")
except ValueError:
    log.exception("device=inv01 crashed")
"""


def _run(tmp_path: Path, journal_of: Path | None) -> list[str]:
    err = tmp_path / "stderr.txt"
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    with err.open("wb") as fh:
        if journal_of is not None:
            st = os.stat(journal_of)
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        subprocess.run([sys.executable, "-c", SCRIPT], stderr=fh, env=env, check=True, timeout=60)
    return err.read_text().splitlines()


def test_journal_stream_gets_priority_prefixes(tmp_path: Path) -> None:
    lines = _run(tmp_path, tmp_path / "stderr.txt")
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>", "<2>", "<3>"], lines
    assert lines[1] == "<6>INFO pvgate.test: device=inv01 started"
    assert "ValueError: multi | line" in lines[5]  # the traceback stays on the one prefixed line


def test_plain_text_without_journal(tmp_path: Path) -> None:
    lines = _run(tmp_path, None)
    assert lines[1] == "INFO pvgate.test: device=inv01 started"
    assert not any(line.startswith("<") for line in lines)


def test_inherited_journal_stream_of_another_file_is_ignored(tmp_path: Path) -> None:
    # A child whose stderr was redirected (e.g. `pvgate check 2>out.txt` run from a service)
    # inherits JOURNAL_STREAM naming the parent's stream, not its own stderr.
    other = tmp_path / "other"
    other.write_text("")
    lines = _run(tmp_path, other)
    assert lines and not any(line.startswith("<") for line in lines)


@pytest.mark.parametrize("value", ["", "garbage", "1:", ":2", "x:y"])
def test_malformed_journal_stream_is_not_journal(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", value)
    assert not stderr_is_journal(sys.stderr)


def test_priorities() -> None:
    assert syslog_priority(logging.DEBUG) == 7
    assert syslog_priority(logging.INFO) == 6
    assert syslog_priority(logging.WARNING) == 4
    assert syslog_priority(logging.ERROR) == 3
    assert syslog_priority(logging.CRITICAL) == 2
