"""Subprocesses for tests: ``Proc`` (output to files, wait for log lines,
terminate/kill), ``ProcRegistry`` (kills leftovers at teardown, only the
processes it started) and discovery of external tools (skip locally, fail in CI).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

Stream = Literal["stdout", "stderr", "both"]


# --------------------------------------------------------------------------- tools


def in_ci() -> bool:
    """True when the environment says we run in CI (``CI=true``/``1``/``yes``)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def find_tool(name: str, *fallbacks: str) -> str | None:
    """Locate an executable via ``shutil.which`` or the given absolute fallbacks."""
    found = shutil.which(name)
    if found:
        return found
    for candidate in fallbacks:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def require_tool(name: str, *fallbacks: str) -> str:
    """Return the tool's path, or skip the test (locally) / fail it (when CI=true).

    Missing tools must never silently skip in CI.
    """
    path = find_tool(name, *fallbacks)
    if path is not None:
        return path
    msg = f"required tool {name!r} not found on PATH or in {list(fallbacks)}; install it (e.g. apt-get install mosquitto mosquitto-clients)"
    if in_ci():
        pytest.fail(f"{msg} [CI=true: refusing to skip]", pytrace=False)
    pytest.skip(msg)


# --------------------------------------------------------------------------- Proc


@dataclass(frozen=True)
class OutputMark:
    """Byte offsets into a Proc's stdout/stderr files (see ``Proc.mark``)."""

    stdout: int
    stderr: int


