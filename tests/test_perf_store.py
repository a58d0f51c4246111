"""Issue #16, the buffer's writer and file: commits follow the poll cycles' phase, and what a
steady site writes to disk per reading stays small. A real buffer file on a real file system."""

from __future__ import annotations

import time
from pathlib import Path

from agent.store.buffer import Buffer
from agent.store.writer import BufferWriter
from drivers.model import Reading


def _reading(i: int) -> Reading:
    return Reading("inv01", 1_700_000_000_000 + i * 1000, {"p_ac": 1000.0 + i, "e_total": 12345.6}, [])


def _cycle(writer: BufferWriter, i: int) -> float:
    """One poll cycle's record; seconds until it is committed."""
    before = writer.commits
    t0 = time.monotonic()
    writer.put(_reading(i))
    writer.cycle_done()
    while writer.commits == before:
        assert time.monotonic() - t0 < 3.0, "the batch was never committed"
        time.sleep(0.005)
    return time.monotonic() - t0


def test_a_late_commit_does_not_keep_later_ones_late(tmp_path: Path) -> None:
    """The first poll at start is off the tick grid. Spacing counted from the commit itself kept
    every later commit as late as that one (live data waited ~0.97 s); counted from the cycle, the
    commits are back on the cycles within two of them, and never more than ~1 per interval."""
    buf = Buffer(tmp_path / "buffer.sqlite", max_mb=10, min_free_mb=1)
    writer = BufferWriter(buf, commit_interval_s=1.0)
    writer.start()
    try:
        assert _cycle(writer, 0) < 0.3  # the first commit: at once
        start = time.monotonic()
        time.sleep(0.3)
        late = _cycle(writer, 1)  # 0.3 s after the first: waits for the interval
        assert late > 0.4, f"two commits {0.3 + late:.2f} s apart (interval 1 s)"
        delays = []
        for i in range(2, 6):  # the ticks, one interval apart from the off-grid one
            time.sleep(max(0.0, start + (i - 1) - time.monotonic()))
            delays.append(_cycle(writer, i))
        assert max(delays[1:]) < 0.3, f"commit delays after the cycle {delays}"
        assert writer.commits <= 6
    finally:
        writer.stop()
        buf.close()
