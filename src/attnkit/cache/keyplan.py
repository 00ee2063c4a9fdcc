"""Per-channel key bit widths for :class:`~attnkit.cache.QuantizedCache`, fitted on a few batches.

At 2 bits, keys cost a quantized cache most of its perplexity (on SmolLM2 at 2048 tokens:
2-bit keys with 8-bit values +10%, 8-bit keys with 2-bit values +1.2%), and most of the
key error does not matter: a score is q·k, so channel c's quantization error reaches the
scores weighted by E[q_c²], and a few channels carry most of the query energy.  The plan
spends the same key bytes as uniform ``bits``-bit codes, unevenly: per layer, every
(kv head, channel) gets 0 bits (the group mean alone), ``bits`` or ``2·bits``, chosen to
minimise the expected score error

    Σ_c E[q_c²] · e_c(b_c)   subject to   Σ_c cost(b_c) <= Σ_c cost(bits)

where e_c(b) is channel c's mean squared quantization error over groups of G tokens of
the calibration keys (min-max, as the cache quantizes) and cost(b) = b + 32/G bits per
number (an fp16 scale and an fp16 low per group; 16/G for the mean alone).  The
constraint is met by a Lagrange multiplier (each channel takes the b minimising
E[q_c²]·e_c(b) + λ·cost(b); λ bisected), which picks points of the lower convex hull of
each channel's error-vs-cost curve.  This is the bit allocation of transform coding
(reverse water-filling), with the query energy as the weight; the model's weights are
untouched.  KVQuant (Hooper et al. 2024) calibrates its key datatypes offline in the same
spirit; the channel weighting by query energy follows from the score error alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["allocate_bits", "channel_errors", "key_bit_plan", "load_plan", "save_plan"]

_NAME = "attnkit_key_calibration"
STACK_ROWS = 64  # query rows (all heads) up to which one stacked product per width serves every head


def channel_errors(k: Tensor, group: int, options: Iterable[int]) -> dict[int, Tensor]:
    """Mean squared error per channel of k (H, T, D) quantized per channel over groups of
    ``group`` tokens (min-max, fp16 parameters, as :func:`attnkit.cache.quantize`), for
    each bit width in ``options`` (0: the group's mean alone).  Returns {bits: (H, D)}."""
    from .quant import dequantize, quantize

    h, t, d = k.shape
    t = t // group * group
    if t == 0:
        raise ValueError(f"key_bit_plan: the calibration batches need at least group_size={group} tokens")
    kg = k[:, :t].float().reshape(h, -1, group, d).transpose(-1, -2)  # (H, nG, D, G)
    out = {}
    for b in options:
        if b == 0:
            dq = kg.mean(-1, keepdim=True).half().float()
        else:
            dq = dequantize(*quantize(kg, b))
        out[b] = (dq - kg).pow(2).mean(dim=(1, 3))  # (H, D)
    return out


def allocate_bits(weight: Tensor, errors: dict[int, Tensor], cost: dict[int, float], budget: float) -> Tensor:
    """Bit width per channel minimising Σ weight·errors[b] with Σ cost[b] <= budget.

    Args:
        weight: (...,) non-negative weight per channel (E[q_c²]).
        errors: {bits: (...,) error per channel at that width}.
        cost: {bits: cost of one channel at that width}; the cheapest option must fit.
        budget: total cost allowed.

    Returns:
        (...,) long, each entry one of ``errors``' keys.
    """
    opts = sorted(errors)
    err = torch.stack([errors[b].double() for b in opts])  # (K, ...)
    c = torch.tensor([float(cost[b]) for b in opts], dtype=torch.float64).view(-1, *[1] * weight.dim())
    w = weight.double()
    if float(c.min()) * weight.numel() > budget:
        raise ValueError(f"allocate_bits: the cheapest width alone costs more than the budget {budget}")

    def pick(lam: float) -> Tensor:
        return (w * err + lam * c).argmin(dim=0)  # (...,) index into opts

    def spent(idx: Tensor) -> float:
        return float(c.flatten()[idx].sum())

    lo, hi = 0.0, 1.0
    while spent(pick(hi)) > budget:  # grow until affordable
        hi *= 4
        if hi > 1e30:
            break
    for _ in range(100):
        mid = (lo + hi) / 2
        if spent(pick(mid)) > budget:
            lo = mid
        else:
            hi = mid
    return torch.tensor(opts)[pick(hi)]


class _Recorder:
    """The attention function registered while calibrating: records each layer's
    post-RoPE queries (their energy per channel, per kv head) and keys, then runs SDPA."""

    def __init__(self):
        self.q2: dict[int, list[Tensor]] = {}
        self.keys: dict[int, list[Tensor]] = {}

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        b, hq, n, d = query.shape
        hkv = key.shape[1]
        q2 = query.detach().float().pow(2).reshape(b, hkv, hq // hkv, n, d).sum(dim=(0, 2, 3))  # (Hkv, D)
        idx = module.layer_idx
        self.q2.setdefault(idx, []).append(torch.cat([q2, q2.new_tensor([b * (hq // hkv) * n]).expand(hkv, 1)], -1))
        self.keys.setdefault(idx, []).extend(key.detach().float().unbind(0))  # (Hkv, T, D) each
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@torch.no_grad()
def key_bit_plan(model: nn.Module, batches: Iterable[Tensor], *, bits: int = 2, group_size: int = 64,
                 options: Iterable[int] | None = None) -> list[list[list[int]]]:
    """Fit per-channel key bit widths for ``QuantizedCache(bits, group_size, key_bits=plan)``.

    Args:
        model: a transformers model using the attention interface (Llama-style); run once
            per batch with exact SDPA attention, nothing of it changed.
        batches: token id tensors (B, T), T >= ``group_size`` (a few thousand tokens of
            text like the one to be cached).
        bits: the cache's bit width; the plan costs the same key bytes as uniform ``bits``.
        group_size: the cache's G.
        options: widths a channel may take (default 0, bits, 2·bits; each in 0, 2, 4, 8).

    Returns:
        plan[layer][kv head][channel] = bits, a JSON-serialisable nested list.
    """
    from transformers import AttentionInterface

    from .quant import BITS

    opts = sorted(set(options if options is not None else (0, bits, 2 * bits)))
    bad = [b for b in opts if b != 0 and b not in BITS]
    if bad or bits not in BITS:
        raise ValueError(f"key_bit_plan: 'bits' and 'options' must be in {BITS} (options may add 0), got {bits}, {opts}")
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"key_bit_plan: argument 'model' must be a transformers PreTrainedModel, got {type(model).__name__}")
    rec = _Recorder()
    AttentionInterface.register(_NAME, rec)
    previous = model.config._attn_implementation
    model.set_attn_implementation(_NAME)
    try:
        n = 0
        for ids in batches:
            model(ids, use_cache=False)
            n += 1
    finally:
        model.set_attn_implementation(previous)
    if n == 0:
        raise ValueError("key_bit_plan: argument 'batches' gave no batch")
    cost = {b: b + (16 if b == 0 else 32) / group_size for b in opts}
    plan = []
    for layer in sorted(rec.q2):
        stats = torch.stack(rec.q2[layer]).sum(0)  # (Hkv, D + 1)
        weight = stats[:, :-1] / stats[:, -1:]  # E[q_c²] per kv head (over its query heads)
        errs = [channel_errors(kb, group_size, opts) for kb in rec.keys[layer]]
        counts = [kb.shape[1] // group_size for kb in rec.keys[layer]]
        total = sum(counts)
        err = {b: sum(e[b] * c for e, c in zip(errs, counts)) / max(total, 1) for b in opts}
        hkv, _, d = rec.keys[layer][0].shape
        budget = hkv * d * (bits + 32 / group_size)
        plan.append(allocate_bits(weight, err, cost, budget).tolist())
    return plan


def save_plan(plan: list, path: str | Path) -> None:
    """Write a key bit plan as JSON."""
    Path(path).write_text(json.dumps({"kind": "attnkit.key_bits", "version": 1, "plan": plan}))


def load_plan(path: str | Path) -> list[list[list[int]]]:
    """Read a plan :func:`save_plan` wrote (JSON only: loading cannot run code)."""
    obj = json.loads(Path(path).read_text())
    if not isinstance(obj, dict) or obj.get("kind") != "attnkit.key_bits" or obj.get("version") != 1:
        raise ValueError(f"load_plan: {path} is not an attnkit key bit plan (kind attnkit.key_bits, version 1)")
    return obj["plan"]


class KeyLayout:
    """How one layer's keys are held under a plan: per bit width b, the (kv head, channel)
    entries with that width, head-major, each quantized per channel over groups of G tokens.

    Held per width b > 0: ``key_codes{b}`` (B, nG, E_b, G·b/8) uint8, ``key_scale{b}`` and
    ``key_low{b}`` (B, nG, E_b) fp16; for width 0: ``key_mean`` (B, nG, E_0) fp16, the
    group's mean.  Scores: for few query rows (decoding) one product per width with the
    rows of all heads stacked (B, H·M, E_b), each row zero outside its own head's entries
    (H times the multiply-adds, in one operation instead of H); for many rows one product
    per head and width over that head's entries.
    """

    def __init__(self, bits: Tensor, group: int):
        from .quant import BITS

        if bits.dim() != 2 or not all(int(b) == 0 or int(b) in BITS for b in bits.unique()):
            raise ValueError(f"QuantizedCache: argument 'key_bits': each layer's plan must be (kv heads, head dim) "
                             f"widths in {(0, *BITS)}, got shape {tuple(bits.shape)} values {bits.unique().tolist()}")
        self.heads, self.dim = bits.shape
        self.group = group
        flat = bits.flatten()
        self.widths = sorted(int(b) for b in flat.unique())
        self.index = {b: (flat == b).nonzero()[:, 0] for b in self.widths}  # (E_b,) h·D + c, head-major
        self.owner = {b: torch.arange(self.heads)[:, None] == (i // self.dim)[None] for b, i in self.index.items()}
        self.ends = {b: o.sum(1).cumsum(0).tolist() for b, o in self.owner.items()}  # head h's entries end here

    def names(self) -> list[str]:
        return [n for b in self.widths for n in ((f"key_codes{b}", f"key_scale{b}", f"key_low{b}") if b else ("key_mean",))]

    def nbytes(self) -> int:
        return sum(i.nbytes + self.owner[b].nbytes for b, i in self.index.items())

    def empty(self, batch: int, device) -> dict[str, Tensor]:
        out = {}
        for b, i in self.index.items():
            if b:
                out[f"key_codes{b}"] = torch.empty(batch, 0, len(i), -(-self.group * b // 8), dtype=torch.uint8, device=device)
                out[f"key_scale{b}"] = torch.empty(batch, 0, len(i), dtype=torch.float16, device=device)
                out[f"key_low{b}"] = torch.empty(batch, 0, len(i), dtype=torch.float16, device=device)
            else:
                out["key_mean"] = torch.empty(batch, 0, len(i), dtype=torch.float16, device=device)
        return out

    def quantize(self, k: Tensor) -> dict[str, Tensor]:
        """k (B, H, nG', G, D) -> the tensors of nG' new groups (to be appended along dim 1)."""
        from .quant import pack, quantize

        b, h, n, g, d = k.shape
        rows = k.float().permute(0, 2, 1, 4, 3).reshape(b, n, h * d, g)  # (B, nG', H·D, G)
        out = {}
        for w, i in self.index.items():
            x = rows[:, :, i.to(k.device)]  # (B, nG', E, G)
            if w:
                codes, s, low = quantize(x, w)
                out[f"key_codes{w}"], out[f"key_scale{w}"], out[f"key_low{w}"] = pack(codes, w), s, low
            else:
                out["key_mean"] = x.mean(-1).to(torch.float16)
        return out

    def dequantize(self, held: dict[str, Tensor]) -> Tensor:
        """The held groups' keys: (B, H, nG·G, D) fp32."""
        from .quant import dequantize, unpack

        any_ = next(iter(held.values()))
        b, n = any_.shape[:2]
        rows = any_.new_zeros(b, n, self.heads * self.dim, self.group, dtype=torch.float32)
        for w, i in self.index.items():
            i = i.to(rows.device)
            if w:
                codes = unpack(held[f"key_codes{w}"], w, self.group)
                rows[:, :, i] = dequantize(codes, held[f"key_scale{w}"], held[f"key_low{w}"])
            else:
                rows[:, :, i] = held["key_mean"].float()[..., None]
        k = rows.view(b, n, self.heads, self.dim, self.group).permute(0, 2, 1, 4, 3)  # (B, H, nG, G, D)
        return k.reshape(b, self.heads, n * self.group, self.dim)

    def rows(self, qs: Tensor) -> tuple[bool, dict[int, Tensor]]:
        """The query rows each width's product takes, and whether they are stacked.

        Few rows (decoding, H·M <= STACK_ROWS): per width (B, H·M, E_b), row h·M + m zero
        outside head h's entries, so that one product serves all heads.  Many rows
        (prefill): per width (B, M, E_b), the rows as gathered; each head's product then
        takes its own entries (no multiplications by zero)."""
        b, h, m, d = qs.shape
        flat = qs.transpose(1, 2).reshape(b, m, h * d)  # (B, M, H·D)
        stacked = h * m <= STACK_ROWS
        out = {}
        for w, i in self.index.items():
            a = flat[..., i.to(qs.device)]  # (B, M, E)
            if stacked:
                a = (a[:, None] * self.owner[w].to(qs.device)[None, :, None]).reshape(b, h * m, -1)  # (B, H·M, E)
            out[w] = a
        return stacked, out

    def _product(self, a: Tensor, held: dict[str, Tensor], w: int, sl: slice) -> Tensor:
        """a (B, M', E') times the held groups' entries ``sl`` of width w: (B, nG, M', G or 1)."""
        from .quant import code_matmul

        a = a[..., sl]
        if w:
            s, low = held[f"key_scale{w}"][..., sl].float(), held[f"key_low{w}"][..., sl].float()  # (B, nG, E')
            part = code_matmul(a[:, None] * s[:, :, None], held[f"key_codes{w}"][:, :, sl], w)[..., : self.group]
        else:
            low, part = held["key_mean"][..., sl].float(), 0.0
        return part + torch.matmul(low, a.transpose(-1, -2))[..., None]  # + q·low

    def scores(self, rows: tuple[bool, dict[int, Tensor]], held: dict[str, Tensor], m: int) -> Tensor:
        """Scores of :meth:`rows` against the held groups: (B, H, M, nG·G)."""
        stacked, per_width = rows
        total = None
        for w, a in per_width.items():
            if stacked:
                part = self._product(a, held, w, slice(None))  # (B, nG, H·M, ·)
            else:
                ends = self.ends[w]
                part = torch.cat([self._product(a, held, w, slice(e0, e1)) for e0, e1 in zip([0, *ends[:-1]], ends)],
                                 dim=2)  # (B, nG, H·M, ·): head h's rows h·M..h·M+M−1
            total = part if total is None else total + part
        b, n = total.shape[:2]
        total = total.expand(b, n, self.heads * m, self.group)
        return total.reshape(b, n, self.heads, m, self.group).permute(0, 2, 3, 1, 4).reshape(b, self.heads, m, -1)
