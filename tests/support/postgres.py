"""``Postgres``: a private PostgreSQL cluster for tests and benchmarks, in a temporary directory on
a free loopback port (never the machine's own service), started with initdb/pg_ctl from
/usr/lib/postgresql/<version>/bin. initdb refuses to run as root: as root, the cluster belongs to
the ``postgres`` user and every tool runs through ``runuser -u postgres --``."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .ports import LOOPBACK, free_port

USER = "pvgate"


def find_bin() -> Path | None:
    """The newest PostgreSQL server binaries on this machine, or None."""
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name)
                  if Path(d).parent.name.isdigit() else 0)
    for d in reversed(dirs):
        if os.access(os.path.join(d, "initdb"), os.X_OK):
            return Path(d)
    found = shutil.which("initdb")
    return Path(found).parent if found else None


class Postgres:
    def __init__(self, bindir: Path, *, fsync: bool = False) -> None:
        self.bindir = bindir
        self.fsync = fsync
        self.root = Path(tempfile.mkdtemp(prefix="pvgate-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.host = LOOPBACK
        self._as: list[str] = []
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root needs the postgres user to own the cluster") from None
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    def dsn(self, dbname: str = "pvgate") -> str:
        return f"postgresql://{USER}@{self.host}:{self.port}/{dbname}"

    def _run(self, tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = [*self._as, str(self.bindir / tool), *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()[-2000:]}\n"
                               f"{self.log_tail()}")
        return out

    def log_tail(self) -> str:
        log = self.root / "postgres.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else ""

    def start(self) -> Postgres:
        self._run("initdb", "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-locale", "-N")
        opts = (f"-p {self.port} -k {self.root} -c listen_addresses={self.host} -c max_connections=50 "
                f"-c fsync={'on' if self.fsync else 'off'} -c shared_buffers=128MB")
        for attempt in range(3):
            try:
                self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.root / "postgres.log"),
                          "-w", "-t", "30", "start")
                break
            except RuntimeError:
                if attempt == 2:
                    raise
                self.port = free_port()  # someone took the port between free_port() and the bind
                opts = opts.replace(opts.split()[1], str(self.port), 1)
        self._run("createdb", "-h", self.host, "-p", str(self.port), "-U", USER, "pvgate")
        return self

    def stop(self) -> None:
        if self.data.exists():
            for mode in ("fast", "immediate"):
                try:
                    self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "20", "stop")
                    break
                except (RuntimeError, subprocess.TimeoutExpired):
                    time.sleep(0.2)
        shutil.rmtree(self.root, ignore_errors=True)
