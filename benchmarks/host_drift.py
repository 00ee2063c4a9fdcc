"""How much the machine itself drifts: the same calls, in one process, sampled for minutes.

`attnkit bench` compares runs by the ratio of each method's time to torch SDPA's.  That
ratio can only be as steady as the machine keeps the *relative* speed of a memory-bound
kernel and a compute-bound one.  This script times a fixed set of benchmark cases (same
inputs, one process, the bench's steady allocator and huge pages, nothing else running)
every few seconds and prints each sample against that call's best, and the range of each
method / SDPA ratio over the whole watch.  A cloud VM shares its host's caches and memory
bandwidth with other guests; what they do shows here and not in the guest's own load.

    python benchmarks/host_drift.py --seconds 420 --out benchmarks/results/host_drift.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from attnkit.bench.cases import PRESETS, Case, make_call
from attnkit.bench.machine import machine_info
from attnkit.bench.timing import huge_pages, steady_allocator

CASES = [  # (method, N, dtype, mode): SDPA (compute-bound) and memory-bound methods, bert-base shape
    ("torch-sdpa", 1024, "bf16", "fwd"), ("torch-sdpa", 1024, "bf16", "fwd_bwd"), ("torch-sdpa", 1024, "fp32", "fwd"),
    ("torch-sdpa", 2048, "fp32", "fwd"), ("nystrom", 1024, "bf16", "fwd_bwd"), ("nystrom", 2048, "fp32", "fwd"),
    ("lowrank", 1024, "bf16", "fwd"), ("hybrid", 1024, "fp32", "fwd"), ("performer", 2048, "fp32", "fwd"),
    ("blocktopk", 2048, "fp32", "fwd"),
]


def _block(fn, seconds: float) -> float:
    """Mean time per call over calls that fill ``seconds``."""
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        spent = time.perf_counter() - start
        if spent >= seconds:
            return spent / calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=420.0, help="how long to watch (default 420)")
    p.add_argument("--every", type=float, default=2.0, help="pause between samples, s (default 2)")
    p.add_argument("--out", type=Path, help="write every sample here (JSON)")
    args = p.parse_args()
    # as `attnkit bench` times; torch reads the huge-pages setting at its first allocation, which is still to come
    allocator = f"{steady_allocator()}; {huge_pages()}"
    preset = PRESETS["bert-base"]
    names = [f"{m} {mode} N={n} {dt}" for m, n, dt, mode in CASES]
    fns = [make_call(Case(m, preset, n, dt, mode)) for m, n, dt, mode in CASES]
    for fn in fns:
        for _ in range(3):
            fn()
    start, samples = time.monotonic(), []
    while time.monotonic() - start < args.seconds:
        # one sample = the best of three 30 ms blocks of each call, all within about a second
        samples.append([time.monotonic() - start] + [min(_block(fn, 0.03) for _ in range(3)) for fn in fns])
        time.sleep(args.every)
    best = [min(s[i + 1] for s in samples) for i in range(len(fns))]
    print(f"{len(samples)} samples over {samples[-1][0]:.0f} s; each call's time / its best:")
    print("    t  " + "  ".join(f"{n.split()[0][:6]:>6}" for n in names))
    for s in samples:
        print(f"{s[0]:5.0f}  " + "  ".join(f"{s[i + 1] / best[i]:6.2f}" for i in range(len(fns))))
    print("\nrange of each method / SDPA ratio (same N, dtype, mode) over the watch:")
    summary = []
    for i, (m, n, dt, mode) in enumerate(CASES):
        if m == "torch-sdpa" or ("torch-sdpa", n, dt, mode) not in CASES:
            continue
        j = CASES.index(("torch-sdpa", n, dt, mode))
        ratios = [s[i + 1] / s[j + 1] for s in samples]
        spread = max(ratios) / min(ratios) - 1
        summary.append({"case": names[i], "ratio_min": min(ratios), "ratio_max": max(ratios), "spread": spread})
        print(f"  {names[i]:32s} {min(ratios):.3f} - {max(ratios):.3f}  (max/min - 1 = {spread:.0%})")
    if args.out:
        args.out.write_text(json.dumps({
            "machine": {**machine_info("cpu"), "allocator": allocator}, "platform": platform.platform(),
            "cases": names, "best_s": best,
            "samples": samples, "ratio_ranges": summary, "command": "python benchmarks/host_drift.py "
            + f"--seconds {args.seconds:g} --every {args.every:g}",
        }, indent=1) + "\n")


if __name__ == "__main__":
    main()
