"""The benchmark suite: `python -m bench [SECTION ...]` (or `./dev bench ...`) from the repository root.

    python -m bench                      # every section, 60 s windows: about 12 minutes
    python -m bench --quick              # shorter windows and a 20 MB start-up buffer: about 3 minutes
    python -m bench cpu fanout           # some sections
    python -m bench --markdown           # the table as markdown, for docs/performance.md

Sections (docs/performance.md says what each measures and why):

    cpu       pvgate's CPU per reading against a bare pymodbus client doing the same block reads in
              the same window (20 devices x 10 values at 1 s; Modbus TCP, then RTU over a pty),
              and against the bare chain: the same reads stored, published at QoS 1 and marked
              sent, the least the MQTT contract asks (bench/bare.py --chain)
    profile   the agent under cProfile (all threads, CPU time), grouped by stage
    idle      an agent with nothing to do between polls: its share of one core
    fanout    200 devices over 20 TCP links at 10 s and at 1 s: intervals met, CPU, jitter, latency
    disk      bytes written per reading (/proc/<pid>/io) and fsyncs per second (strace); the bare
              chain's bytes per reading beside it
    startup   time to READY=1 and to the first reading at the subscriber with a ~1 GB buffer
    gateway   100 devices at 10 s with the agent limited to 20 % of one core (cgroup cpu quota)

Every process (mosquitto, pvgate-sim, socat, the agents, the bare client) is started here and
stopped by its pid at the end. Figures vary from run to run on a shared machine: the ratios are
measured within one run. Exit code 0 when the figures were measured, whatever the verdicts; 1 when
a section could not run.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.figures import Figure, header, table  # noqa: E402
from bench.fleet import section_fanout, section_gateway  # noqa: E402
from bench.harness import Harness, load_average  # noqa: E402
from bench.sections import (Options, section_cpu, section_disk, section_idle, section_profile,  # noqa: E402
                            section_startup)

SECTIONS: dict[str, Callable[[Harness, Options], list[Figure]]] = {
    "cpu": section_cpu, "profile": section_profile, "idle": section_idle, "fanout": section_fanout,
    "disk": section_disk, "startup": section_startup, "gateway": section_gateway,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description="pvgate benchmark suite (issue #16)")
    p.add_argument("sections", nargs="*", metavar="SECTION", help=f"any of: {', '.join(SECTIONS)} (default: all)")
    p.add_argument("--quick", action="store_true", help="short windows (10-20 s), 20 MB start-up buffer")
    p.add_argument("--window", type=float, default=None, metavar="S", help="every measuring window S seconds")
    p.add_argument("--buffer-mb", type=float, default=None, metavar="MB", help="start-up section's buffer size")
    p.add_argument("--cpu-share", type=float, default=0.2, metavar="F",
                   help="gateway section: the agent's CPU limit as a share of one core (default 0.2)")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--keep", action="store_true", help="keep the working directory (logs, site files)")
    args = p.parse_args(argv)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    chosen = args.sections or list(SECTIONS)
    opt = Options(args.quick, args.window, args.buffer_mb, args.cpu_share)
    started, load0 = time.time(), load_average()
    figures: list[Figure] = []
    failed = False
    h = Harness(keep=args.keep)
    try:
        h.start_broker()
        for name in chosen:
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            try:
                got = SECTIONS[name](h, opt)
            except Exception as err:  # one broken section must not hide the others' figures
                traceback.print_exc()
                got = [Figure(name, "section failed", None, note=f"{type(err).__name__}: {err}")]
                failed = True
            figures += got
            print(f"bench: {name} done in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        h.close()
    print(header(started, load0, load_average(), chosen, args.quick) + ("\n" if args.markdown else ""))
    print(table(figures, args.markdown))
    if args.keep:
        print(f"working directory kept: {h.tmp}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
