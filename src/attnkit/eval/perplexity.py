"""Sliding-window perplexity of a causal LM with each attention method swapped in.

Windows: ``context`` tokens each, starting every ``context // 2`` tokens; in every
window only the last ``context // 2`` tokens are scored, so each scored token sees at
least half a context of text before it (the far field is where methods differ), and
consecutive windows score consecutive spans.  The baseline is the unpatched model.

Texts: ``wiki`` (Wikipedia intros joined by blank lines; articles 0..4999 are the
calibration split, 5000.. the evaluation split) and ``books`` (Jane Austen; evaluation
on *Persuasion*, held out; calibration on *Emma*).  Tokenised ids are cached as
safetensors keyed by the text's SHA-256 and the tokenizer (see :mod:`.store`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..bench.memory import peak_memory_here
from ..core.inputs import Shape
from ..core.registry import resolve
from ..patch import patch, read_plan
from .store import cached_tensors, text_digest

__all__ = [
    "CALIBRATION_BOOK",
    "DATASETS",
    "EVAL_BOOK",
    "attention_flops",
    "default_methods",
    "perplexity_rows",
    "scored_logits",
    "scored_nll",
    "token_ids",
    "windows",
]

DATASETS = ("wiki", "books")
EVAL_BOOK = "Persuasion"
CALIBRATION_BOOK = "Emma"
WIKI_SPLIT = 5000


def _text(data: str, split: str) -> str:
    from .. import data as d

    if data == "wiki":
        intros = d.wiki_intros()
        part = intros[WIKI_SPLIT:] if split == "eval" else intros[:WIKI_SPLIT]
        return "\n\n".join(part)
    if data == "books":
        return d.austen_novels()[EVAL_BOOK if split == "eval" else CALIBRATION_BOOK]
    raise ValueError(f"argument 'data': expected one of {list(DATASETS)}, got {data!r}")


def token_ids(tokenizer, data: str, split: str = "eval", *, max_tokens: int | None = None) -> Tensor:
    """The tokenised text of ``data`` (``"wiki"`` or ``"books"``) and ``split``
    (``"eval"`` or ``"calibration"``) as (T,) int64, cached.

    Args:
        max_tokens: tokenise only the first 6·max_tokens characters (enough for this
            many tokens; cached separately).
    """
    text = _text(data, split)
    if max_tokens is not None:
        text = text[: 6 * max_tokens]
    key = {"data": data, "split": split, "text_sha256": text_digest(text),
           "tokenizer": type(tokenizer).__name__, "vocab": len(tokenizer), "name": tokenizer.name_or_path.split("/")[-1]}
    name = f"tokens-{data}-{split}-{key['text_sha256'][:12]}"
    got, _ = cached_tensors(name, key, lambda: {"ids": torch.tensor(tokenizer(text).input_ids, dtype=torch.long)})
    ids = got["ids"]
    return ids if max_tokens is None else ids[:max_tokens]


def windows(ids: Tensor, context: int, count: int) -> list[Tensor]:
    """Up to ``count`` windows of ``context`` tokens, every ``context // 2`` tokens: (1, context) each."""
    stride = context // 2
    out = []
    for i in range(count):
        start = i * stride
        if start + context > ids.numel():
            break
        out.append(ids[start : start + context][None])  # (1, context)
    if not out:
        raise ValueError(f"argument 'context': the text has {ids.numel()} tokens, fewer than one window of {context}")
    return out


def model_shape(model: nn.Module, n: int) -> Shape:
    """The attention call shape of one layer of a Llama/BERT-style transformers model at length n."""
    c = model.config
    hq = c.num_attention_heads
    hkv = getattr(c, "num_key_value_heads", None) or hq
    d = getattr(c, "head_dim", None) or c.hidden_size // hq
    return Shape(1, hq, hkv, n, n, d, d, bool(getattr(c, "is_decoder", False) or "CausalLM" in type(model).__name__))


def attention_flops(model: nn.Module, method, n: int) -> float:
    """Forward attention FLOPs of the whole model at length n (all layers), for one method
    or a plan (layers a plan leaves out count as exact)."""
    from ..ops import Exact

    shape = model_shape(model, n)
    layers = model.config.num_hidden_layers
    if method is None:
        return layers * Exact().flops(shape)
    one, plan = read_plan(method)
    return sum((one or plan.get(i) or Exact()).flops(shape) for i in range(layers))


