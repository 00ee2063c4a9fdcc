"""Per-channel key bit widths for :class:`~attnkit.cache.QuantizedCache`, fitted on a few batches.

At 2 bits, keys cost a quantized cache most of its perplexity (SmolLM2, 2048 tokens of
Pride & Prejudice, sinks=4: 2-bit keys and values +10%, the same with 8-bit keys +1.2%),
and much of the key error does not matter: a score is q·k, so channel c's quantization
error reaches the scores weighted by E[q_c²], and the query energy is far from uniform
over the channels.  The plan
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

With ``value_channels=k`` the plan also names each (layer, kv head)'s k value channels that
most often set the per-token value groups' ranges on the same tokens, which the cache holds
apart (:mod:`attnkit.cache.valuechannels`), at k·(4 + 32/G) bits per kv head and token on
top of the keys' (``budget`` can make the key widths pay for them).

A plan is one JSON-serialisable dict: ``{"key_bits": [layer][kv head][channel] widths,
"value_channels": [layer][kv head][k] channel indices}`` (the second entry only when
fitted); a plan from before value channels, the bare ``key_bits`` nested list, still
serves (:func:`as_plan`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["PLAN_ENTRIES", "allocate_bits", "as_plan", "channel_errors", "key_bit_plan", "load_plan", "save_plan"]

_NAME = "attnkit_key_calibration"
STACK_ROWS = 64  # query rows (all heads) up to which one stacked product per width serves every head
PLAN_ENTRIES = ("key_bits", "value_channels")


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
    post-RoPE queries (their energy per channel, per kv head), keys and, if asked, values,
    then runs SDPA."""

    def __init__(self, values: bool):
        self.q2: dict[int, list[Tensor]] = {}  # per layer, Σ q² per (kv head, channel) of each call
        self.rows: dict[int, int] = {}  # per layer, the query rows summed (batch · query heads per kv head · tokens)
        self.keys: dict[int, list[Tensor]] = {}
        self.values: dict[int, list[Tensor]] | None = {} if values else None

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        b, hq, n, d = query.shape
        hkv = key.shape[1]
        q2 = query.detach().float().pow(2).reshape(b, hkv, hq // hkv, n, d).sum(dim=(0, 2, 3))  # (Hkv, D)
        idx = module.layer_idx
        self.q2.setdefault(idx, []).append(q2)
        self.rows[idx] = self.rows.get(idx, 0) + b * (hq // hkv) * n
        self.keys.setdefault(idx, []).extend(key.detach().float().unbind(0))  # (Hkv, T, D) each
        if self.values is not None:
            self.values.setdefault(idx, []).extend(value.detach().float().unbind(0))  # (Hkv, T, Dv) each
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


_ACTIVE: list[_Recorder] = []  # the recorder of the calibration running now


def _record(module, query, key, value, attention_mask, **kwargs):
    """What is registered under ``_NAME``: the running calibration's recorder (the registry
    holds this function, never a recorder and the keys it collected)."""
    return _ACTIVE[-1](module, query, key, value, attention_mask, **kwargs)


@torch.no_grad()
def key_bit_plan(model: nn.Module, batches: Iterable[Tensor], *, bits: int = 2, group_size: int = 64,
                 options: Iterable[int] | None = None, value_channels: int = 0,
                 budget: float | None = None) -> dict[str, list]:
    """Fit per-channel key bit widths (and value channels to hold apart) for
    ``QuantizedCache(bits, group_size, key_bits=plan)``.

    Args:
        model: a transformers model using the attention interface (Llama-style); run once
            per batch with exact SDPA attention, nothing of it changed.
        batches: token id tensors (B, T), T >= ``group_size`` (a few thousand tokens of
            text like the one to be cached).
        bits: the cache's bit width.
        group_size: the cache's G.
        options: widths a channel may take (default 0, bits, min(2·bits, 8); each in 0, 2, 4, 8).
        value_channels: k >= 0, value channels per (layer, kv head) to hold apart (those whose
            removal most shrinks the per-token value groups' ranges), 4-bit per channel over
            groups of G tokens.
        budget: bits per key number the key widths may spend, scales, lows and means
            counted.  Default: uniform ``bits``' (bits + 32/G).  The held-apart value
            channels cost k·(4 + 32/G) bits per kv head and token on top; to keep the whole
            plan at uniform ``bits``' key bytes, pass bits + 32/G − k·(4 + 32/G)/D.

    Returns:
        ``{"key_bits": plan[layer][kv head][channel] = bits}``, plus ``"value_channels":
        [layer][kv head] = k channel indices`` when k > 0: a JSON-serialisable dict.
    """
    from transformers import AttentionInterface

    from .quant import BITS
    from .valuechannels import range_channels

    opts = sorted(set(options if options is not None else (0, bits, min(2 * bits, 8))))
    bad = [b for b in opts if b != 0 and b not in BITS]
    if bad or bits not in BITS:
        raise ValueError(f"key_bit_plan: 'bits' and 'options' must be in {BITS} (options may add 0), got {bits}, {opts}")
    if isinstance(value_channels, bool) or not isinstance(value_channels, int) or value_channels < 0:
        raise ValueError(f"key_bit_plan: argument 'value_channels' must be an int >= 0, got {value_channels!r}")
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"key_bit_plan: argument 'model' must be a transformers PreTrainedModel, got {type(model).__name__}")
    rec = _Recorder(values=value_channels > 0)
    AttentionInterface.register(_NAME, _record)
    previous = model.config._attn_implementation
    _ACTIVE.append(rec)
    model.set_attn_implementation(_NAME)
    try:
        n = 0
        for ids in batches:
            model(ids, use_cache=False)
            n += 1
    finally:
        model.set_attn_implementation(previous)
        _ACTIVE.remove(rec)
    if n == 0:
        raise ValueError("key_bit_plan: argument 'batches' gave no batch")
    if not rec.q2:
        raise TypeError("key_bit_plan: the model's attention did not run through transformers' attention interface "
                        "(a Llama-style model with config._attn_implementation is needed)")
    cost = {b: b + (16 if b == 0 else 32) / group_size for b in opts}
    per_number = budget if budget is not None else bits + 32 / group_size
    if per_number < min(cost.values()):
        raise ValueError(f"key_bit_plan: argument 'budget' is {per_number:.3f} bits per key number, below the "
                         f"cheapest width's {min(cost.values()):.3f}")
    plan = {name: [] for name in PLAN_ENTRIES[: 2 if value_channels else 1]}
    for layer in sorted(rec.q2):
        weight = torch.stack(rec.q2[layer]).sum(0) / rec.rows[layer]  # (Hkv, D): E[q_c²] over its query heads
        errs = [channel_errors(kb, group_size, opts) for kb in rec.keys[layer]]
        counts = [kb.shape[1] // group_size for kb in rec.keys[layer]]
        err = {b: sum(e[b] * c for e, c in zip(errs, counts)) / sum(counts) for b in opts}
        hkv, _, d = rec.keys[layer][0].shape
        plan["key_bits"].append(allocate_bits(weight, err, cost, hkv * d * per_number).tolist())
        if value_channels:
            values = torch.cat(rec.values[layer], dim=1)  # (Hkv, T, Dv): every batch's tokens
            if value_channels >= values.shape[-1]:
                raise ValueError(f"key_bit_plan: argument 'value_channels' must be below the value dim "
                                 f"{values.shape[-1]}, got {value_channels}")
            plan["value_channels"].append(range_channels(values, value_channels, group_size).tolist())
    return plan


def as_plan(plan, where: str = "as_plan: argument 'plan'") -> dict[str, list]:
    """A cache plan as the dict of its entries: :func:`key_bit_plan`'s dict as it is, a bare
    ``plan[layer][kv head][channel]`` of key widths (a plan from before value channels) as
    its ``"key_bits"``.  ``where`` names the plan in the error."""
    if not isinstance(plan, dict):
        return {"key_bits": plan}
    if not plan or set(plan) - set(PLAN_ENTRIES):
        raise ValueError(f"{where} must be a plan from attnkit.cache.key_bit_plan, a dict with entries among "
                         f"{PLAN_ENTRIES} (or the key widths alone), got entries {sorted(plan)}")
    return dict(plan)


def save_plan(plan: dict | list, path: str | Path) -> None:
    """Write a plan as JSON (version 2: the dict of :func:`as_plan`)."""
    Path(path).write_text(json.dumps({"kind": "attnkit.key_bits", "version": 2, "plan": as_plan(plan, "save_plan: argument 'plan'")}))


def load_plan(path: str | Path) -> dict[str, list]:
    """Read a plan :func:`save_plan` wrote (JSON only: loading cannot run code), as the dict
    of :func:`as_plan`; a version-1 file (key widths alone) gives ``{"key_bits": ...}``."""
    obj = json.loads(Path(path).read_text())
    if not isinstance(obj, dict) or obj.get("kind") != "attnkit.key_bits" or obj.get("version") not in (1, 2):
        raise ValueError(f"load_plan: {path} is not an attnkit key bit plan (kind attnkit.key_bits, version 1 or 2)")
    return as_plan(obj["plan"], f"load_plan: the plan in {path}")


class KeyLayout:
    """How one layer's keys are held under a plan, as ``b``-bit digits (b: the cache's bits).

    Channel entries e = (kv head, channel) with width w > 0, head-major, are quantized per
    channel over groups of G tokens to w-bit codes, and each code is held as w/b base-2^b
    digits c = Σ_j 2^(b·j)·d_j, every digit one ``b``-bit row of the same packed tensor --
    so the scores take one product of the cache's width per block, whatever the widths:
    Σ_e q_e (low_e + s_e c_e) = Σ_digits (2^(b·j) q_e s_e)·d + q·low.  Held:
    ``key_codes`` (B, nG, E_d, G·b/8) uint8 digits, ``key_scale``/``key_low`` (B, nG, E_c)
    fp16 per channel entry, ``key_mean`` (B, nG, E_0) fp16 for the width-0 entries.

    Few query rows (decoding): the rows of all heads stacked, (B, H·M, ·), each row zero
    outside its own head's entries: H times the multiply-adds, one product for all heads.
    Many rows (prefill): one product per head over its own entries.
    """

    _NAMES = ("key_codes", "key_scale", "key_low", "key_mean")

    def __init__(self, widths: Tensor, group: int, bits: int):
        if widths.dim() != 2 or not all(int(w) in (0, bits, 2 * bits, 4 * bits) and int(w) <= 8 for w in widths.unique()):
            raise ValueError(
                f"QuantizedCache: argument 'key_bits': each layer's plan must be (kv heads, head dim) widths, each 0 "
                f"or a multiple of bits={bits} up to 8, got shape {tuple(widths.shape)} values {widths.unique().tolist()}")
        self.heads, self.dim = widths.shape
        self.group, self.bits = group, bits
        # Index tensors in small dtypes: they are held per layer and counted by nbytes().
        flat = widths.flatten()
        chan = (flat > 0).nonzero()[:, 0]  # (E_c,) h·D + c of the quantized entries, head-major
        zero = (flat == 0).nonzero()[:, 0]  # (E_0,) the width-0 entries
        w = flat[chan]
        ndig = w // bits
        digit_chan = torch.repeat_interleave(torch.arange(len(chan)), ndig)  # (E_d,) its channel entry
        digit_pos = torch.arange(len(digit_chan)) - (torch.cumsum(ndig, 0) - ndig)[digit_chan]  # j
        heads = {"chan": chan // self.dim, "zero": zero // self.dim, "digit": chan[digit_chan] // self.dim}
        self.owner = {k: torch.arange(self.heads)[:, None] == h[None] for k, h in heads.items()}  # (H, E) bool
        self.ends = {k: o.sum(1).cumsum(0).tolist() for k, o in self.owner.items()}  # head h's entries end
        self.chan, self.zero, self.digit_chan = chan.int(), zero.int(), digit_chan.int()
        self.digit_shift = (bits * digit_pos).to(torch.uint8)  # (E_d,) b·j
        self.digit_mult = (2.0 ** (bits * digit_pos)).float()  # (E_d,) 2^(b·j)
        self.by_width = {int(x): (w == x).nonzero()[:, 0].int() for x in w.unique()}  # channel entries per width

    def names(self) -> list[str]:
        return list(self._NAMES)

    def nbytes(self) -> int:
        index = (self.chan, self.zero, self.digit_chan, self.digit_shift, self.digit_mult, *self.by_width.values())
        return sum(t.nbytes for t in index) + sum(o.nbytes for o in self.owner.values())

    def empty(self, batch: int, device) -> dict[str, Tensor]:
        kw = {"dtype": torch.float16, "device": device}
        return {"key_codes": torch.empty(batch, 0, len(self.digit_chan), -(-self.group * self.bits // 8),
                                         dtype=torch.uint8, device=device),
                "key_scale": torch.empty(batch, 0, len(self.chan), **kw),
                "key_low": torch.empty(batch, 0, len(self.chan), **kw),
                "key_mean": torch.empty(batch, 0, len(self.zero), **kw)}

    def quantize(self, k: Tensor) -> dict[str, Tensor]:
        """k (B, H, nG', G, D) -> the tensors of nG' new groups (to be appended along dim 1)."""
        from .quant import pack, quantize

        b, h, n, g, d = k.shape
        rows = k.float().permute(0, 2, 1, 4, 3).reshape(b, n, h * d, g)  # (B, nG', H·D, G)
        x = rows[:, :, self.chan.to(k.device)]  # (B, nG', E_c, G)
        codes = torch.empty(x.shape, dtype=torch.uint8, device=k.device)
        scale = torch.empty(x.shape[:-1], dtype=torch.float16, device=k.device)
        low = torch.empty_like(scale)
        for w, sel in self.by_width.items():
            sel = sel.to(k.device)
            codes[:, :, sel], scale[:, :, sel], low[:, :, sel] = quantize(x[:, :, sel], w)
        mask = (1 << self.bits) - 1
        digits = (codes[:, :, self.digit_chan.to(k.device)] >> self.digit_shift.to(k.device)[:, None]) & mask
        return {"key_codes": pack(digits, self.bits), "key_scale": scale, "key_low": low,
                "key_mean": rows[:, :, self.zero.to(k.device)].mean(-1).to(torch.float16)}

    def dequantize(self, held: dict[str, Tensor]) -> Tensor:
        """The held groups' keys: (B, H, nG·G, D) fp32."""
        from .quant import unpack

        b, n = held["key_scale"].shape[:2]
        dev = held["key_scale"].device
        digits = unpack(held["key_codes"], self.bits, self.group).float()  # (B, nG, E_d, G)
        codes = torch.zeros(b, n, len(self.chan), self.group, device=dev)
        codes.index_add_(2, self.digit_chan.to(dev).long(), digits * self.digit_mult.to(dev)[:, None])
        rows = torch.zeros(b, n, self.heads * self.dim, self.group, device=dev)
        rows[:, :, self.chan.to(dev)] = held["key_low"].float()[..., None] + codes * held["key_scale"].float()[..., None]
        rows[:, :, self.zero.to(dev)] = held["key_mean"].float()[..., None]
        k = rows.view(b, n, self.heads, self.dim, self.group).permute(0, 2, 1, 4, 3)  # (B, H, nG, G, D)
        return k.reshape(b, self.heads, n * self.group, self.dim)

    def rows(self, qs: Tensor) -> tuple[bool, dict[str, Tensor]]:
        """The query rows the products take, per kind of entry ("chan", "zero", "digit"), and
        whether they are stacked: (B, H·M, E) with row h·M + m zero outside head h's entries,
        or (B, M, E) as gathered."""
        b, h, m, d = qs.shape
        dev = qs.device
        flat = qs.transpose(1, 2).reshape(b, m, h * d)  # (B, M, H·D)
        a = {"chan": flat[..., self.chan.to(dev)], "zero": flat[..., self.zero.to(dev)]}
        a["digit"] = a["chan"][..., self.digit_chan.to(dev)] * self.digit_mult.to(dev)  # 2^(b·j) q_e
        stacked = h * m <= STACK_ROWS
        if stacked:
            a = {k: (v[:, None] * self.owner[k].to(dev)[None, :, None]).reshape(b, h * m, -1) for k, v in a.items()}
        return stacked, a

    def _product(self, a: dict[str, Tensor], held: dict[str, Tensor], sl: dict[str, slice], step: int) -> Tensor:
        """Rows a (B, M', ·) times the held groups' entries ``sl``: (B, nG, M', G)."""
        from .quant import code_matmul

        ad, ac, a0 = a["digit"][..., sl["digit"]], a["chan"][..., sl["chan"]], a["zero"][..., sl["zero"]]
        s = held["key_scale"][..., sl["chan"]].float()[..., self.digit_chan[sl["digit"]].to(ad.device) - sl["chan"].start]
        a_s, codes = ad[:, None] * s[:, :, None], held["key_codes"][:, :, sl["digit"]]  # (B, nG, M', E_d'), codes
        if codes.shape[2]:
            out = torch.cat([code_matmul(a_s[:, g0 : g0 + step], codes[:, g0 : g0 + step], self.bits)
                             for g0 in range(0, codes.shape[1], step)], dim=1)[..., : self.group]
        else:  # no quantized entry here: only means
            out = a_s.new_zeros(*a_s.shape[:-1], self.group)
        low = torch.matmul(held["key_low"][..., sl["chan"]].float(), ac.transpose(-1, -2))  # (B, nG, M')
        if a0.shape[-1]:
            low = low + torch.matmul(held["key_mean"][..., sl["zero"]].float(), a0.transpose(-1, -2))
        return out + low[..., None]

    def scores_fused(self, qs: Tensor, held: dict[str, Tensor], out: Tensor) -> None:
        """:meth:`scores` of few rows, written into ``out`` (B, H, M, nG·G) (a view into the
        caller's score tensor) by one call of the C kernel for every group
        (:func:`attnkit.cache.native.plan_scores`: each head's digit rows multiplied by its own
        query rows, scales and lows read through the layout's index tensors)."""
        from .native import plan_scores
        plan_scores(self, qs, held, out)

    def scores(self, rows: tuple[bool, dict[str, Tensor]], held: dict[str, Tensor], m: int,
               step: int | None = None) -> Tensor:
        """Scores of :meth:`rows` against the held groups: (B, H, M, nG·G), the codes
        unpacked ``step`` groups at a time (default: all at once)."""
        stacked, a = rows
        n = held["key_scale"].shape[1]
        step = step or max(1, n)
        if stacked:
            out = self._product(a, held, {k: slice(0, None) for k in ("digit", "chan", "zero")}, step)
        else:
            starts = {k: [0, *e[:-1]] for k, e in self.ends.items()}
            out = torch.cat([self._product(a, held, {k: slice(starts[k][h], self.ends[k][h]) for k in self.ends}, step)
                             for h in range(self.heads)], dim=2)  # (B, nG, H·M, G): head h's rows h·M..
        b = out.shape[0]
        return out.reshape(b, n, self.heads, m, self.group).permute(0, 2, 3, 1, 4).reshape(b, self.heads, m, -1)
