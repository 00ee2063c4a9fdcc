"""``attnkit.autotune``: a per-layer plan from an error budget, ||A - A~||_F <= δ ||A||_F.

The model runs once per calibration batch with exact attention; at every layer each
candidate method is run on the same q, k, v and its output compared with the exact
output: the relative Frobenius error ||A~ - A||_F / ||A||_F, pooled over the batches
(sqrt of summed squares over summed squares), and also per query head.  Each
candidate's cost is its :meth:`Method.flops` at the target length ``seq_len`` (a method
whose cost depends on N is priced where it will run, not at the calibration length).  Per layer the plan takes the cheapest candidate within δ, and
exact attention (``"auto"``) where none is; per head (``per_head=True``) each query head
does, and a layer whose heads differ becomes a list of one method per head
(:class:`attnkit.ops.heads.PerHead`), which :func:`attnkit.patch` runs as it is.

The result is JSON: ``{"layers": {"0": "local:window=1024,sinks=4", ...}, ...}`` with the
measured table kept beside the plan, so :func:`select` can re-plan for another δ (or a
FLOP budget, :func:`fit_flops`) without running the model again.  ``attnkit.patch``
accepts it as it is, and ``attnkit eval perplexity --plan plan.json`` reads it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from torch import Tensor, nn

from .calibrate import Capture, capture_layers
from .core.capabilities import Method
from .core.inputs import AttentionInputs, Shape
from .core.registry import MethodSpec, resolve
from .ops import Exact

__all__ = ["DEFAULT_CANDIDATES", "PLAN_FORMAT", "autotune", "fit_flops", "load_plan", "save_plan", "select"]

PLAN_FORMAT = 1
EXACT = "auto"

DEFAULT_CANDIDATES: tuple[str, ...] = (
    "local:window=256,sinks=64",
    "local:window=512,sinks=64",
    "local:window=1024,sinks=64",
    "local:window=2048,sinks=64",
    "blocktopk:window=256,block=64,topk=4,sinks=64",
    "blocktopk:window=256,block=64,topk=8,sinks=64",
    "blocktopk:window=512,block=64,topk=8,sinks=64",
    "blocktopk:window=512,block=64,topk=16,sinks=64",
    "blocktopk:window=1024,block=64,topk=16,sinks=64",
    "hybrid:window=256,features=64",
    "hybrid:window=512,features=128",
    "performer:features=256",
    "lowrank:rank=256",
    "nystrom:landmarks=64",
)
"""Candidates tried when none are given: local windows, query-aware block top-k, the
hybrid band + far field, and the global approximations (each skipped where it cannot
serve the model, e.g. LowRank and Nystrom on causal models)."""


def autotune(
    model: nn.Module,
    batches: Iterable,
    *,
    max_error: float,
    candidates: Sequence[MethodSpec] | None = None,
    seq_len: int | None = None,
    layers: Iterable[int] | None = None,
    per_head: bool = False,
) -> dict:
    """Pick per layer the cheapest candidate whose attention output stays within
    ``max_error`` (relative Frobenius error against exact attention) on ``batches``.

    Args:
        model: a model :func:`attnkit.patch` can patch, not patched already.
        batches: calibration inputs (token ids (B, N), argument tuples or keyword dicts);
            use the length the plan will run at, or as close as memory allows.
        max_error: δ > 0, the largest relative error ||A~ - A||_F / ||A||_F allowed per layer.
        candidates: method names / specs / configs to choose from (default
            :data:`DEFAULT_CANDIDATES`); exact ``"auto"`` is always the fallback.
        seq_len: N at which costs are compared (default: the calibration length).
        layers: plan only these layers (default: every layer); the others run exact.
        per_head: choose per query head (δ bounds each head's error) instead of per layer.

    Returns:
        A JSON-serialisable plan::

            {"format": 1, "layers": {"0": spec, ...}, "max_error": δ, "seq_len": N,
             "flops": {"exact": F0, "plan": F1, "ratio": F0 / F1},
             "table": {"0": {spec: {"error": e, "flops": f, "head_errors": [...]}}}}

        (the exact row also holds ``head_shares``: each head's share of the exact output's
        squared norm, so the layer's error is sqrt(sum of share x head error squared)).

        that :func:`attnkit.patch` (and ``--plan``) accept.

    Raises:
        ValueError: ``max_error`` is not > 0, no batch was given, or a candidate is unknown.
    """
    if not isinstance(max_error, (int, float)) or isinstance(max_error, bool) or not max_error > 0:
        raise ValueError(f"argument 'max_error': expected a relative error > 0 such as 0.05, got {max_error!r}")
    specs = [resolve(c) for c in (candidates if candidates is not None else DEFAULT_CANDIDATES)]
    exact = Exact()
    sums: dict[int, dict[str, list]] = {}  # layer -> spec -> [num (Hq,), den (Hq,)] or reason
    shapes: dict[int, Shape] = {}

    def measure(layer: int, inp: AttentionInputs, out: Tensor) -> None:
        cap = Capture(inp.q, inp.k, inp.v, inp.attn_mask, inp.is_causal, inp.scale, out)
        shapes.setdefault(layer, inp.shape)
        row = sums.setdefault(layer, {})
        ref = out.double()
        den = ref.pow(2).flatten(0, -4).sum((0, 2, 3)) if ref.dim() > 3 else ref.pow(2).sum((1, 2))  # (Hq,)
        for m in specs:
            key = m.spec()
            if isinstance(row.get(key), str):
                continue
            reasons = m.not_supported_reasons(inp)
            if reasons:
                row[key] = "; ".join(reasons)
                continue
            diff = (cap.run(m, _state_for(m, inp)).double() - ref).pow(2)
            num = diff.flatten(0, -4).sum((0, 2, 3)) if diff.dim() > 3 else diff.sum((1, 2))  # (Hq,)
            acc = row.setdefault(key, [0.0, 0.0])
            acc[0], acc[1] = acc[0] + num, acc[1] + den

    capture_layers(model, batches, measure, layers=layers)
    if not sums:
        raise ValueError("argument 'batches': no batch was given; pass at least one model input")
    table: dict[str, dict[str, dict]] = {}
    for layer in sorted(sums):
        shape = shapes[layer]
        at_n = Shape(1, shape.hq, shape.hkv, seq_len or shape.n, seq_len or shape.s, shape.d, shape.dv, shape.is_causal)
        row = {EXACT: {"error": 0.0, "flops": exact.flops(at_n), "head_errors": [0.0] * shape.hq}}
        for m in specs:
            got = sums[layer].get(m.spec())
            if isinstance(got, str) or got is None:
                row[m.spec()] = {"error": None, "flops": None, "skipped": got or "not run"}
                continue
            num, den = got
            heads = (num / den.clamp(min=1e-300)).sqrt()
            row[m.spec()] = {"error": math.sqrt(float(num.sum()) / max(float(den.sum()), 1e-300)),
                             "flops": m.flops(at_n), "head_errors": [round(float(h), 6) for h in heads]}
        measured = [got for got in sums[layer].values() if not isinstance(got, str)]
        if measured:  # each head's share of the exact output's squared norm (the same den for every candidate)
            den = measured[0][1]
            row[EXACT]["head_shares"] = [round(float(x), 6) for x in den / den.sum().clamp(min=1e-300)]
        table[str(layer)] = row
    seq = seq_len or next(iter(shapes.values())).n
    return select({"format": PLAN_FORMAT, "seq_len": seq, "table": table}, max_error, per_head=per_head)


def _state_for(method: Method, inp: AttentionInputs):
    """A fresh state for a method that needs one (e.g. Performer's projection), on q's device."""
    state = method.make_state(inp.hq, inp.d)
    return None if state is None else state.to(inp.q.device)


def select(report: Mapping, max_error: float, *, per_head: bool = False) -> dict:
    """Re-plan from a measured table (an :func:`autotune` result) for another δ: per layer
    the cheapest candidate with error <= ``max_error``, else exact.  With ``per_head``,
    per query head: the cheapest candidate whose error on that head is <= ``max_error``
    (a layer whose heads differ becomes a per-head list).  Returns a new plan."""
    choices = {}
    for layer, row in report["table"].items():
        if per_head:
            choices[layer] = [_cheapest(row, lambda r, h=h: r["head_errors"][h] <= max_error) for h in range(_heads(row))]
        else:
            choices[layer] = [_cheapest(row, lambda r: r["error"] <= max_error)] * _heads(row)
    return _plan(report, choices, max_error, "per-head: cheapest within δ per head" if per_head else
                 "per-layer: cheapest within δ per layer")


def fit_flops(report: Mapping, ratio: float, *, per_head: bool = False, by_share: bool = False) -> dict:
    """A plan whose attention FLOPs are at most exact / ``ratio``.

    Per layer (default): the plan with the smallest δ that is cheap enough -- tries every
    error in the table as δ, in increasing order.  Per head (``per_head=True``): the
    choice that minimises the sum over all heads of their squared relative errors within
    the FLOP budget, by Lagrangian relaxation -- each head takes the candidate minimising
    ``error**2 + λ * flops``, with λ the smallest (bisected) that meets the budget.  Per
    head, a far-reaching head gets a wide window and a local one a narrow window, where
    a per-layer plan must give every head of a layer the same.  With ``by_share``, each
    head's squared error is weighted by its share of the layer's output norm (the table's
    ``head_shares``), so the objective is the sum over layers of their squared errors.

    Raises:
        ValueError: no candidate set reaches ``ratio`` (add cheaper candidates).
    """
    table = report["table"]
    fail = ValueError(f"argument 'ratio': no plan from these candidates saves {ratio}x attention FLOPs; "
                      f"add cheaper candidates")
    if not per_head:
        errors = sorted({r["error"] for row in table.values() for r in row.values() if r.get("error")})
        for delta in errors:
            plan = select(report, delta)
            if plan["flops"]["ratio"] >= ratio:
                return plan
        raise fail
    exact = sum(row[EXACT]["flops"] for row in table.values())
    if by_share and any("head_shares" not in row[EXACT] for row in table.values()):
        raise ValueError("argument 'by_share': this table has no head_shares (measured before they were recorded); "
                         "run autotune again")

    def choose(lam: float) -> tuple[dict, float]:
        choices, cost = {}, 0.0
        for layer, row in table.items():
            hq = _heads(row)
            weight = row[EXACT]["head_shares"] if by_share else [1.0] * hq
            picks = []
            for h in range(hq):
                spec = min(_usable(row), key=lambda sp: (weight[h] * row[sp]["head_errors"][h] ** 2
                                                         + lam * row[sp]["flops"] / hq,
                                                         row[sp]["flops"], sp != EXACT))
                picks.append(spec)
                cost += row[spec]["flops"] / hq
            choices[layer] = picks
        return choices, cost

    lo, hi = 0.0, 1.0 / max(exact, 1e-300)
    while choose(hi)[1] * ratio > exact:
        hi *= 4
        if hi > 1e6 / max(exact, 1e-300):
            raise fail
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if choose(mid)[1] * ratio <= exact else (mid, hi)
    choices, _ = choose(hi)
    worst = max(table[layer][spec]["head_errors"][h] for layer, picks in choices.items() for h, spec in enumerate(picks))
    what = "share-weighted squared head errors" if by_share else "squared head errors"
    return _plan(report, choices, worst, f"per-head: least sum of {what} at {ratio}x fewer FLOPs")


def _heads(row: Mapping) -> int:
    return len(row[EXACT]["head_errors"])


def _usable(row: Mapping) -> list[str]:
    return [spec for spec, r in row.items() if r.get("error") is not None]


def _cheapest(row: Mapping, ok) -> str:
    return min((spec for spec in _usable(row) if ok(row[spec])), key=lambda sp: (row[sp]["flops"], sp != EXACT))


def _plan(report: Mapping, choices: Mapping[str, list[str]], max_error: float, rule: str) -> dict:
    """A plan from per-layer, per-head choices: a layer whose heads all agree is one spec."""
    table = report["table"]
    layers, flops_plan, flops_exact = {}, 0.0, 0.0
    for layer, picks in choices.items():
        row = table[layer]
        layers[layer] = picks[0] if len(set(picks)) == 1 else list(picks)
        flops_plan += sum(row[spec]["flops"] for spec in picks) / len(picks)
        flops_exact += row[EXACT]["flops"]
    return {
        "format": report.get("format", PLAN_FORMAT),
        "layers": layers,
        "max_error": max_error,
        "rule": rule,
        "seq_len": report["seq_len"],
        "flops": {"exact": flops_exact, "plan": flops_plan, "ratio": flops_exact / max(flops_plan, 1e-300)},
        "table": table,
    }


def save_plan(plan: Mapping, path: str | Path) -> None:
    """Write a plan as JSON (never pickle)."""
    Path(path).write_text(json.dumps(plan, indent=1, sort_keys=True))


def load_plan(path: str | Path) -> dict:
    """Read a plan written by :func:`save_plan` (or any ``{layer: method}`` JSON) and check
    that every method in it resolves.

    Raises:
        ValueError: the file is not JSON, or names an unknown method.
    """
    try:
        plan = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"plan file {str(path)!r} is not JSON ({e}); write it with attnkit.autotune.save_plan") from None
    layers = plan.get("layers", plan) if isinstance(plan, dict) else None
    if not isinstance(layers, dict):
        raise ValueError(f"plan file {str(path)!r}: expected {{'layers': {{layer: method}}}} or {{layer: method}}")
    for spec in layers.values():
        resolve(spec)
    return plan
