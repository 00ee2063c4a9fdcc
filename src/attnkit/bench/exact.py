"""Benchmark of the exact-attention layer on CPU: time and peak memory against N.

Compares, at B=1, H=8, D=64, fp32, non-causal, no mask:

- ``naive``: materialised attention written out below (not attnkit), the baseline;
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` called directly;
- ``tiled``: ``attnkit.attention(..., method="tiled")`` (O(N) memory, pure PyTorch);
- ``auto``: ``attnkit.attention(..., method="auto")``.

For each N it times the forward (under no_grad) and the forward+backward (median of
``torch.utils.benchmark`` blocks after warm-up, see :mod:`attnkit.bench.timing`) and
measures the peak extra memory of one call in a fresh process (torch profiler memory
records, see :mod:`attnkit.bench.memory`).  A case whose projected peak exceeds the
memory budget is listed as skipped, with the projection.

Usage (``attnkit bench --suite exact`` runs this module; ``benchmarks/bench_exact.py`` too)::

    attnkit bench --suite exact --out benchmarks/results  # full (~15-25 min)
    attnkit bench --suite exact --quick --out /tmp/bench  # < 1 min
    attnkit bench --blocks --out benchmarks/results       # block-size sweep

Writes ``exact_cpu.json`` (raw numbers + machine) and ``exact_cpu.md`` (tables), or
``exact_blocks.json`` and ``exact_blocks.md`` with ``--blocks``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import attnkit
from attnkit.bench import attention_flops, forward_backward_closure, forward_closure, measure_peak
from attnkit.bench.machine import machine_info
from attnkit.bench.report import fmt_bytes, fmt_ratio, fmt_time
from attnkit.bench.timing import LOADED, Timing, pool, timed_quietly
from attnkit.core.inputs import prepare_inputs

B, H, D = 1, 8, 64
DTYPE = torch.float32
FP32 = 4  # bytes
METHODS = ("naive", "sdpa", "tiled", "auto")
MODES = ("fwd", "fwd_bwd")
FULL_NS = (1024, 2048, 4096, 8192, 16384)
QUICK_NS = (512, 1024)
BLOCK_CHOICES = (  # (block_q, block_k) at N=4096; the default rule's pick is added
    (64, 512), (128, 512), (512, 512), (1024, 512),
    (256, 128), (256, 256), (256, 1024), (256, 2048),
    (128, 128), (1024, 1024), (2048, 2048),
)
GOALS = {"mem_pct": 5.0, "growth": 2.2, "tiled_sdpa": 2.0, "auto_sdpa": 0.05}


def naive_attention(q, k, v):
    """Plain materialised attention: the (B, H, N, S) score and probability matrices."""
    scale = q.shape[-1] ** -0.5
    return torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1) @ v


def attention_fn(method: str):
    """The (q, k, v) -> out callable for a method name or an attnkit spec string."""
    if method == "naive":
        return naive_attention
    if method == "sdpa":
        return F.scaled_dot_product_attention
    return lambda q, k, v: attnkit.attention(q, k, v, method=method)


def default_blocks(n: int) -> tuple[int, int]:
    """(block_q, block_k) that ``attnkit.Tiled()``'s rule picks at this shape."""
    q = torch.empty(B, H, n, D, device="meta")  # (B, H, N, D)
    prm = attnkit.Tiled().params(prepare_inputs(q, q, q, None, 0.0, False, None))
    return prm.block_q, prm.block_k


