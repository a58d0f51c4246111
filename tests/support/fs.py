"""A small real file system for disk-full tests: a tmpfs mounted for one test (root only)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .procs import in_ci


@contextmanager
def small_tmpfs(parent: Path, size_mib: int) -> Iterator[Path]:
    """Mount a size_mib tmpfs under parent; unmounted lazily at the end, so that a process still
    holding a file on it cannot keep it mounted."""
    if os.geteuid() != 0:
        if in_ci():
            pytest.fail("the disk-full tests need root to mount a tmpfs [CI=true: refusing to skip]")
        pytest.skip("the disk-full tests mount a small tmpfs, which needs root")
    mnt = parent / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
