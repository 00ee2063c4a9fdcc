"""How long the machine's slow spells last: calls timed in back-to-back short chunks.

`benchmarks/host_drift.py` samples every few seconds for minutes; this looks closer.  In
one process (the bench's steady allocator and huge pages), it times each case in turn in
chunks of a few calls, over and over for ``--seconds``, and prints every chunk's median
per case, in order.  On this project's 2-core VM a memory-bound call (Nystrom, Performer
at N=1024) moves by half again within seconds -- at times between two levels, switching
every one to ten seconds -- and torch SDPA by about a fifth; with one thread
(``--threads 1``) as with two (benchmarks/results/spells.txt).  That is why `attnkit
bench` times every case in many short visits spread over the run rather than a few
(`attnkit.bench.runner._Sampler`).

    python benchmarks/spells.py --seconds 20 > benchmarks/results/spells.txt
    python benchmarks/spells.py --seconds 20 --threads 1 >> benchmarks/results/spells.txt
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from attnkit.bench.cases import PRESETS, Case, make_call
from attnkit.bench.machine import machine_info
from attnkit.bench.timing import huge_pages, steady_allocator

CASES = [("nystrom", 1024, "bf16", "fwd"), ("nystrom", 1024, "fp32", "fwd_bwd"), ("performer", 1024, "bf16", "fwd"),
         ("torch-sdpa", 1024, "bf16", "fwd"), ("torch-sdpa", 1024, "fp32", "fwd_bwd")]  # (method, N, dtype, mode), bert-base


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=20.0, help="how long to watch (default 20)")
    p.add_argument("--calls", type=int, default=5, help="calls per chunk (default 5)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    huge_pages(True)  # before the first allocation, as the bench's timing process has it
    steady_allocator()
    fns = [make_call(Case(m, PRESETS["bert-base"], n, dt, mode)) for m, n, dt, mode in CASES]
    for fn in fns:
        for _ in range(3):
            fn()
    rows, start = [], time.monotonic()
    while time.monotonic() - start < args.seconds:
        row = []
        for fn in fns:
            times = []
            for _ in range(args.calls):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            row.append(statistics.median(times) * 1e3)
        rows.append((time.monotonic() - start, row))
    info = machine_info("cpu")
    print(f"# {info['cpu_model']}, {info['cpu_count']} CPUs, torch {info['torch']} ({torch.get_num_threads()} threads), "
          f"Python {platform.python_version()}; {info['date_utc']}")
    print(f"# each chunk: median of {args.calls} calls, ms; one chunk of every case in turn, then the next")
    for i, (method, n, dtype, mode) in enumerate(CASES):
        values = [r[i] for _, r in rows]
        print(f"{method} {mode} N={n} {dtype}: chunks {len(values)}, {min(values):.2f}-{max(values):.2f} ms "
              f"(max/min {max(values) / min(values):.2f})")
        print("  " + " ".join(f"{v:.1f}" for v in values))


if __name__ == "__main__":
    main()