def make_case(method: str, n: int, mode: str, seed: int = 0):
    """Allocate q, k, v (B, H, n, D) (and the output gradient) and return the call to measure."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=DTYPE) for _ in range(3))  # (B, H, N, D)
    fn = attention_fn(method)
    if mode == "fwd":
        return forward_closure(fn, q, k, v)
    grad_out = torch.randn(B, H, n, D, generator=g, dtype=DTYPE)
    return forward_backward_closure(fn, *(t.requires_grad_() for t in (q, k, v)), grad_out)


def projected_bytes(method: str, n: int, mode: str) -> int:
    """A rough upper estimate of a case's peak extra memory, for the budget check only.

    naive: q@k^T and its scaled copy (2 x B·H·N·N fp32) in forward; in backward the saved
    probabilities, their gradient and the scores' gradient (3x).  The others hold
    O(N·D) tensors plus a few 4 MiB score tiles.
    """
    nd = B * H * n * D * FP32
    if method == "naive":
        return (2 if mode == "fwd" else 3) * B * H * n * n * FP32 + 4 * nd
    return 16 * nd + 3 * 4 * 2**20


def run_case(method: str, n: int, mode: str, args) -> dict:
    row = {"method": method, "n": n, "mode": mode, "projected_bytes": projected_bytes(method, n, mode),
           "flops": attention_flops(B, H, n, n, D, mode=mode), "status": "ok"}
    if row["projected_bytes"] > args.mem_budget:
        row["status"] = "skipped"
        row["reason"] = (f"projected peak {fmt_bytes(row['projected_bytes'])} exceeds the memory budget "
                         f"{fmt_bytes(args.mem_budget)} (--mem-budget-gib)")
        return row
    try:
        if not args.no_timing:
            fn = make_case(method, n, mode)
            row["time"] = timed_quietly(fn, args)
            del fn
    except Exception as e:  # one failing case must not stop the sweep; it is reported
        row["status"], row["reason"] = "error", f"timing: {type(e).__name__}: {e}"
    gc.collect()
    timeout = 120 + 20 * row["time"]["median"] if "time" in row else None
    mem = measure_peak(make_case, method, n, mode, timeout=timeout)
    row["memory"] = mem.as_dict()
    if not mem.ok:
        row["status"] = "error"
        row["reason"] = (row.get("reason", "") + f" memory: {mem.error}").strip()
    return row


def lookup(results, method, n, mode, key):
    for r in results:
        if (r["method"], r["n"], r["mode"]) == (method, n, mode) and r["status"] == "ok":
            return r.get("time", {}).get("median") if key == "time" else r["memory"]["peak_bytes"]
    return None


def ratio(a, b):
    return a / b if a is not None and b else None


def growth(results, method, mode, n):
    """Peak memory at n over peak memory at n/2."""
    return ratio(lookup(results, method, n, mode, "mem"), lookup(results, method, n // 2, mode, "mem"))


def pick_n(preferred: int, ns) -> int:
    return preferred if preferred in ns else max(ns)


def compute_targets(results, ns) -> list[dict]:
    n_mem, n_time = pick_n(8192, ns), pick_n(4096, ns)
    mem_pct = ratio(lookup(results, "tiled", n_mem, "fwd_bwd", "mem"), lookup(results, "naive", n_mem, "fwd_bwd", "mem"))
    growths = [(n, growth(results, "tiled", mode, n)) for n in ns for mode in MODES]
    growths = [(n, g) for n, g in growths if g is not None]
    worst_growth = max(growths, key=lambda x: x[1]) if growths else (None, None)
    tiled_sdpa = ratio(lookup(results, "tiled", n_time, "fwd", "time"), lookup(results, "sdpa", n_time, "fwd", "time"))
    auto = [(n, ratio(lookup(results, "auto", n, "fwd", "time"), lookup(results, "sdpa", n, "fwd", "time"))) for n in ns]
    auto = [(n, a) for n, a in auto if a is not None]
    worst_auto = max(auto, key=lambda x: abs(x[1] - 1)) if auto else (None, None)

    def row(name, value, shown, goal, met):
        return {"target": name, "value": value, "shown": shown, "goal": goal, "met": None if value is None else met}

    return [
        row(f"tiled fwd+bwd peak memory / naive's, N={n_mem}", mem_pct, fmt_ratio(mem_pct, pct=True),
            f"<= {GOALS['mem_pct']:g}%", mem_pct is not None and 100 * mem_pct <= GOALS["mem_pct"]),
        row("tiled peak memory growth per doubling of N (worst, fwd and fwd+bwd)", worst_growth[1],
            f"{fmt_ratio(worst_growth[1])} (at N={worst_growth[0]})" if growths else "-",
            f"<= {GOALS['growth']:g}x", worst_growth[1] is not None and worst_growth[1] <= GOALS["growth"]),
        row(f"tiled / SDPA forward time, N={n_time}", tiled_sdpa, fmt_ratio(tiled_sdpa),
            f"<= {GOALS['tiled_sdpa']:g}x", tiled_sdpa is not None and tiled_sdpa <= GOALS["tiled_sdpa"]),
        row("auto / SDPA forward time (worst over N)", worst_auto[1],
            f"{fmt_ratio(worst_auto[1])} (at N={worst_auto[0]}); all: "
            + ", ".join(f"{n}: {a:.3f}" for n, a in auto) if auto else "-",
            f"within {100 * GOALS['auto_sdpa']:g}%",
            worst_auto[1] is not None and abs(worst_auto[1] - 1) <= GOALS["auto_sdpa"]),
    ]


def targets_markdown(targets) -> list[str]:
    lines = ["| target | measured | goal | met |", "|---|---|---|---|"]
    for t in targets:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {t['shown']} | {t['goal']} | {met} |")
    return lines


def header_markdown(title: str, report: dict) -> list[str]:
    m, c = report["machine"], report["config"]
    return [
        f"# {title}", "",
        f"Machine: {m['cpu_model']}, {m['cpu_count']} logical CPUs, {fmt_bytes(m['mem_total_bytes'])} RAM; "
        f"torch {m['torch']} ({m['torch_threads']} threads), Python {m['python']}; attnkit {m['attnkit']} "
        f"(commit {m['git_commit']}); {m['date_utc']}. Load average at start {m['loadavg_start']}, "
        f"at end {m.get('loadavg_end')}: the machine was shared and load was not controlled.", "",
        f"Shapes: B={c['B']}, H={c['H']}, D={c['D']}, {c['dtype']}, non-causal, no mask. "
        f"Command: `{c['command']}` ({c['wall_s']:.0f} s).", "",
    ]


METHOD_NOTES = [
    "Time: median (± interquartile range) of `torch.utils.benchmark` `blocked_autorange` blocks after "
    "{warmup} warm-up call(s), about {repeats} blocks for slow cases; forward under `torch.no_grad()`, "
    "forward+backward into q, k, v with fresh gradients each call. GFLOP/s by 4·B·H·N²·D forward, 2.5x that backward. "
    "Before each case the script waits up to {quiet_wait:g} s for other processes to use <= {quiet_load:.0%} of the "
    "CPU, and re-times a case up to {retries} times when they used more than " + f"{LOADED:.0%}" + ", keeping the "
    "least disturbed attempt (all attempts in the JSON); † marks a timing during which they still used more than "
    + f"{LOADED:.0%}" + " (`other_load`).",
    "Peak memory: highest bytes live in torch's CPU allocator above the start of one call, measured in a fresh "
    "process with `torch.profiler` memory records (`attnkit.bench.memory`), kernel workspaces included; inputs not "
    "counted; output, saved tensors and gradients counted; memory that BLAS/oneDNN/OpenMP take from malloc "
    "directly is not seen (small, independent of N). Growth: peak at N / peak at N/2.",
]


def render_sweep(report: dict) -> str:
    res, ns = report["results"], report["config"]["ns"]
    c = report["config"]
    out = header_markdown("Exact attention on CPU", report)
    notes = METHOD_NOTES[1:] if c["no_timing"] else METHOD_NOTES
    out += [n.format(**c) for n in notes] + ["Time: not measured (`--no-timing`)." if c["no_timing"] else "", ""]
    out += ["## Targets", ""] + targets_markdown(report["targets"]) + [""]
    out += ["## Time and peak memory", "",
            "| N | method | fwd time | fwd+bwd time | fwd GFLOP/s | fwd+bwd GFLOP/s | peak mem fwd | peak mem fwd+bwd "
            "| mem growth fwd | mem growth fwd+bwd |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n in ns:
        for method in c["methods"]:
            cells = {}
            for mode in MODES:
                r = next(r for r in res if (r["method"], r["n"], r["mode"]) == (method, n, mode))
                t = r.get("time") if r["status"] == "ok" else None
                cells[mode] = (fmt_time(t) if r["status"] == "ok" else r["status"],
                               f"{r['flops'] / t['median'] / 1e9:.1f}" if t else "-",
                               fmt_bytes(lookup(res, method, n, mode, "mem")),
                               fmt_ratio(growth(res, method, mode, n)))
            f, fb = cells["fwd"], cells["fwd_bwd"]
            out.append(f"| {n} | {method} | {f[0]} | {fb[0]} | {f[1]} | {fb[1]} | {f[2]} | {fb[2]} | {f[3]} | {fb[3]} |")
    out += ["", "## Ratios", "",
            "| N | tiled/SDPA time fwd | tiled/SDPA time fwd+bwd | auto/SDPA time fwd | auto/SDPA time fwd+bwd "
            "| tiled/naive mem fwd | tiled/naive mem fwd+bwd | tiled/SDPA mem fwd+bwd |", "|---|---|---|---|---|---|---|---|"]
    for n in ns:
        t = {(m, mode): lookup(res, m, n, mode, "time") for m in METHODS for mode in MODES}
        mem = {(m, mode): lookup(res, m, n, mode, "mem") for m in METHODS for mode in MODES}
        out.append(
            f"| {n} | {fmt_ratio(ratio(t['tiled', 'fwd'], t['sdpa', 'fwd']))} "
            f"| {fmt_ratio(ratio(t['tiled', 'fwd_bwd'], t['sdpa', 'fwd_bwd']))} "
            f"| {fmt_ratio(ratio(t['auto', 'fwd'], t['sdpa', 'fwd']))} "
            f"| {fmt_ratio(ratio(t['auto', 'fwd_bwd'], t['sdpa', 'fwd_bwd']))} "
            f"| {fmt_ratio(ratio(mem['tiled', 'fwd'], mem['naive', 'fwd']), pct=True)} "
            f"| {fmt_ratio(ratio(mem['tiled', 'fwd_bwd'], mem['naive', 'fwd_bwd']), pct=True)} "
            f"| {fmt_ratio(ratio(mem['tiled', 'fwd_bwd'], mem['sdpa', 'fwd_bwd']))} |"
        )
    others = [r for r in res if r["status"] != "ok"]
    out += ["", "## Skipped and failed cases", ""]
    out += [f"- {r['method']} {r['mode']} N={r['n']}: {r['status']}: {r['reason']}" for r in others] or ["- none"]
    return "\n".join(out) + "\n"


def sweep(args) -> dict:
    results = []
    warm_process()
    for n in args.n:
        for method in args.methods:
            for mode in MODES:
                start = time.perf_counter()
                row = run_case(method, n, mode, args)
                results.append(row)
                shown = fmt_time(row.get("time")) if row["status"] == "ok" else f"{row['status']}: {row['reason']}"
                mem = fmt_bytes(row.get("memory", {}).get("peak_bytes"))
                print(f"N={n:>6} {method:>6} {mode:>7}: {shown}; peak {mem} ({time.perf_counter() - start:.0f} s)",
                      flush=True)
    return {"results": results, "targets": compute_targets(results, args.n)}


def blocks(args) -> dict:
    """Time the default tile and the alternatives in ``args.rounds`` rounds (order reversed
    every other round) and pool each one's blocks, so that drift hits all alike."""
    n = args.n[0] if args.n_given else 4096
    default = default_blocks(n)
    choices = [None] + [c for c in BLOCK_CHOICES if c != default and c[0] <= n and c[1] <= n]
    specs = ["tiled" if c is None else f"tiled:block_q={c[0]},block_k={c[1]}" for c in choices]
    measured: dict[tuple[str, str], list[Timing]] = {}
    warm_process()
    for rnd in range(args.rounds):
        for spec in specs if rnd % 2 == 0 else specs[::-1]:
            for mode in MODES:
                t = timed_quietly(make_case(spec, n, mode), args)
                del t["attempts"]
                measured.setdefault((spec, mode), []).append(Timing(**t))
                gc.collect()
            print(f"round {rnd + 1}: {spec:>32}: fwd {fmt_time(measured[spec, 'fwd'][-1].as_dict())}, "
                  f"fwd+bwd {fmt_time(measured[spec, 'fwd_bwd'][-1].as_dict())}", flush=True)
    rows = []
    for spec, choice in zip(specs, choices):
        bq, bk = default if choice is None else choice
        rows.append({"spec": spec, "block_q": bq, "block_k": bk, "default": choice is None, "n": n,
                     "tile_bytes": B * H * bq * bk * FP32,
                     **{mode: pool(measured[spec, mode]).as_dict() for mode in MODES}})
    return {"blocks": rows}


