"""The report a person reads first (``report.md``), the seed-style summary printed at the
end of a run, and ``--compare`` / ``--fail-if-regression`` against a saved results.json."""

from __future__ import annotations

import math

from .timing import LOADED, case_time

__all__ = ["SUMMARY_NS", "compare", "render_markdown", "seed_summary", "find"]

SUMMARY_NS = (2048, 4096, 16384)


def find(report: dict, label: str, n: int, dtype: str, mode: str) -> dict | None:
    """The measured (status "ok") case row, or None."""
    for r in report["cases"]:
        if (r["label"], r["n"], r["dtype"], r["mode"]) == (label, n, dtype, mode) and r["status"] == "ok":
            return r
    return None


def _time(r):
    return case_time((r or {}).get("time"))


def _mem(r):
    return ((r or {}).get("memory") or {}).get("peak_bytes")


def _ratio(a, b):
    return a / b if a is not None and b else None


def fmt_time(t: dict | None) -> str:
    if not t:
        return "-"
    med, iqr = t["median"], t["iqr"]
    unit, f = ("s", 1.0) if case_time(t) >= 1 else ("ms", 1e3)
    loaded = " †" if (t.get("other_load") or 0) > LOADED else ""
    spread = f"{iqr * f:.0f}" if iqr * f >= 10 else f"{iqr * f:.2g}"
    if "best" in t:
        return f"{t['best'] * f:.3g} {unit} (median {med * f:.3g} ± {spread}){loaded}"
    return f"{med * f:.3g} ± {spread} {unit}{loaded}"


def fmt_ratio(x, pct=False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.2f}%" if pct else f"{x:.2f}x"


def fmt_bytes(b) -> str:
    if b is None:
        return "-"
    if b < 2**20:
        return f"{b / 2**10:.3g} KiB"
    return f"{b / 2**30:.3g} GiB" if b >= 2**30 else f"{b / 2**20:.3g} MiB"


def fmt_x(x) -> str:
    return "-" if x is None else (f"{x:.3g}x" if x < 100 else f"{x:.0f}x")


