"""Markdown tables of ``attnkit eval`` results."""

from __future__ import annotations

__all__ = ["render"]


def _plan_cell(entry) -> str:
    """One layer of a plan: `spec`, or for a per-head list the heads of each method."""
    if isinstance(entry, str):
        return f"`{entry}`"
    heads: dict[str, list[int]] = {}
    for h, spec in enumerate(entry):
        heads.setdefault(spec, []).append(h)
    return "; ".join(f"heads {','.join(map(str, hs))}: `{spec}`" for spec, hs in heads.items())


def _bytes(b) -> str:
    if b is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024


def _method(m) -> str:
    if isinstance(m, dict):
        specs = sorted(set(m.values()))
        return f"plan ({len(m)} layers: {len(specs)} distinct)"
    return f"`{m}`"


def _header(result: dict) -> list[str]:
    mach = result.get("machine", {})
    return [
        f"Command: `{result.get('command', '')}`",
        "",
        (f"Machine: {mach.get('cpu_model', '?')}, {mach.get('cpus_usable', '?')} usable cores, torch "
         f"{mach.get('torch', '?')}, {mach.get('torch_threads', '?')} threads, commit {mach.get('git_commit', '?')}, "
         f"{mach.get('date_utc', '')}.  {mach.get('note', '')}"),
        "",
    ]


def render(result: dict) -> str:
    """The markdown for one result dict of :func:`attnkit.eval.main`."""
    kind = result["kind"]
    lines = []
    if kind == "perplexity":
        lines.append(f"### Perplexity: {result['model']} on {result['data']}, context {result['context']}, "
                     f"{result['windows']} windows")
        lines.append("")
        lines += ["| method | perplexity | vs exact | attention FLOPs saved | peak extra memory | tokens/s |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in result["rows"]:
            if "skipped" in r:
                lines.append(f"| {r['label']} | - | not run: {r['skipped'][:120]} | | | |")
                continue
            lines.append(f"| {r['label']} | {r['ppl']:.3f} | {r['change']:+.2%} | {r['flops_ratio']:.2f}x | "
                         f"{_bytes(r['peak_bytes'])} | {r['tokens_per_s']:.0f} |")
    elif kind == "sentiment":
        lines.append(f"### Sentiment: {result['model']} linear probe, {result['test']} held-out sentences")
        lines.append("")
        lines += ["| method | accuracy | % of exact | usable (>= 99%) |", "|---|---:|---:|---|"]
        for r in result["rows"]:
            if "skipped" in r:
                lines.append(f"| {r['label']} | - | not run: {r['skipped'][:120]} | |")
                continue
            lines.append(f"| {r['label']} | {r['accuracy']:.4f} | {r['of_exact']:.2%} | "
                         f"{'yes' if r['of_exact'] >= 0.99 else 'no'} |")
    elif kind == "autotune":
        lines.append(f"### Autotune: {result['model']} on {result['data']} calibration text, context {result['context']}")
        lines.append("")
        f = result["flops"]
        rule = f"Rule: {result['rule']}; " if result.get("rule") else ""
        lines.append(f"{rule}max_error {result['max_error']:.4f}; attention FLOPs {f['plan']:.3g} vs exact {f['exact']:.3g} "
                     f"({f['ratio']:.2f}x fewer); plan written to `{result['plan_file']}` ({result['seconds']:.0f} s)")
        lines.append("")
        lines += ["| layer | method |", "|---:|---|"]
        lines += [f"| {k} | {_plan_cell(v)} |" for k, v in sorted(result["layers"].items(), key=lambda t: int(t[0]))]
    elif kind == "trainstep":
        lines.append(f"### Train step: {result['model']}, {result['context']} tokens, forward + backward")
        lines.append("")
        lines += ["| setting | method | peak extra memory | seconds |", "|---|---|---:|---:|"]
        for r in result["rows"]:
            lines.append(f"| {r['label']} | `{r['method']}` | {_bytes(r['peak_bytes'])} | {r['seconds']:.1f} |")
    lines.append("")
    return "\n".join(lines + _header(result))
