"""How much the machine itself drifts: the same calls, in one process, sampled for minutes.

`attnkit bench` compares runs by the ratio of each method's time to torch SDPA's.  That
ratio can only be as steady as the machine keeps the *relative* speed of a memory-bound
kernel and a compute-bound one.  This script times a fixed set of benchmark cases (same
inputs, one process, the bench's steady allocator and huge pages, nothing else running)
every few seconds and prints each sample against that call's best, and the range of each
method / SDPA ratio over the whole watch.  A cloud VM shares its host's caches and memory
bandwidth with other guests; what they do shows here and not in the guest's own load.

    python benchmarks/host_drift.py --seconds 420 --out benchmarks/results/host_drift.json

With ``--window S`` it also prints, per ratio, the best method time over the best SDPA
time in each consecutive S-second window: what a run of that length could report if it
sampled every case as densely as the watch.  ``--resample WATCH.json --k 5,8,...`` then
asks how many samples per case such a run needs: it draws k samples from each of two
back-to-back windows and counts how often their ratios differ by more than 15%.

    python benchmarks/host_drift.py --seconds 1260 --every 1 --missed --window 420 --out W.json
    python benchmarks/host_drift.py --resample W.json --window 420 --k 5,8,12,16,24
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
MISSED = [  # the cases whose ratios two back-to-back default runs disagreed on, and their SDPA
    ("blocktopk", 1024, "bf16", "fwd"), ("torch-sdpa", 1024, "fp32", "fwd_bwd"), ("nystrom", 1024, "fp32", "fwd_bwd"),
    ("torch-sdpa", 4096, "fp32", "fwd"), ("blocktopk", 4096, "fp32", "fwd"),
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


def _windows(samples: list[list[float]], seconds: float) -> list[list[list[float]]]:
    """The samples cut into consecutive windows of ``seconds`` (a last, shorter one is dropped)."""
    count = int(samples[-1][0] // seconds)
    return [[s for s in samples if k * seconds <= s[0] < (k + 1) * seconds] for k in range(count)]


def _best_ratio(samples: list[list[float]], i: int, j: int) -> float:
    """Column i's best time over column j's best time in ``samples`` (rows: time, then one
    column per call): the ratio a run that took these samples reports."""
    return min(s[i + 1] for s in samples) / min(s[j + 1] for s in samples)


def _ratio_columns(names: list[str]) -> list[tuple[str, int, int]]:
    """(name, method column, SDPA column) for each watched method with its SDPA case."""
    index = {name: i for i, name in enumerate(names)}
    pairs = []
    for i, name in enumerate(names):
        method, rest = name.split(" ", 1)
        j = index.get(f"torch-sdpa {rest}")
        if method != "torch-sdpa" and j is not None:
            pairs.append((name, i, j))
    return pairs


def resample(watch: dict, window: float, ks: list[int], tol: float = 0.15, draws: int = 2000,
             seed: int = 0) -> list[dict]:
    """How often two runs of ``window`` seconds, back to back, would disagree on a ratio.

    From a saved watch: draw ``k`` samples (rows: a method and its SDPA timed within the
    same few seconds, as in one visit of ``attnkit bench``) from each of the first two
    windows, take each window's best method time over best SDPA time, and count the draws
    where the two differ by more than ``tol``.  Returns one row per ratio and ``k``:
    ``{"case", "k", "p_miss", "p95"}`` (p95: the 95th percentile of the change).
    """
    import random

    first, second = _windows(watch["samples"], window)[:2]
    rng, rows = random.Random(seed), []
    for name, i, j in _ratio_columns(watch["cases"]):
        for k in ks:
            changes = []
            for _ in range(draws):
                ra, rb = (_best_ratio(rng.sample(w, k), i, j) for w in (first, second))
                changes.append(abs(rb / ra - 1))
            changes.sort()
            rows.append({"case": name, "k": k, "p_miss": sum(c > tol for c in changes) / draws,
                         "p95": changes[int(0.95 * draws)]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=420.0, help="how long to watch (default 420)")
    p.add_argument("--every", type=float, default=2.0, help="pause between samples, s (default 2)")
    p.add_argument("--out", type=Path, help="write every sample here (JSON)")
    p.add_argument("--missed", action="store_true",
                   help="also watch the cases back-to-back default runs disagreed on (BlockTopK, Nystrom)")
    p.add_argument("--window", type=float, default=0.0,
                   help="also print each ratio of best times in consecutive windows of this many seconds "
                        "(the figure a run of that length can reach at best), e.g. 420")
    p.add_argument("--resample", type=Path, metavar="WATCH.json",
                   help="measure nothing: from a saved watch, how often two back-to-back runs of --window "
                        "seconds (default 420) with --k samples per case would disagree by more than 15%%")
    p.add_argument("--k", default="5,8,12,16,24", help="samples per case and run for --resample (default 5,8,12,16,24)")
    args = p.parse_args()
    if args.resample:
        ks, window = [int(k) for k in args.k.split(",")], args.window or 420.0
        rows = resample(json.loads(args.resample.read_text()), window, ks)
        print(f"P(ratio moves > 15%) between two {window:g} s windows, k samples each (95th pct change):")
        print(f"  {'case':32s} " + "  ".join(f"{'k=' + str(k):>14}" for k in ks))
        for name in dict.fromkeys(r["case"] for r in rows):
            cells = [r for r in rows if r["case"] == name]
            print(f"  {name:32s} " + "  ".join(f"{r['p_miss']:6.1%} ({r['p95']:4.0%})" for r in cells))
        return
    cases = CASES + (MISSED if args.missed else [])
    # as `attnkit bench` times; torch reads the huge-pages setting at its first allocation, which is still to come
    allocator = f"{steady_allocator()}; {huge_pages()}"
    preset = PRESETS["bert-base"]
    names = [f"{m} {mode} N={n} {dt}" for m, n, dt, mode in cases]
    fns = [make_call(Case(m, preset, n, dt, mode)) for m, n, dt, mode in cases]
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
    windows = _windows(samples, args.window) if args.window > 0 else []
    for name, i, j in _ratio_columns(names):
        ratios = [s[i + 1] / s[j + 1] for s in samples]
        spread = max(ratios) / min(ratios) - 1
        row = {"case": name, "ratio_min": min(ratios), "ratio_max": max(ratios), "spread": spread}
        print(f"  {name:32s} {min(ratios):.3f} - {max(ratios):.3f}  (max/min - 1 = {spread:.0%})")
        if windows:  # what a run of one window's length would report: best method time / best SDPA time
            best_ratio = [_best_ratio(w, i, j) for w in windows]
            steps = [b / a - 1 for a, b in zip(best_ratio, best_ratio[1:])]
            row |= {"window_s": args.window, "window_ratios": best_ratio, "window_steps": steps}
            print(f"  {'':32s} per {args.window:g} s window: " + ", ".join(f"{r:.3f}" for r in best_ratio)
                  + ("; largest step " + f"{max(steps, key=abs):+.1%}" if steps else ""))
        summary.append(row)
    if args.out:
        args.out.write_text(json.dumps({
            "machine": {**machine_info("cpu"), "allocator": allocator}, "platform": platform.platform(),
            "cases": names, "best_s": best,
            "samples": samples, "ratio_ranges": summary, "command": "python benchmarks/host_drift.py "
            + f"--seconds {args.seconds:g} --every {args.every:g}" + (" --missed" if args.missed else "")
            + (f" --window {args.window:g}" if args.window > 0 else ""),
        }, indent=1) + "\n")


if __name__ == "__main__":
    main()