def fmt_err(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return f"**{x}**"
    return f"{x:.2e}" if x < 1e-2 else f"{x:.3f}"


def _change(x) -> str:
    """A ratio as a change: 0.25 -> "-75%", 3.0 -> "+200%"."""
    return "n/a" if x is None else f"{100 * (x - 1):+.0f}%"


def seed_summary(report: dict) -> list[str]:
    """At N = 2048 (and 4096, 16384 when run): each method's forward peak-memory change
    and forward-time change against vanilla and against torch SDPA."""
    cfg = report["config"]
    lines = []
    for n in SUMMARY_NS:
        if n not in cfg["ns"]:
            continue
        for dtype in cfg["dtypes"]:
            van, sdpa = find(report, "vanilla", n, dtype, "fwd"), find(report, "torch-sdpa", n, dtype, "fwd")
            lines.append(f"N={n} {dtype} ({cfg['preset']['name']}), forward: memory / time change "
                         f"vs vanilla; vs torch SDPA")
            for label in dict.fromkeys(r["label"] for r in report["cases"]):
                if label in ("vanilla", "torch-sdpa"):
                    continue
                r = find(report, label, n, dtype, "fwd")
                if r is None:
                    continue
                lines.append(
                    f"  {label:<34} memory {_change(_ratio(_mem(r), _mem(van))):>6} / time "
                    f"{_change(_ratio(_time(r), _time(van))):>6} vs vanilla;  memory "
                    f"{_change(_ratio(_mem(r), _mem(sdpa))):>6} / time {_change(_ratio(_time(r), _time(sdpa))):>6} vs SDPA")
    return lines


def _accuracy(report, method, n, dtype):
    for a in report.get("accuracy", []):
        if (a["method"], a["n"], a["dtype"]) == (method, n, dtype):
            return a
    return None


def _fit(report, label, dtype, mode, what):
    for f in report.get("fits", []):
        if (f["label"], f["dtype"], f["mode"]) == (label, dtype, mode) and f[what]:
            return f[what]["exponent"]
    return None


def _timing_process(report: dict) -> bool:
    """Whether ``report`` was timed in one timing process kept for the whole run (else, in
    results written before it, each case in a fresh process of its own, then visits in one
    fresh process each)."""
    return any((row.get("time") or {}).get("process") == "timing" for row in report["cases"])


def _processes(report: dict) -> list[int]:
    """How many rounds (its own fresh process, then visits) timed each case timed outside the sweep's process."""
    return [len(r["time"].get("rounds", [])) for r in report["cases"]
            if r.get("time", {}).get("process") in ("timing", "fresh")]  # "fresh": results written before the timing process


def _rounds_text(report: dict) -> str:
    c = report["config"]
    least = c.get("rounds", 1)
    most = c.get("max_rounds") or least  # results written before there was a max_rounds
    if most <= 1:
        return ""
    got = _processes(report)
    kept = _timing_process(report)
    if "visit_gap_s" not in c:  # results written before the visits: later rounds per case
        text = f" in each of {least} fresh processes (up to {most} for a cheap case) within the run budget"
    else:
        text = (("" if kept else " in a fresh process of its own")
                + f", then in visits until it has {most} rounds where the run budget "
                "allows: a visit times every case of one N, dtype and mode in turn (torch SDPA first and again last)"
                + (", a warm case at once; " if kept else " in a fresh process, each case after its own warm-up; ")
                + f"{c.get('visit_repeats', 1)} block(s) of a slow call or about "
                f"{c.get('visit_run_time', 0.02):g} s of a fast one; visits run while the sweep goes on (in up to "
                f"{c.get('visit_share', 0):.0%} of its time, " + ("between any two cases" if kept else "at each new N and dtype")
                + ") and after it, the group with the "
                f"fewest rounds first, each group at least {c.get('visit_gap_s'):g} s after its last, so that a "
                "case's samples spread over minutes (the machine's slow spells last from seconds to minutes: "
                "benchmarks/host_drift.py)")
    text += f": {sum(g >= least for g in got)} of {len(got)} cases got at least {least}"
    if most > least and got:
        text += ", " + ", ".join(f"{sum(g == k for g in got)} got {k}" for k in range(least + 1, most + 1)
                                 if any(g == k for g in got))
    return text


def render_markdown(report: dict) -> str:
    m, c = report["machine"], report["config"]
    p = c["preset"]
    labels = list(dict.fromkeys(r["label"] for r in report["cases"]))
    gpu = f"; GPU {m['gpu']['name']}" if m.get("gpu") else ""
    out = [
        "# attnkit bench: what each attention method costs and what it loses", "",
        f"Machine: {m['cpu_model']}, {m['cpu_count']} logical CPUs ({m.get('cpus_usable')} usable), "
        f"{fmt_bytes(m['mem_total_bytes'])} RAM{gpu}; torch {m['torch']} ({m['torch_threads']} threads), "
        f"Python {m['python']}; attnkit {m['attnkit']} (commit {m['git_commit']}); {m['date_utc']}. "
        f"Load average at start {m['loadavg_start']}, at end {m.get('loadavg_end')}.", "",
        f"Command: `{c['command']}` ({report['wall_s']:.0f} s). Device: {c['device']}. Shape: preset "
        f"{p['name']} (B={p['batch']}, Hq={p['hq']}, Hkv={p['hkv']}, D={p['d']}), N = S in {c['ns']}, non-causal, "
        f"no mask. Dtypes: {', '.join(c['dtypes'])}. Methods: {', '.join(c['methods'])}.", "",
        "## How it is measured", "",
        f"- **Time**: `torch.utils.benchmark` `blocked_autorange` after {c['warmup']} warm-up call(s), more until "
        "a call takes (next to) no page faults and no fresh memory (at most 8 more); calls slower than 50 ms are "
        "timed one per block and a block that took fresh memory is re-taken (kept in results.json as "
        f"`faulted_blocks`), since it timed the kernel handing the process memory; at least {c['repeats']} block(s) "
        f"in round one (more for fast calls, at least {c['min_run_time']} s)"
        + _rounds_text(report) + ". The time shown is the fastest block of any round (a block is one call, or "
        "the mean of a few fast calls): interference only slows a call down, and on a shared machine it comes and "
        "goes within seconds; beside it, the lowest of the rounds' median ± their range (one round: "
        "median ± interquartile range). Ratios and --compare use the fastest block; "
        "forward under `torch.no_grad()`, forward+backward into q, k, v with fresh gradients each call; CUDA is "
        "synchronised by the timer. Every block's time is in results.json. † = other processes used more than "
        f"{LOADED:.0%} of the machine meanwhile. Tokens/s = B·N / forward time."
        + (" Every case is timed in the timing process, one process kept for the whole run (forked from the clean "
           "server; compiled cases in the sweep's process), which keeps each case's inputs from one round to the "
           "next (and, once the sweep is done, the heap its calls grew; before, it gives the heap back after each "
           "timing, for the fresh processes that measure memory and for accuracy); round one comes right after the "
           "case's memory is measured in a fresh process of its own. With the steady allocator a call reuses warm "
           "heap pages whatever ran before it"
           if _timing_process(report) else
           " Each case is first timed in a fresh process of its own, right after its memory is measured there "
           "(forked from the clean server; compiled cases in the sweep's process), so that no case's time depends on "
           "what ran before it" + ("" if "visit_gap_s" not in c or (c.get("max_rounds") or 1) <= 1 else
                                   "; in a visit, each case is warmed up and settled again after the one before it"))
        + "."
        + (f" Allocator: {m['allocator']} (see `attnkit.bench.timing.steady_allocator` and `huge_pages`)." if m.get("allocator") else ""),
        "- **Peak memory**: " + (
            "`torch.cuda.max_memory_allocated()` after a reset, minus what was allocated before the call"
            if c["device"].startswith("cuda") else
            "the high-water mark of bytes live in torch's CPU allocator above the start of one call, from the "
            "allocation and free records of `torch.profiler(profile_memory=True)`")
        + ", each case in its own fresh process (forked from a clean server process that imported torch and "
        "attnkit and ran nothing); the inputs are not counted, the output, saved tensors, gradients and kernel "
        "workspaces are. Memory that BLAS/oneDNN/OpenMP take from malloc directly is not seen (small, independent "
        "of N). See `attnkit.bench.memory`.",
        "- **FLOPs**: each method's `flops()` formula for the forward (matmuls only, 2 per multiply-add; exact "
        "attention 4·B·H·N·S·D); forward+backward = 3.5x forward for exact attention, 3x for the "
        "approximations. Cross-checked against `torch.utils.flop_counter.FlopCounterMode` at N <= "
        f"{c['flop_check_max_n']} (table below); it counts nothing for torch's fused SDPA kernel, so no 0 is "
        "ever printed for it.",
        f"- **Accuracy** against float64 exact attention (`attnkit.reference_attention`; above 2^26 score "
        f"elements torch SDPA in float64), on structured inputs (`attnkit.bench.cases.structured_qkv`: "
        f"a random walk plus recurring topics, so attention has local and long-range mass), N <= "
        f"{c['accuracy_max_n']}: relative Frobenius error of the output and of the gradients (largest of "
        f"dq, dk, dv); MSE and max-abs error of the implied attention matrix at N <= {c['prob_max_n']} "
        "(approximate methods; exact ones apply the exact matrix).",
        f"- **Budgets**: a case whose time per call, projected from the same method's smaller N by a log-log "
        f"fit (exponent at least 1; 2 from a single point), exceeds {c['time_budget_s']} s, or whose projected "
        f"peak memory exceeds {fmt_bytes(c['mem_budget_bytes'])}, or that would not finish within the run "
        f"budget ({c['run_budget_s'] or 'none'} s), is skipped and listed below with its projection.",
        "- **Baselines**: `vanilla` is materialised softmax(QK^T)V written in plain PyTorch (not attnkit); "
        "`torch-sdpa` is `F.scaled_dot_product_attention` called directly; `xformers` is "
        "`xformers.ops.memory_efficient_attention`: "
        + (next((r["reason"] for r in report["cases"] if r["method"] == "xformers" and r.get("reason")), None)
           or "measured") + ".",
        "",
    ]
    summary = seed_summary(report)
    if summary:
        out += ["## Summary (forward; change against vanilla and against torch SDPA)", "", "```", *summary, "```", ""]
    out += ["## Scaling: fitted log-log exponent against N", "",
            "Time ~ N^p: exact attention should show ~2, an approximate method ~1 (fixed overheads flatten small N; "
            "fitted over N >= 1024 where two such points exist).", "",
            "| method | dtype | time fwd | time fwd+bwd | memory fwd | memory fwd+bwd | FLOPs fwd |",
            "|---|---|---|---|---|---|---|"]

    def e(x):
        return "-" if x is None else f"{x:.2f}"

    for dtype in c["dtypes"]:
        for label in labels:
            vals = [_fit(report, label, dtype, "fwd", "time"), _fit(report, label, dtype, "fwd_bwd", "time"),
                    _fit(report, label, dtype, "fwd", "memory"), _fit(report, label, dtype, "fwd_bwd", "memory"),
                    _fit(report, label, dtype, "fwd", "flops")]
            if any(v is not None for v in vals):
                out.append(f"| {label} | {dtype} | " + " | ".join(e(v) for v in vals) + " |")
    out += [""]
    for n in c["ns"]:
        for dtype in c["dtypes"]:
            out += [f"## N = {n}, {dtype}", "",
                    "| method | fwd time | ×vanilla | ×SDPA | fwd+bwd time | ×vanilla | ×SDPA | tokens/s fwd "
                    "| peak mem fwd | ×vanilla | ×SDPA | peak mem fwd+bwd | ×vanilla | ×SDPA | GFLOP fwd | ×vanilla "
                    "| out err | grad err | prob MSE | prob max-abs |",
                    "|---|" + "---|" * 19]
            base = {b: {mode: find(report, b, n, dtype, mode) for mode in ("fwd", "fwd_bwd")}
                    for b in ("vanilla", "torch-sdpa")}
            for label in labels:
                rows = {mode: next((r for r in report["cases"] if (r["label"], r["n"], r["dtype"], r["mode"])
                                    == (label, n, dtype, mode)), None) for mode in ("fwd", "fwd_bwd")}
                if all(r is None or r["status"] in ("unavailable", "unsupported") for r in rows.values()):
                    continue
                cells = [label]
                for mode in ("fwd", "fwd_bwd"):
                    r = rows[mode]
                    ok = r is not None and r["status"] == "ok"
                    cells += [fmt_time(r.get("time")) if ok else (r["status"] if r else "-"),
                              fmt_x(_ratio(_time(r if ok else None), _time(base["vanilla"][mode]))),
                              fmt_x(_ratio(_time(r if ok else None), _time(base["torch-sdpa"][mode])))]
                f = rows["fwd"]
                cells.append(f"{f['tokens_per_s']:.3g}" if f and f.get("tokens_per_s") else "-")
                for mode in ("fwd", "fwd_bwd"):
                    r = rows[mode] if rows[mode] and rows[mode]["status"] == "ok" else None
                    cells += [fmt_bytes(_mem(r)), fmt_x(_ratio(_mem(r), _mem(base["vanilla"][mode]))),
                              fmt_x(_ratio(_mem(r), _mem(base["torch-sdpa"][mode])))]
                van_flops = next((r["flops"] for r in report["cases"] if (r["label"], r["n"], r["dtype"], r["mode"])
                                  == ("vanilla", n, dtype, "fwd")), None)
                cells += [f"{f['flops'] / 1e9:.3g}" if f else "-", fmt_x(_ratio(f["flops"] if f else None, van_flops))]
                a = _accuracy(report, label, n, dtype)
                if a and a["status"] == "ok":
                    cells += [fmt_err(a["out_rel_fro"]), fmt_err(a["grad_rel_fro"]),
                              fmt_err(a.get("prob_mse")), fmt_err(a.get("prob_max_abs"))]
                else:
                    cells += ["-"] * 4
                out.append("| " + " | ".join(cells) + " |")
            out.append("")
    out += ["## FLOPs: formula against FlopCounterMode", "",
            "| method | N | dtype | mode | formula GFLOP | counted GFLOP | counted / formula |", "|---|---|---|---|---|---|---|"]
    for r in report["cases"]:
        if r["status"] == "ok" and "flops_counted" in r:
            cnt = r["flops_counted"]
            out.append(f"| {r['label']} | {r['n']} | {r['dtype']} | {r['mode']} | {r['flops'] / 1e9:.3g} | "
                       + (f"{cnt / 1e9:.3g} | {cnt / r['flops']:.2f} |" if cnt else
                          "not counted (fused kernel: FlopCounterMode sees no matmul) | - |"))
    compiled = [r for r in report["cases"] if r.get("compiled") and r["status"] == "ok"]
    if compiled:
        out += ["", "## torch.compile", "", "| method | N | dtype | mode | compile (first call) | compiled time "
                "| eager time | compiled / eager |", "|---|---|---|---|---|---|---|---|"]
        for r in compiled:
            eager = find(report, r["method"], r["n"], r["dtype"], r["mode"])
            out.append(f"| {r['method']} | {r['n']} | {r['dtype']} | {r['mode']} | {r['compile_s']:.1f} s "
                       f"| {fmt_time(r.get('time'))} | {fmt_time((eager or {}).get('time'))} "
                       f"| {fmt_x(_ratio(_time(r), _time(eager)))} |")
    if report.get("stress"):
        out += ["", "## Stress: NaN and inf in the forward output (must be 0)", ""]
        from .runner import STRESS_KINDS

        out += [f"- {k}: {desc}" for k, (_, desc) in STRESS_KINDS.items()] + [""]
        out += ["| input | N | method | NaN | inf | masked rows not 0 | status |", "|---|---|---|---|---|---|---|"]
        for r in report["stress"]:
            bad = r.get("nan", 0) or r.get("inf", 0) or r.get("masked_rows_nonzero", 0)
            status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason')}"
            out.append(f"| {r['kind']} | {r['n']} | {r['method']} | {r.get('nan', '-')} | {r.get('inf', '-')} "
                       f"| {r.get('masked_rows_nonzero', '-')} | {'**' + status + '**' if bad else status} |")
    out += ["", "## Skipped, unsupported and failed cases", ""]
    others = [r for r in report["cases"] if r["status"] != "ok"]
    for r in others:
        proj = r.get("projected") or {}
        extra = []
        if "time_s" in proj:
            extra.append(f"projected {proj['time_s']:.3g} s per call")
        if "bytes" in proj:
            extra.append(f"projected peak {fmt_bytes(proj['bytes'])}")
        out.append(f"- {r['label']} {r['mode']} N={r['n']} {r['dtype']}: **{r['status']}**: {r['reason']}"
                   + (f" ({'; '.join(extra)})" if extra and r["status"] == "skipped" else ""))
    acc_other = [a for a in report.get("accuracy", []) if a["status"] not in ("ok", "unavailable", "unsupported")]
    out += [f"- accuracy of {a['method']} N={a['n']} {a['dtype']}: {a['status']}: {a['reason']}" for a in acc_other]
    if not others and not acc_other:
        out.append("- none")
    out += ["", "Plots: `time_vs_n.png`, `memory_vs_n.png`, `pareto.png` (error against cost), "
            "`amp_throughput.png` (throughput change under low precision)."]
    return "\n".join(out) + "\n"


def ratio_agreement(old: dict, new: dict, min_n: int = 1024, tol_pct: float = 15.0) -> dict:
    """How well two runs agree on each method's time relative to torch SDPA in the same run.

    For every case measured in both runs (N >= ``min_n``, SDPA measured at the same N,
    dtype and mode in both), the change of t_method / t_sdpa from ``old`` to ``new``.
    Returns ``{"within", "total", "min_n", "tol_pct", "worst": [lines, largest change first]}``.
    """
    rows = []
    for r in old["cases"]:
        if r["status"] != "ok" or r["n"] < min_n or r["label"] == "torch-sdpa":
            continue
        ta, tb = _time(r), _time(find(new, r["label"], r["n"], r["dtype"], r["mode"]))
        sa = _time(find(old, "torch-sdpa", r["n"], r["dtype"], r["mode"]))
        sb = _time(find(new, "torch-sdpa", r["n"], r["dtype"], r["mode"]))
        if None in (ta, tb, sa, sb):
            continue
        change = (tb / sb) / (ta / sa) - 1
        rows.append((abs(change), f"{r['label']} {r['mode']} N={r['n']} {r['dtype']} "
                                  f"{ta / sa:.3f} -> {tb / sb:.3f} ({100 * change:+.1f}%)"))
    rows.sort(reverse=True)
    return {"within": sum(c <= tol_pct / 100 for c, _ in rows), "total": len(rows), "min_n": min_n,
            "tol_pct": tol_pct, "worst": [line for c, line in rows if c > tol_pct / 100]}


def compare(old: dict, new: dict, pct: float | None = None) -> tuple[list[str], list[str]]:
    """Per-case change of time and peak memory from ``old`` to ``new`` results.

    Cases are matched by (method, preset, N, dtype, mode); only cases measured in both
    are compared.  Returns (lines to print, regressions): a regression is a case that got
    slower, or used more memory, by more than ``pct`` percent (none when ``pct`` is None).
    """
    def index(rep):
        return {(r["label"], r.get("preset"), r["n"], r["dtype"], r["mode"]): r
                for r in rep["cases"] if r["status"] == "ok"}

    a, b = index(old), index(new)
    lines, bad = [], []
    for key in [k for k in b if k in a]:
        label, preset, n, dtype, mode = key
        parts = []
        for name, get in (("time", _time), ("memory", _mem)):
            x, y = get(a[key]), get(b[key])
            if x and y:
                change = 100 * (y / x - 1)
                parts.append(f"{name} {change:+.1f}%")
                if pct is not None and change > pct:
                    bad.append(f"{label} {mode} N={n} {dtype}: {name} {change:+.1f}% (> {pct:g}%)")
        lines.append(f"{label:<34} {mode:<7} N={n:<6} {dtype:<8} " + ", ".join(parts))
    agree = ratio_agreement(old, new)
    if agree["total"]:
        lines.append(f"time ratios method / torch-sdpa at N >= {agree['min_n']}: {agree['within']} of "
                     f"{agree['total']} agree within {agree['tol_pct']:g}%"
                     + ("; worst: " + ", ".join(agree["worst"][:5]) if agree["worst"] else ""))
    only_old = sorted(set(a) - set(b), key=str)
    if only_old:
        lines.append(f"{len(only_old)} case(s) measured before but not now: "
                     + ", ".join(f"{k[0]} {k[4]} N={k[2]} {k[3]}" for k in only_old[:10]))
    return lines, bad