def default_methods(context: int) -> list[str]:
    """One config per family, each sized for about 4x fewer attention FLOPs than exact
    at this context (causal): the raw, uncalibrated figures."""
    w = max(16, context // 8)
    blocks = max(1, context // 16 // 64)
    return [
        f"local:window={w},sinks=64",
        f"blocktopk:window={context // 16},block=64,topk={blocks},sinks=64",
        f"hybrid:window={max(16, w - 128)},features=64",
        "performer:features=256",
        "lowrank:rank=256",
        "nystrom:landmarks=64",
    ]


@dataclass
class _Score:
    nll: float = 0.0
    tokens: int = 0
    seconds: float = 0.0
    peak_bytes: int | None = None


def scored_logits(model: nn.Module, ids: Tensor) -> tuple[Tensor, Tensor]:
    """The model's logits for the scored last half of a (1, N) window and the tokens they
    predict: (half, V) fp32, (half,).  Only the scored half gets logits: (1, half + 1, V),
    not (1, N, V)."""
    half = ids.shape[1] // 2
    logits = model(ids, logits_to_keep=half + 1).logits
    return logits[0, :-1].float(), ids[0, -half:]


def scored_nll(model: nn.Module, ids: Tensor) -> Tensor:
    """The summed next-token NLL of the scored last half of a (1, N) window: the loss
    perplexity is made of, and the loss ``attnkit eval autotune --weigh loss`` weighs
    attention errors by.  Differentiable (call it under ``no_grad`` to score)."""
    return torch.nn.functional.cross_entropy(*scored_logits(model, ids), reduction="sum")


def _score(model, wins: list[Tensor], measure_memory: bool) -> _Score:
    s = _Score()
    for i, ids in enumerate(wins):
        def fwd(ids=ids):
            with torch.no_grad():
                return scored_logits(model, ids)

        t0 = time.perf_counter()
        if measure_memory and i == 0:
            box = {}
            mem = peak_memory_here(lambda box=box: box.setdefault("scored", fwd()), probe="profiler")
            (pred, target), s.peak_bytes = box["scored"], mem.peak_bytes
        else:
            pred, target = fwd()
        s.seconds += time.perf_counter() - t0
        s.nll += float(torch.nn.functional.cross_entropy(pred, target, reduction="sum"))
        s.tokens += target.numel()
    return s


def perplexity_rows(
    model: nn.Module,
    wins: list[Tensor],
    methods: Mapping[str, object],
    *,
    measure_memory: bool = True,
    calibrations: Mapping[str, Mapping[str, Tensor]] | None = None,
) -> list[dict]:
    """Perplexity of the unpatched model and of each ``{label: method or plan}``.

    Returns:
        One dict per row: label, method (spec or plan), ppl, change (ppl / exact - 1),
        attention FLOPs (whole model, per window) and their ratio to exact, peak extra
        memory of the first window's forward (torch allocations, profiler),
        tokens/s over all windows, or ``skipped`` with the reason.
    """
    from ..calibrate import load_calibration

    n = wins[0].shape[1]
    exact_flops = attention_flops(model, None, n)
    base = _score(model, wins, measure_memory)
    rows = [_row("exact (unpatched)", "none", base, base, exact_flops, exact_flops, n, len(wins))]
    for label, method in methods.items():
        try:
            flops = attention_flops(model, method, n)
            with patch(model, method) as h:
                if calibrations and label in calibrations:
                    load_calibration(h, calibrations[label])
                s = _score(model, wins, measure_memory)
        except ValueError as e:  # a method that cannot serve the model (e.g. not causal)
            rows.append({"label": label, "method": _spec(method), "skipped": str(e).split(". Methods")[0]})
            continue
        rows.append(_row(label, _spec(method), s, base, flops, exact_flops, n, len(wins)))
    return rows


def _spec(method) -> object:
    if isinstance(method, Mapping):
        return dict(method.get("layers", method))
    return resolve(method).spec()


def _row(label, spec, s: _Score, base: _Score, flops, exact_flops, n, count) -> dict:
    ppl = math.exp(s.nll / s.tokens)
    base_ppl = math.exp(base.nll / base.tokens)
    return {
        "label": label, "method": spec, "ppl": ppl, "change": ppl / base_ppl - 1.0,
        "attention_flops": flops, "flops_ratio": exact_flops / flops, "peak_bytes": s.peak_bytes,
        "tokens_per_s": count * n / s.seconds, "seconds": s.seconds, "scored_tokens": s.tokens,
    }
