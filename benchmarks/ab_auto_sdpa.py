"""Interleaved A/B timing of ``attnkit.attention(method="auto")`` against torch SDPA.

"auto" calls SDPA itself, so the two differ only by attnkit's dispatch (validation, the
capability check, and under grad a thin autograd wrapper).  Timing them one after the
other, as the sweep does, lets machine drift between the two runs pass for a
difference; here the calls alternate (A, B, A, B, ...) in one process, so drift hits
both alike, and the ratio of medians is the overhead.

Usage::

    python benchmarks/ab_auto_sdpa.py --out benchmarks/results   # ab_auto_sdpa.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import attnkit
from attnkit.bench.exact import machine_info

B, H, D = 1, 8, 64


def interleaved(fns: dict, rounds: int) -> dict[str, float]:
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for r in range(rounds):
        order = list(fns.items()) if r % 2 == 0 else list(fns.items())[::-1]
        for name, fn in order:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 8192])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    rows = []
    for n in args.n:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, H, n, D, generator=g).requires_grad_() for _ in range(3))  # (B, H, N, D)
        dout = torch.randn(B, H, n, D, generator=g)

        def fwd(fn):
            def call():
                with torch.no_grad():
                    fn(q, k, v)
            return call

        def fwd_bwd(fn):
            def call():
                q.grad = k.grad = v.grad = None
                fn(q, k, v).backward(dout)
            return call

        def auto(q, k, v):
            return attnkit.attention(q, k, v)

        for mode, wrap in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
            med = interleaved({"sdpa": wrap(F.scaled_dot_product_attention), "auto": wrap(auto)}, args.rounds)
            rows.append({"n": n, "mode": mode, **med, "ratio": med["auto"] / med["sdpa"]})
            print(f"N={n} {mode}: sdpa {med['sdpa'] * 1e3:.1f} ms, auto {med['auto'] * 1e3:.1f} ms, "
                  f"auto/sdpa {med['auto'] / med['sdpa']:.3f}", flush=True)
    m = machine_info()
    lines = ["# auto vs SDPA, interleaved", "",
             f"Machine: {m['cpu_model']}, {m['cpu_count']} logical CPUs; torch {m['torch']} ({m['torch_threads']} "
             f"threads); attnkit commit {m['git_commit']}; {m['date_utc']}; load average at start "
             f"{m['loadavg_start']} (the machine was shared).", "",
             f"B={B}, H={H}, D={D}, fp32, non-causal. Median of {args.rounds} calls each, alternating auto and "
             "SDPA in one process (`python benchmarks/ab_auto_sdpa.py`).", "",
             "| N | mode | SDPA | auto | auto / SDPA |", "|---|---|---|---|---|"]
    lines += [f"| {r['n']} | {r['mode']} | {r['sdpa'] * 1e3:.1f} ms | {r['auto'] * 1e3:.1f} ms | {r['ratio']:.3f} |"
              for r in rows]
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ab_auto_sdpa.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
