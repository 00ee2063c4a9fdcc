"""``attnkit bench``: the benchmark and report that show what each attention method costs
and what it loses, against vanilla attention, torch SDPA and xformers.

Default (the README's first command): CPU (CUDA when present), preset bert-base
(H=12, D=64), N in 512..4096, fp32 and bf16, every registered method and the baselines;
about 5-10 minutes on 2 CPU cores (cases over the time or memory budget are skipped and
listed with their projected cost).  ``--quick``: N in 256, 512, fp32, under a minute.
``--full``: N up to 16384 with larger budgets (an hour or more on 2 cores).

Writes ``results.json`` (machine, configuration, every raw sample), ``report.md`` and
PNG plots into ``--out`` (default ``bench-out``), and prints the summary at N=2048
(and 4096, 16384 when run).  ``--suite exact`` runs the exact-layer benchmark
(``exact_cpu.*``, ``--blocks``), ``--suite approx`` the sub-quadratic families' table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

__all__ = ["main", "parse_args", "DEFAULT_NS", "QUICK_NS", "FULL_NS"]

DEFAULT_NS = (512, 1024, 2048, 4096)
QUICK_NS = (256, 512)
FULL_NS = (512, 1024, 2048, 4096, 8192, 16384)
STRESS_NS = (4096, 16384)
# (quick, default, full)
PROFILES = {
    "time_budget_s": (1.0, 1.5, 60.0),
    "retries": (0, 1, 1),
    "run_budget_s": (40.0, 540.0, None),
    "repeats": (2, 1, 5),
    "min_run_time": (0.05, 0.05, 0.5),
    "rounds": (1, 2, 3),
    "max_rounds": (1, 16, 3),
    "accuracy_max_n": (512, 4096, 4096),
    "prob_max_n": (512, 1024, 1024),
    "flop_check_max_n": (256, 1024, 1024),
}


def default_methods() -> list[str]:
    """The baselines and every registered method that has a default configuration."""
    import attnkit
    from attnkit.core.registry import default_config

    return ["vanilla", "torch-sdpa", "xformers", *(n for n in attnkit.methods() if default_config(n) is not None)]


def parse_args(argv=None) -> argparse.Namespace:
    from .cases import DTYPES, PRESETS

    p = argparse.ArgumentParser(prog="attnkit bench", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=("all", "exact", "approx"), default="all",
                   help="all (default): every method and the baselines; exact: the exact-layer benchmark "
                        "(exact_cpu.*, see `attnkit bench --suite exact --help`); approx: the sub-quadratic "
                        "families' speed-up table (benchmarks/bench_approx.py)")
    p.add_argument("--methods", nargs="+", help="baselines (vanilla, torch-sdpa, xformers) and attnkit method specs "
                   "such as performer:features=256 (default: the baselines and every registered method)")
    p.add_argument("--preset", default="bert-base",
                   help=f"attention shape: {', '.join(f'{k} ({v.describe()})' for k, v in PRESETS.items())}, "
                        "or HQxHKVxD (default bert-base)")
    p.add_argument("--batch", type=int, default=1, help="batch size B (default 1)")
    p.add_argument("--n", type=int, nargs="+", help=f"sequence lengths (default {DEFAULT_NS}; --quick {QUICK_NS}; "
                   f"--full {FULL_NS})")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES),
                   help="fp32, bf16, fp16, amp-fp16 (fp32 inputs under torch.autocast), amp-bf16 "
                        "(default: fp32 bf16 on CPU; fp32 amp-fp16 bf16 on CUDA; --quick: fp32)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help=f"N in {QUICK_NS}, fp32, short timings: under a minute")
    p.add_argument("--full", action="store_true", help=f"N in {FULL_NS} with a 60 s per-call budget and no run "
                   "budget (an hour or more on 2 CPU cores)")
    g = p.add_argument_group("timing")
    g.add_argument("--warmup", type=int, default=1, help="warm-up calls before timing (default 1)")
    g.add_argument("--repeats", type=int, help="measured blocks per slow case in round one (default 1, as in a "
                   "visit: the spread comes from the rounds; --quick 2, one round only; --full 5)")
    g.add_argument("--min-run-time", type=float, help="least measured seconds per case and process (default 0.05; "
                   "--full 0.5)")
    g.add_argument("--rounds", type=int, help="rounds each case is timed in where the run budget allows: its own "
                   "fresh process, then visits that time all cases of one N, dtype and mode in turn, spread over the "
                   "run, in one process kept for all visits (default 2; --quick 1; --full 3)")
    g.add_argument("--max-rounds", type=int, help="visits go on within the run budget until each case has this many "
                   "rounds (default 16; --quick 1; --full 3)")
    g.add_argument("--quiet-wait", type=float, default=0.0,
                   help="seconds to wait at most, before each timing, for other processes to calm down (default 0)")
    g.add_argument("--quiet-load", type=float, default=0.25, help="'calm': others use at most this share of the CPU")
    g.add_argument("--retries", type=int, help="re-time a case this many times when others used > 10%% "
                   "of the CPU meanwhile, keeping the least disturbed (default 1; --quick 0)")
    g = p.add_argument_group("budgets (cases over them are skipped and listed with the projection)")
    g.add_argument("--time-budget-s", type=float, help="per call, projected from smaller N (default 1.5; --quick 1; --full 60)")
    g.add_argument("--mem-budget-gib", type=float, help="projected peak extra memory (default: a quarter of the RAM)")
    g.add_argument("--run-budget-s", type=float, help="the whole sweep (default 540; --quick 40; --full none; "
                   "0 = none)")
    g = p.add_argument_group("what to measure")
    g.add_argument("--accuracy-max-n", type=int, help="largest N for errors against float64 (default 4096)")
    g.add_argument("--prob-max-n", type=int, help="largest N for implied-probability errors (default 1024)")
    g.add_argument("--flop-check-max-n", type=int, help="largest N for the FlopCounterMode cross-check (default 1024)")
    g.add_argument("--no-accuracy", action="store_true", help="skip the error measurements")
    g.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    g.add_argument("--no-huge-pages", action="store_true", help="time with torch's default 4 KiB pages instead "
                   "of transparent huge pages for large tensors (see attnkit.bench.timing.huge_pages)")
    g.add_argument("--compile", action="store_true", help="also time each method under torch.compile "
                   "(compile time reported separately)")
    g = p.add_argument_group("other modes")
    g.add_argument("--stress", action="store_true", help="instead of the sweep: NaN/inf counts on numerically hard "
                   f"inputs at N in --n (default {STRESS_NS}); writes stress.json and stress.md")
    g.add_argument("--profile", nargs=2, metavar=("METHOD", "N"), help="instead of the sweep: profile one "
                   "forward+backward case, write a Chrome trace into --out and print the top operators")
    g.add_argument("--compare", type=Path, metavar="OLD_JSON", help="print the change per case against a saved "
                   "results.json (after this run, or against --against without running)")
    g.add_argument("--against", type=Path, metavar="NEW_JSON", help="with --compare: compare two saved runs, run nothing")
    g.add_argument("--fail-if-regression", type=float, metavar="PCT",
                   help="exit with status 3 if any case compared got slower or used more memory by more than PCT%%")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="output directory (default bench-out)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="print every case as it is measured")
    args = p.parse_args(argv)
    if args.quick and args.full:
        p.error("--quick and --full contradict each other")
    if args.fail_if_regression is not None and args.compare is None:
        p.error("--fail-if-regression needs --compare OLD_JSON")
    if args.against is not None and args.compare is None:
        p.error("--against needs --compare OLD_JSON")
    level = 0 if args.quick else (2 if args.full else 1)
    for name, values in PROFILES.items():
        if getattr(args, name, None) is None:
            setattr(args, name, values[level])
    for name in ("repeats", "rounds", "max_rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(args, name)}")
    if args.run_budget_s == 0:
        args.run_budget_s = None
    args.n = sorted(args.n or (STRESS_NS if args.stress else (QUICK_NS, DEFAULT_NS, FULL_NS)[level]))
    if min(args.n) < 1:
        p.error(f"--n: lengths must be >= 1, got {args.n}")
    return args


def _mem_budget(args) -> int:
    if args.mem_budget_gib is not None:
        return int(args.mem_budget_gib * 2**30)
    from .machine import machine_info

    total = machine_info()["mem_total_bytes"] or 16 * 2**30
    return total // 4


def build_config(args):
    from .cases import default_dtypes, parse_preset
    from .machine import pick_device
    from .runner import Config

    device = pick_device(args.device)
    dtypes = args.dtypes or (["fp32"] if args.quick else default_dtypes(device))
    return Config(
        methods=args.methods or default_methods(), preset=parse_preset(args.preset, args.batch), ns=args.n,
        dtypes=dtypes, device=device, warmup=args.warmup, repeats=args.repeats, min_run_time=args.min_run_time,
        rounds=args.rounds, max_rounds=args.max_rounds,
        quiet_wait=args.quiet_wait, quiet_load=args.quiet_load, retries=args.retries,
        time_budget_s=args.time_budget_s, mem_budget_bytes=_mem_budget(args), run_budget_s=args.run_budget_s,
        memory=not args.no_memory, accuracy=not args.no_accuracy, accuracy_max_n=args.accuracy_max_n,
        prob_max_n=args.prob_max_n, flop_check_max_n=args.flop_check_max_n, compile=args.compile,
        progress=not args.no_progress, verbose=args.verbose,
    )


def _command(argv) -> str:
    return "attnkit bench " + " ".join(sys.argv[2:] if argv is None and len(sys.argv) > 1 and sys.argv[1] == "bench"
                                       else (sys.argv[1:] if argv is None else argv))


def run(args, argv=None) -> tuple[dict, int]:
    """Run what ``args`` asks for, write the outputs; returns (report, exit status)."""
    from .machine import machine_info
    from .report import render_markdown, seed_summary
    from .runner import run_profile, run_stress, run_sweep
    from .timing import huge_pages, steady_allocator

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.against is not None:
        return {}, _compare(json.loads(args.compare.read_text()), json.loads(args.against.read_text()), args)
    cfg = build_config(args)
    if args.out.exists() and not args.out.is_dir():
        raise SystemExit(f"attnkit bench: argument --out: {args.out} is a file; give a directory for the report")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.profile:
        method, n = args.profile[0], int(args.profile[1])
        path, table = run_profile(cfg, method, n, args.out)
        print(table)
        print(f"wrote the trace {path} (open it in chrome://tracing or https://ui.perfetto.dev)")
        return {}, 0
    start = time.monotonic()
    report = {"machine": machine_info(cfg.device)}
    if cfg.device == "cpu" and cfg.timing:
        # before anything allocates or the forkserver starts: both read the setting once
        pages = huge_pages(not args.no_huge_pages)
        report["machine"]["allocator"] = f"{steady_allocator()}; {pages}"
    if args.stress:
        report["stress"] = run_stress(cfg, args.n)
    else:
        report.update(run_sweep(cfg))
    report["machine"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    report["config"] = {**cfg.as_dict(), "command": _command(argv)}
    report["wall_s"] = time.monotonic() - start
    if args.stress:
        _write_stress(report, args.out)
        bad = [r for r in report["stress"] if r.get("nan") or r.get("inf") or r.get("masked_rows_nonzero")]
        for r in bad:
            print(f"{r['kind']} N={r['n']} {r['method']}: NaN {r['nan']}, inf {r['inf']}, "
                  f"masked rows not 0: {r.get('masked_rows_nonzero', '-')}")
        print(f"stress: {len(report['stress'])} runs, {len(bad)} with NaN/inf; wrote {args.out}/stress.md")
        return report, 0
    (args.out / "results.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (args.out / "report.md").write_text(render_markdown(report))
    written = [args.out / "results.json", args.out / "report.md"]
    if not args.no_plots:
        from .plots import write_plots

        written += write_plots(report, args.out)
    print("\n".join(seed_summary(report)))
    skipped = sum(r["status"] == "skipped" for r in report["cases"])
    failed = sum(r["status"] == "error" for r in report["cases"])
    print(f"\n{len(report['cases'])} cases ({skipped} skipped over budget, {failed} failed: listed in report.md); "
          f"{report['wall_s']:.0f} s; wrote {', '.join(str(p) for p in written)}")
    status = 0
    if args.compare is not None:
        status = _compare(json.loads(args.compare.read_text()), report, args)
    return report, status


def _compare(old: dict, new: dict, args) -> int:
    from .report import compare

    lines, bad = compare(old, new, args.fail_if_regression)
    print(f"\nChange per case against {args.compare} (positive = slower / more memory):")
    print("\n".join(lines) or "no case measured in both runs")
    if bad:
        print(f"\n{len(bad)} regression(s) over {args.fail_if_regression:g}%:\n  " + "\n  ".join(bad))
        return 3
    return 0


def _write_stress(report: dict, out: Path) -> None:
    from .runner import STRESS_KINDS

    (out / "stress.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    c, m = report["config"], report["machine"]
    lines = ["# attnkit bench --stress: NaN and inf on numerically hard inputs", "",
             f"Machine: {m['cpu_model']}, torch {m['torch']}; preset {c['preset']['name']}; "
             f"command `{c['command']}` ({report['wall_s']:.0f} s). Forward outputs only; every count must be 0.", ""]
    lines += [f"- **{k}** ({d}): {desc}" for k, (d, desc) in STRESS_KINDS.items()] + [""]
    lines += ["| input | N | method | NaN | inf | masked rows not 0 | time | status |", "|---|---|---|---|---|---|---|---|"]
    for r in report["stress"]:
        bad = r.get("nan") or r.get("inf") or r.get("masked_rows_nonzero")
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason')}"
        t = f"{r['time_s']:.3g} s" if "time_s" in r else "-"
        lines.append(f"| {r['kind']} | {r['n']} | {r['method']} | {r.get('nan', '-')} | {r.get('inf', '-')} "
                     f"| {r.get('masked_rows_nonzero', '-')} | {t} | {'**' + status + '**' if bad else status} |")
    (out / "stress.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    if "--blocks" in raw or _suite(raw) == "exact":
        from .exact import main as exact_main

        return exact_main(_without_suite(raw))
    if _suite(raw) == "approx":
        from .approx import main as approx_main

        return approx_main(_without_suite(raw))
    args = parse_args(raw)
    _, status = run(args, raw)
    return status


def _suite(raw: list[str]) -> str | None:
    for i, a in enumerate(raw):
        if a == "--suite" and i + 1 < len(raw):
            return raw[i + 1]
        if a.startswith("--suite="):
            return a.split("=", 1)[1]
    return None


def _without_suite(raw: list[str]) -> list[str]:
    out, skip = [], False
    for a in raw:
        if skip:
            skip = False
        elif a == "--suite":
            skip = True
        elif not a.startswith("--suite="):
            out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())
