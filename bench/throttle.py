"""A CPU limit for one process, as a stand-in for a slow ARM gateway: a share of one core.

The suite starts the agent under `limit.prefix` (a command that enters the limit and then execs
the agent), so the agent runs limited from its first instruction. What this machine allows is
detected, in this order:

1. cgroup v2 (`/sys/fs/cgroup/cgroup.controllers` lists `cpu`): a child group of our own cgroup
   with `cpu.max` "QUOTA 100000"; needs `+cpu` in the parent's `cgroup.subtree_control` (written if
   missing; the kernel refuses that while the parent itself holds processes, then 2. or 3.).
2. systemd (`/run/systemd/system` exists): `systemd-run --scope -p CPUQuota=N% -p AllowedCPUs=0`.
3. cgroup v1 (`/sys/fs/cgroup/cpu/cpu.cfs_quota_us`): a child group with `cpu.cfs_quota_us`
   QUOTA and `cpu.cfs_period_us` 100000.

None of them: `Limit.reason` says why, and the gateway section reports that it could not run.
The group is removed again in close(). On a real gateway none of this is needed: run the suite
there as it is (docs/performance.md).
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

PERIOD_US = 100_000
CGROOT = Path("/sys/fs/cgroup")


@dataclass
class Limit:
    how: str  # "cgroup v2 cpu.max", "systemd-run CPUQuota", "cgroup v1 cpu.cfs_quota_us", "" (none)
    prefix: list[str] = field(default_factory=list)
    group: Path | None = None
    reason: str = ""

    @property
    def applied(self) -> bool:
        return bool(self.how)

    def throttled(self) -> str:
        """The group's cpu.stat throttling counters, for the report."""
        if self.group is None:
            return ""
        try:
            stat = dict(line.split() for line in (self.group / "cpu.stat").read_text().splitlines() if line.strip())
        except OSError:
            return ""
        periods, throttled = stat.get("nr_periods", "?"), stat.get("nr_throttled", "?")
        return f"throttled in {throttled} of {periods} periods"

    def close(self) -> None:
        if self.group is not None:
            try:
                self.group.rmdir()  # empty once the agent has exited
            except OSError:
                pass


def _enter(group: Path) -> list[str]:
    """`sh -c 'echo $$ > group/cgroup.procs; exec "$@"'`: the agent starts inside the group."""
    pin = "taskset -c 0 " if shutil.which("taskset") else ""  # one core, like a single-core gateway
    return ["sh", "-c", f'echo $$ > {group / "cgroup.procs"} && exec {pin}"$@"', "pvgate-bench-limit"]


def _v2(quota_us: int, name: str) -> Limit:
    controllers = (CGROOT / "cgroup.controllers").read_text().split()
    if "cpu" not in controllers:
        return Limit("", reason="cgroup v2 without the cpu controller")
    own = next((line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::")),
               "/")
    parent = CGROOT / own.lstrip("/")
    subtree = parent / "cgroup.subtree_control"
    if "cpu" not in subtree.read_text().split():
        try:
            subtree.write_text("+cpu")
        except OSError as err:
            return Limit("", reason=f"cannot enable the cpu controller in {subtree}: {err.strerror}")
    group = parent / name
    group.mkdir(exist_ok=True)
    (group / "cpu.max").write_text(f"{quota_us} {PERIOD_US}")
    return Limit("cgroup v2 cpu.max", _enter(group), group)


def _v1(quota_us: int, name: str) -> Limit:
    group = CGROOT / "cpu" / name
    group.mkdir(exist_ok=True)
    (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
    (group / "cpu.cfs_quota_us").write_text(str(quota_us))
    return Limit("cgroup v1 cpu.cfs_quota_us", _enter(group), group)


def limit(share: float, name: str = "pvgate-bench") -> Limit:
    """A limit to `share` (0.2 = 20 %) of one core, or Limit("") with the reason it cannot be had."""
    quota_us = max(1000, int(share * PERIOD_US))
    reasons = []
    if (CGROOT / "cgroup.controllers").exists():
        try:
            got = _v2(quota_us, name)
            if got.applied:
                return got
            reasons.append(got.reason)
        except OSError as err:
            reasons.append(f"cgroup v2: {err}")
    if Path("/run/systemd/system").exists() and shutil.which("systemd-run"):
        return Limit("systemd-run CPUQuota", ["systemd-run", "--scope", "--quiet", "-p", f"CPUQuota={share:.0%}",
                                              "-p", "AllowedCPUs=0", "--"])
    if (CGROOT / "cpu" / "cpu.cfs_quota_us").exists():
        try:
            return _v1(quota_us, name)
        except OSError as err:
            reasons.append(f"cgroup v1: {err}")
    if not reasons:
        reasons.append("no cgroup cpu controller and no systemd")
    if os.geteuid() != 0:
        reasons.append("not root")
    return Limit("", reason="; ".join(reasons))


if __name__ == "__main__":
    got = limit(float(sys.argv[1]) if len(sys.argv) > 1 else 0.2)
    print(got.how or f"no CPU limit here: {got.reason}")
    got.close()
