"""The buffer's lineage side file, `<buffer>.lineage`: what must outlive the buffer file itself.

The buffer file holds its own epoch and seq, but a buffer file can be deleted, replaced by an
older copy, or set aside as corrupt. Then the next file must still start its seq above every
seq given before, and whatever the agent held in memory when it stopped must still be
announced. This small JSON file, next to the buffer and written atomically (temp file, fsync,
rename, fsync of the directory), keeps:

- `epoch`: the epoch the live buffer file is drawing seqs in;
- `seq_seen`: a seq known to be committed in that file (when the file is later found below it,
  it was rolled back or replaced: a new epoch starts);
- `seq_ceiling`: a lease. No seq above it is given before the lease is extended (and written
  here), so a new file can start at `seq_ceiling + 1` and be sure never to go backwards, even
  when the old file is gone. The lease is extended `LEASE` seqs at a time: one small write per
  LEASE records (about every quarter hour at 10 records/s), never one per commit;
- `unbuffered`: records the agent held in memory and could not write before it stopped
  (count, first/last ts, devices), announced as `dropped_unbuffered` on the next start.

The side file is a help, not a dependency: when it is missing or unreadable, the buffer file's
own last seq is used, and the new epoch keeps (epoch, seq) unique in any case.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from agent import private

log = logging.getLogger(__name__)

LEASE = 10_000  # seqs granted per write of the side file


def new_epoch() -> str:
    """16 random hex characters: unique among the files any one station will ever have."""
    return secrets.token_hex(8)


def side_path(buffer_path: Path) -> Path:
    return Path(f"{buffer_path}.lineage")


@dataclass(frozen=True)
class Lineage:
    epoch: str
    seq_seen: int
    seq_ceiling: int
    unbuffered: dict[str, Any] | None = field(default=None)

    def extended(self, last_seq: int, need: int = 0) -> Lineage:
        """A lease covering at least need seqs above last_seq, with LEASE to spare."""
        return replace(self, seq_seen=max(self.seq_seen, last_seq), seq_ceiling=last_seq + need + LEASE)


def read(buffer_path: Path) -> Lineage | None:
    """The recorded lineage, or None when there is none or it cannot be read (logged)."""
    path = side_path(buffer_path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        unbuffered = raw.get("unbuffered")
        return Lineage(str(raw["epoch"]), int(raw["seq_seen"]), int(raw["seq_ceiling"]),
                       unbuffered if isinstance(unbuffered, dict) else None)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning("device=_site buffer lineage %s unreadable (%s): using the buffer file's own seq", path, err)
        return None


def write(buffer_path: Path, lineage: Lineage) -> bool:
    """Atomically replace the side file; False (logged) when the file system refuses."""
    path = side_path(buffer_path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with private.open_text(tmp) as fh:
            json.dump(asdict(lineage), fh, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:  # the rename itself must survive a power cut
            os.fsync(fd)
        finally:
            os.close(fd)
        return True
    except OSError as err:
        log.warning("device=_site cannot write buffer lineage %s: %s", path, err)
        return False
