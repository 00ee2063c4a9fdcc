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
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from torch import Tensor, nn

from .calibrate import Capture, capture_layers
from .core.capabilities import Method
from .core.inputs import AttentionInputs, Shape
from .core.registry import MethodSpec, resolve
from .ops import Exact

__all__ = ["DEFAULT_CANDIDATES", "PLAN_FORMAT", "WEIGHTS", "autotune", "fit_flops", "load_plan", "save_plan", "select"]

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
    loss: Callable[[nn.Module, object], Tensor] | None = None,
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
        loss: ``loss(model, batch)`` -> a scalar, e.g. the LM loss of the tokens that will
            be scored.  When given, the table also records per head how much each
            candidate's error moves that loss: ``head_fisher``, the sum over the head's
            outputs of (d loss / d out)² x (A~ - A)² -- the diagonal empirical-Fisher
            estimate of E[(Δ loss)²] -- which :func:`fit_flops` can minimise
            (``weigh="loss"``) instead of the output error.  Costs one backward pass per
            batch.

    Returns:
        A JSON-serialisable plan::

            {"format": 1, "layers": {"0": spec, ...}, "max_error": δ, "seq_len": N,
             "flops": {"exact": F0, "plan": F1, "ratio": F0 / F1},
             "table": {"0": {spec: {"error": e, "flops": f, "head_errors": [...]}}}}

        (the exact row also holds ``head_shares``: each head's share of the exact output's
        squared norm, so the layer's error is sqrt(sum of share x head error squared);
        with ``loss``, every row also holds ``head_fisher``).

        that :func:`attnkit.patch` (and ``--plan``) accept.

    Raises:
        ValueError: ``max_error`` is not > 0, no batch was given, or a candidate is unknown.
    """
    if not isinstance(max_error, (int, float)) or isinstance(max_error, bool) or not max_error > 0:
        raise ValueError(f"argument 'max_error': expected a relative error > 0 such as 0.05, got {max_error!r}")
    specs = [resolve(c) for c in (candidates if candidates is not None else DEFAULT_CANDIDATES)]
    exact = Exact()
    sums: dict[int, dict[str, list]] = {}  # layer -> spec -> [num (Hq,), den (Hq,), fisher (Hq,)] or reason
    shapes: dict[int, Shape] = {}

    def measure(layer: int, inp: AttentionInputs, out: Tensor, grad: Tensor | None = None) -> None:
        cap = Capture(inp.q, inp.k, inp.v, inp.attn_mask, inp.is_causal, inp.scale, out)
        shapes.setdefault(layer, inp.shape)
        row = sums.setdefault(layer, {})
        ref = out.double()
        den = _per_head(ref.pow(2))
        g2 = None if grad is None else grad.double().pow(2)
        for m in specs:
            key = m.spec()
            if isinstance(row.get(key), str):
                continue
            reasons = m.not_supported_reasons(inp)
            if reasons:
                row[key] = "; ".join(reasons)
                continue
            diff = (cap.run(m, _state_for(m, inp)).double() - ref).pow(2)
            acc = row.setdefault(key, [0.0, 0.0, 0.0])
            acc[0], acc[1] = acc[0] + _per_head(diff), acc[1] + den
            if g2 is not None:
                acc[2] = acc[2] + _per_head(diff * g2)

    capture_layers(model, batches, measure, layers=layers, loss=loss)
    if not sums:
        raise ValueError("argument 'batches': no batch was given; pass at least one model input")
    table: dict[str, dict[str, dict]] = {}
    for layer in sorted(sums):
        shape = shapes[layer]
        at_n = Shape(1, shape.hq, shape.hkv, seq_len or shape.n, seq_len or shape.s, shape.d, shape.dv, shape.is_causal)
        row = {EXACT: {"error": 0.0, "flops": exact.flops(at_n), "head_errors": [0.0] * shape.hq}}
        if loss is not None:
            row[EXACT]["head_fisher"] = [0.0] * shape.hq
        for m in specs:
            got = sums[layer].get(m.spec())
            if isinstance(got, str) or got is None:
                row[m.spec()] = {"error": None, "flops": None, "skipped": got or "not run"}
                continue
            num, den, fisher = got
            heads = (num / den.clamp(min=1e-300)).sqrt()
            row[m.spec()] = {"error": math.sqrt(float(num.sum()) / max(float(den.sum()), 1e-300)),
                             "flops": m.flops(at_n), "head_errors": [round(float(h), 6) for h in heads]}
            if loss is not None:
                row[m.spec()]["head_fisher"] = [float(f) for f in fisher]
        measured = [got for got in sums[layer].values() if not isinstance(got, str)]
        if measured:  # each head's share of the exact output's squared norm (the same den for every candidate)
            den = measured[0][1]
            row[EXACT]["head_shares"] = [round(float(x), 6) for x in den / den.sum().clamp(min=1e-300)]
        table[str(layer)] = row
    seq = seq_len or next(iter(shapes.values())).n
    return select({"format": PLAN_FORMAT, "seq_len": seq, "table": table}, max_error, per_head=per_head)


def _per_head(x: Tensor) -> Tensor:
    """Sum of (*batch, Hq, N, Dv) over everything but the head: (Hq,)."""
    return x.flatten(0, -4).sum((0, 2, 3)) if x.dim() > 3 else x.sum((1, 2))


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


WEIGHTS = ("error", "share", "loss")
"""What :func:`fit_flops` per head minimises: the sum over heads of their squared
relative errors (``"error"``), of those weighted by each head's share of its layer's
output norm (``"share"``: the sum of the layers' squared errors), or of their estimated
squared effect on the loss (``"loss"``: the table's ``head_fisher``)."""


def fit_flops(report: Mapping, ratio: float, *, per_head: bool = False, weigh: str = "error") -> dict:
    """A plan whose attention FLOPs are at most exact / ``ratio``.

    Per layer (default): the plan with the smallest δ that is cheap enough -- tries every
    error in the table as δ, in increasing order.  Per head (``per_head=True``): the
    choice that minimises the sum over all heads of their costs within the FLOP budget,
    by Lagrangian relaxation -- each head takes the candidate minimising
    ``cost + λ * flops``, with λ the smallest (bisected) that meets the budget.  Per
    head, a far-reaching head gets a wide window and a local one a narrow window, where
    a per-layer plan must give every head of a layer the same.  A head's cost
    (``weigh``, one of :data:`WEIGHTS`) is its squared relative error, that weighted by
    its share of the layer's output norm (the table's ``head_shares``), or its estimated
    squared effect on the loss (``head_fisher``, measured by :func:`autotune` with
    ``loss=``): the output error is a proxy for what a plan loses, the loss is the thing
    itself, to first order.

    Raises:
        ValueError: no candidate set reaches ``ratio`` (add cheaper candidates), ``weigh``
            is unknown or needs what the table lacks.
    """
    table = report["table"]
    fail = ValueError(f"argument 'ratio': no plan from these candidates saves {ratio}x attention FLOPs; "
                      f"add cheaper candidates")
    if weigh not in WEIGHTS:
        raise ValueError(f"argument 'weigh': expected one of {list(WEIGHTS)}, got {weigh!r}")
    if not per_head:
        if weigh != "error":
            raise ValueError(f"argument 'weigh': {weigh!r} weighs heads; pass per_head=True with it")
        errors = sorted({r["error"] for row in table.values() for r in row.values() if r.get("error")})
        for delta in errors:
            plan = select(report, delta)
            if plan["flops"]["ratio"] >= ratio:
                return plan
        raise fail
    key = {"share": "head_shares", "loss": "head_fisher"}.get(weigh)
    rows = ([row[EXACT] for row in table.values()] if weigh == "share" else
            [r for row in table.values() for r in row.values() if r.get("error") is not None])
    if key and any(key not in r for r in rows):
        how = "autotune(..., loss=...)" if weigh == "loss" else "autotune again (this table predates them)"
        raise ValueError(f"argument 'weigh': {weigh!r} needs the table's {key}, which it lacks; measure it with {how}")
    exact = sum(row[EXACT]["flops"] for row in table.values())

    def head_cost(row: Mapping, spec: str, h: int) -> float:
        if weigh == "loss":
            return row[spec]["head_fisher"][h]
        share = row[EXACT]["head_shares"][h] if weigh == "share" else 1.0
        return share * row[spec]["head_errors"][h] ** 2

    def choose(lam: float) -> tuple[dict, float]:
        choices, cost = {}, 0.0
        for layer, row in table.items():
            hq = _heads(row)
            picks = []
            for h in range(hq):
                spec = min(_usable(row), key=lambda sp: (head_cost(row, sp, h) + lam * row[sp]["flops"] / hq,
                                                         row[sp]["flops"], sp != EXACT))
                picks.append(spec)
                cost += row[spec]["flops"] / hq
            choices[layer] = picks
        return choices, cost

    unit = max((head_cost(row, sp, h) for row in table.values() for sp in _usable(row) for h in range(_heads(row))),
               default=0.0) or 1.0  # λ in the costs' own units
    lo, hi = 0.0, unit / max(exact, 1e-300)
    while choose(hi)[1] * ratio > exact:
        hi *= 4
        if hi > 1e6 * unit / max(exact, 1e-300):
            raise fail
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if choose(mid)[1] * ratio <= exact else (mid, hi)
    choices, _ = choose(hi)
    worst = max(table[layer][spec]["head_errors"][h] for layer, picks in choices.items() for h, spec in enumerate(picks))
    what = {"error": "squared head errors", "share": "share-weighted squared head errors",
            "loss": "head errors' squared effect on the loss (diagonal Fisher)"}[weigh]
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