class Proc:
    """One subprocess whose stdout/stderr go to ``<workdir>/<name>.out|.err``."""

    def __init__(
        self,
        cmd: Sequence[str],
        name: str,
        workdir: Path,
        env: Mapping[str, str | None] | None = None,
        cwd: Path | str | None = None,
    ) -> None:
        """Start ``cmd`` immediately.

        ``env`` overrides os.environ (a value of None removes the variable).
        PYTHONUNBUFFERED=1 is set by default so Python children log promptly.
        """
        self.cmd: list[str] = [str(c) for c in cmd]
        self.name = name
        workdir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = workdir / f"{name}.out"
        self.stderr_path = workdir / f"{name}.err"
        full_env = dict(os.environ)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        for key, value in (env or {}).items():
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        self._out = open(self.stdout_path, "wb")  # noqa: SIM115 - closed in _reap
        self._err = open(self.stderr_path, "wb")  # noqa: SIM115
        try:
            self._popen = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=self._out,
                stderr=self._err,
                env=full_env,
                cwd=cwd,
                start_new_session=True,  # Ctrl-C on pytest does not hit it directly
            )
        except BaseException:
            self._out.close()
            self._err.close()
            raise
        self.started_at = time.monotonic()

    def __repr__(self) -> str:
        return f"<Proc {self.name} pid={self.pid} rc={self.returncode}>"

    @property
    def pid(self) -> int:
        """OS process id."""
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """Exit code (negative = killed by signal), or None while running."""
        return self._popen.poll()

    @property
    def running(self) -> bool:
        """True while the process has not exited."""
        return self._popen.poll() is None

    # ---------------------------------------------------------------- output

    def stdout(self) -> str:
        """Everything written to stdout so far."""
        return self.stdout_path.read_bytes().decode("utf-8", "replace")

    def stderr(self) -> str:
        """Everything written to stderr so far."""
        return self.stderr_path.read_bytes().decode("utf-8", "replace")

    def output(self) -> str:
        """stdout followed by stderr (not interleaved)."""
        return self.stdout() + self.stderr()

    def tail(self, lines: int = 40) -> str:
        """Last lines of stdout and stderr, for error messages."""
        out = "\n".join(self.stdout().splitlines()[-lines:])
        err = "\n".join(self.stderr().splitlines()[-lines:])
        return f"--- {self.name} stdout (tail) ---\n{out}\n--- {self.name} stderr (tail) ---\n{err}"

    def mark(self) -> OutputMark:
        """Current end of output; pass as ``since=`` to only match newer lines."""
        return OutputMark(self._size(self.stdout_path), self._size(self.stderr_path))

    @staticmethod
    def _size(path: Path) -> int:
        try:
            return path.stat().st_size
        except FileNotFoundError:
            return 0

    def _lines(self, path: Path, offset: int, final: bool) -> list[str]:
        data = path.read_bytes()[offset:]
        text = data.decode("utf-8", "replace")
        lines = text.split("\n")
        # The last element is an incomplete line (or ""), unless the process is gone.
        if not final:
            lines = lines[:-1]
        return lines

    def find_line(self, regex: str | re.Pattern[str], *, since: OutputMark | None = None,
                  stream: Stream = "both") -> re.Match[str] | None:
        """Search complete output lines for ``regex`` now; return the first match or None."""
        pattern = re.compile(regex) if isinstance(regex, str) else regex
        final = not self.running
        since = since or OutputMark(0, 0)
        sources: list[tuple[Path, int]] = []
        if stream in ("stdout", "both"):
            sources.append((self.stdout_path, since.stdout))
        if stream in ("stderr", "both"):
            sources.append((self.stderr_path, since.stderr))
        for path, offset in sources:
            for line in self._lines(path, offset, final):
                m = pattern.search(line)
                if m:
                    return m
        return None

    def wait_for_line(self, regex: str | re.Pattern[str], timeout: float = 10.0, *,
                      since: OutputMark | None = None, stream: Stream = "both",
                      poll: float = 0.05) -> re.Match[str]:
        """Wait until a complete output line matches ``regex`` (re.search).

        Raises AssertionError (with the output tail) on timeout, or as soon as
        the process has exited without printing a matching line.
        """
        deadline = time.monotonic() + timeout
        while True:
            exited = not self.running
            m = self.find_line(regex, since=since, stream=stream)
            if m:
                return m
            if exited:
                raise AssertionError(
                    f"{self.name} exited (rc={self.returncode}) without printing a line "
                    f"matching {regex!r}\n{self.tail()}")
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{self.name}: no line matching {regex!r} within {timeout}s\n{self.tail()}")
            time.sleep(poll)

    # ---------------------------------------------------------------- lifecycle

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to this process only (not its group); no-op if it exited."""
        if self.running:
            self._popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Wait for exit and return the exit code; raises subprocess.TimeoutExpired."""
        rc = self._popen.wait(timeout=timeout)
        self._close_files()
        return rc

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Returns the exit code."""
        if self.running:
            self._popen.send_signal(signal.SIGTERM)
            try:
                return self.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        return self.kill9()

    def kill9(self, timeout: float = 10.0) -> int:
        """SIGKILL (simulates a crash / power loss) and reap. Returns the exit code."""
        if self.running:
            self._popen.kill()
        return self.wait(timeout)

    def _close_files(self) -> None:
        for f in (self._out, self._err):
            if not f.closed:
                f.close()


class ProcRegistry:
    """Starts ``Proc``s in one work dir and kills the ones still running at cleanup.

    Only processes started through this registry are ever signalled.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []

    def start(self, cmd: Sequence[str], name: str, env: Mapping[str, str | None] | None = None,
              cwd: Path | str | None = None) -> Proc:
        """Start ``cmd`` as a ``Proc``; a duplicate ``name`` gets a numeric suffix."""
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "proc"
        taken = {p.name for p in self.procs}
        unique, n = safe, 1
        while unique in taken:
            n += 1
            unique = f"{safe}-{n}"
        proc = Proc(cmd, unique, self.workdir, env=env, cwd=cwd)
        self.procs.append(proc)
        return proc

    def cleanup(self, timeout: float = 5.0) -> list[str]:
        """Terminate (then SIGKILL) every process still running; return their names."""
        leftovers = [p for p in self.procs if p.running]
        for p in leftovers:
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in leftovers:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill9()
        for p in self.procs:  # reap/close files of already-exited ones too
            if not p.running:
                p.wait(1.0)
        return [p.name for p in leftovers]
