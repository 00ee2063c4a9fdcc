"""PNG plots of a results.json: time and memory against N, error against cost, and the
throughput change under low precision.  Needs matplotlib (the ``bench`` extra)."""

from __future__ import annotations

from pathlib import Path

from .report import _mem, _time, find

__all__ = ["write_plots", "pareto_front"]


def pareto_front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The (cost, error, name) points no other point beats on both, cheapest first."""
    front, best = [], float("inf")
    for cost, err, name in sorted(points):
        if err < best:
            front.append((cost, err, name))
            best = err
    return front


def _style(i: int) -> dict:
    """Line style of the i-th method: 20 colours, and a marker and dash that change with
    them, so that no two of up to 60 lines look alike (matplotlib's default cycle repeats
    its 10 colours)."""
    import matplotlib

    return {"color": matplotlib.colormaps["tab20"](i % 20), "marker": "osD^v<>p"[i % 8],
            "linestyle": ("-", "--", ":")[i // 20 % 3] if i >= 20 else ("-", "--")[i % 2]}


def write_plots(report: dict, out: Path) -> list[Path]:
    """Write the four plots into ``out``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = report["config"]
    dtype = c["dtypes"][0]
    labels = list(dict.fromkeys(r["label"] for r in report["cases"]))
    paths = []
    for name, get, ylabel in (("time_vs_n", _time, "seconds per call"), ("memory_vs_n", _mem, "peak extra bytes")):
        fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        for ax, mode in zip(axes, ("fwd", "fwd_bwd")):
            for label in labels:
                pts = [(n, get(find(report, label, n, dtype, mode))) for n in c["ns"]]
                pts = [(n, y) for n, y in pts if y]
                if pts:
                    ax.plot(*zip(*pts), label=label, **_style(labels.index(label)))
            ax.set(xscale="log", yscale="log", xlabel="N", ylabel=ylabel,
                   title=f"{'forward' if mode == 'fwd' else 'forward+backward'}, {dtype}, {c['preset']['name']}")
            ax.grid(True, which="both", alpha=0.3)
        axes[1].legend(fontsize=7, loc="upper left")
        fig.tight_layout()
        paths.append(out / f"{name}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    # error against cost at the largest N with accuracy measured
    fig, ax = plt.subplots(figsize=(7, 5))
    acc_ns = sorted({a["n"] for a in report.get("accuracy", []) if a["status"] == "ok"})
    if acc_ns:
        n = acc_ns[-1]
        pts = []
        for a in report["accuracy"]:
            if (a["n"], a["dtype"], a["status"]) == (n, dtype, "ok"):
                t = _time(find(report, a["method"], n, dtype, "fwd"))
                if t:
                    pts.append((t, max(a["out_rel_fro"], 1e-8), a["method"]))
        for t, err, name in pts:
            ax.scatter(t, err)
            ax.annotate(name, (t, err), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = pareto_front(pts)
        if front:
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="k", alpha=0.5,
                    label="Pareto front")
            ax.legend(fontsize=8)
        ax.set(xscale="log", yscale="log", xlabel=f"forward time at N={n} (s)",
               ylabel="relative error of the output (floor 1e-8)", title=f"error vs cost, {dtype}")
    else:
        ax.text(0.5, 0.5, "no accuracy measured", ha="center")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    paths.append(out / "pareto.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # throughput change under low precision, at the largest N both were measured
    fig, ax = plt.subplots(figsize=(9, 5))
    low = [d for d in c["dtypes"] if d != "fp32"]
    drawn = False
    if "fp32" in c["dtypes"] and low:
        width = 0.8 / len(low)
        for i, d in enumerate(low):
            xs, ys = [], []
            for j, label in enumerate(labels):
                both = [n for n in c["ns"] if _time(find(report, label, n, "fp32", "fwd"))
                        and _time(find(report, label, n, d, "fwd"))]
                if both:
                    n = both[-1]
                    xs.append(j + i * width)
                    ys.append(_time(find(report, label, n, "fp32", "fwd")) / _time(find(report, label, n, d, "fwd")))
            if xs:
                ax.bar(xs, ys, width=width, label=f"{d} / fp32 (largest N measured in both)")
                drawn = True
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
        ax.set(ylabel="forward throughput, relative to fp32", title="throughput change under low precision")
        if drawn:
            ax.legend(fontsize=8)
    if not drawn:
        ax.text(0.5, 0.5, "needs fp32 and a low-precision dtype in --dtypes", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    paths.append(out / "amp_throughput.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