def warm_process() -> None:
    """One small untimed call of each kind, so that the first timed case pays no one-off costs."""
    for method in ("sdpa", "tiled"):
        for mode in MODES:
            make_case(method, 512, mode)()


def render_blocks(report: dict) -> str:
    rows = report["blocks"]
    base = next(r for r in rows if r["default"])
    out = header_markdown("Tiled attention: block sizes on CPU", report)
    out += [f"N = S = {base['n']}. The default rule of `attnkit.Tiled()` picks "
            f"block_q={base['block_q']}, block_k={base['block_k']}. Time: median ± IQR of `torch.utils.benchmark` "
            f"blocks after warm-up, pooled over {report['config']['rounds']} rounds (order reversed every other "
            f"round); ratio = time / default's time (lower is faster). Score tile = B·H·block_q·block_k fp32.", "",
            "| block_q | block_k | score tile | fwd time | fwd / default | fwd+bwd time | fwd+bwd / default |",
            "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["fwd"]["median"]):
        mark = " (default)" if r["default"] else ""
        out.append(f"| {r['block_q']}{mark} | {r['block_k']} | {fmt_bytes(r['tile_bytes'])} | {fmt_time(r['fwd'])} "
                   f"| {fmt_ratio(r['fwd']['median'] / base['fwd']['median'])} | {fmt_time(r['fwd_bwd'])} "
                   f"| {fmt_ratio(r['fwd_bwd']['median'] / base['fwd_bwd']['median'])} |")
    return "\n".join(out) + "\n"


def print_summary(targets) -> None:
    print("\nTargets:")
    for t in targets:
        met = "n/a" if t["met"] is None else ("met" if t["met"] else "NOT MET")
        print(f"  {t['target']}: {t['shown']} (goal {t['goal']}): {met}")


def parse_args(argv=None):
    mem_total = machine_info()["mem_total_bytes"] or 16 * 2**30
    p = argparse.ArgumentParser(prog="attnkit bench --suite exact", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", help=f"sequence lengths (default {FULL_NS}; --blocks: 4096)")
    p.add_argument("--methods", nargs="+", default=list(METHODS),
                   help=f"methods: naive, sdpa, or attnkit method specs such as tiled:block_q=128 (default {METHODS})")
    p.add_argument("--repeats", type=int, help="measured blocks per slow case (default 5; --quick 3)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up calls before timing (default 1)")
    p.add_argument("--min-run-time", type=float, help="least measured seconds per case (default 0.5; --quick 0.1)")
    p.add_argument("--mem-budget-gib", type=float, default=mem_total / 2**31,
                   help="skip cases projected to need more (default: half the RAM)")
    p.add_argument("--quiet-wait", type=float,
                   help="seconds to wait at most, before each timing, for a quiet machine (default 10; --quick 0)")
    p.add_argument("--retries", type=int,
                   help=f"re-time a case up to this many times when others used > {LOADED:.0%} of the CPU "
                        "(default 2; --quick 0)")
    p.add_argument("--quiet-load", type=float, default=0.25,
                   help="'quiet': other processes use at most this fraction of all CPUs (default 0.25)")
    p.add_argument("--out", type=Path, help="directory for the JSON and markdown results")
    p.add_argument("--quick", action="store_true", help=f"N in {QUICK_NS}, 3 repeats: under a minute")
    p.add_argument("--no-timing", action="store_true", help="measure peak memory only (it does not depend on load)")
    p.add_argument("--blocks", action="store_true", help="time tiled at N=4096 for several (block_q, block_k)")
    p.add_argument("--rounds", type=int, default=2, help="--blocks: rounds over the choices, pooled (default 2)")
    args = p.parse_args(argv)
    args.n_given = args.n is not None
    if args.blocks and args.no_timing:
        p.error("--blocks times block sizes; --no-timing leaves nothing to do")
    if args.quick:
        args.n = args.n or list(QUICK_NS)
    defaults = {"repeats": (3, 5), "min_run_time": (0.1, 0.5), "quiet_wait": (0.0, 10.0), "retries": (0, 2)}  # (quick, full)
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.n = sorted(args.n or FULL_NS)
    args.mem_budget = int(args.mem_budget_gib * 2**30)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    report = {"machine": machine_info()}
    report.update(blocks(args) if args.blocks else sweep(args))
    report["machine"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    report["config"] = {
        "B": B, "H": H, "D": D, "dtype": str(DTYPE).removeprefix("torch."), "ns": args.n, "methods": args.methods,
        "repeats": args.repeats, "warmup": args.warmup, "min_run_time": args.min_run_time,
        "quiet_wait": args.quiet_wait, "quiet_load": args.quiet_load, "retries": args.retries, "rounds": args.rounds if args.blocks else None,
        "no_timing": args.no_timing,
        "mem_budget_bytes": args.mem_budget, "memory_probe": "profiler (torch.profiler memory records, fresh process)",
        "command": "attnkit bench --suite exact " + " ".join(sys.argv[1:] if argv is None else argv),
        "wall_s": time.perf_counter() - start,
    }
    name = "exact_blocks" if args.blocks else "exact_cpu"
    text = render_blocks(report) if args.blocks else render_sweep(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / f"{name}.md").write_text(text)
        print(f"wrote {args.out / name}.json and .md")
    if not args.blocks:
        print_summary(report["targets"])
    print(f"total {report['config']['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
