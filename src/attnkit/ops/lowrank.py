"""Linformer: keys and values projected along the sequence axis to R rows.

With projections ``E, F`` of shape (R, S) (one row per pooled key)::

    K' = E K        V' = F V                                   (R, D), (R, Dv)
    out = softmax(Q K'^T · scale + b) V'                       cost O(N·R·D + S·R·D)

where ``b`` is an optional per-row logit bias (below).  Three projections:

* ``"pool"`` (the default): segment means.  The kept keys, in order, are cut into R
  contiguous segments (segment r holds the keys of rank floor(r·L/R) .. floor((r+1)·L/R)-1
  among the L kept keys); E = F = the segment-mean matrix.  Parameter-free, any length,
  usable on a pretrained model.  Padding keys get zero weight, and because the segments
  are cut over the kept keys a right-padded row gives exactly what the unpadded sequence
  gives on its own (variable lengths in one batch).  With R >= L every kept key is its own
  segment: exact attention.  Computed with segment sums (index_add), O(S·D).
* ``"random"``: a seeded Johnson-Lindenstrauss projection, entries N(0, 1/R) (so
  E[|E x|^2] = |x|^2), drawn for the actual S from a generator seeded by ``seed``;
  E first, then F.  Padding keys' columns are zeroed.  Linformer's fixed-projection
  variant, to be trained with: it does not approximate a given attention (each pooled
  value is a signed mix of about S/R values, sqrt(S/R) times their size; on the test
  inputs, N = 512, the relative output error is 14, 4.9, 1.25 at R = 16, 64, 256).
* ``"learned"``: parameters E, F of shape (R, max_len) made by :meth:`LowRank.make_state`,
  initialised to the segment-mean matrix over max_len (so training starts from "pool"),
  one pair shared by all heads (the paper's headwise sharing).
  A sequence of S < max_len keys uses the first S columns; padded keys' columns are
  zeroed; each row is then rescaled to keep the L1 mass it has over all max_len columns
  (|e_r|_1 / |e_r[kept]|_1), so the segment-mean start stays a mean over the keys that
  are there (not diluted by absent ones), and a row with no mass left on the kept keys is
  dropped.  S > max_len is refused.

Count bias (``count_bias=True``, the default; not in the paper): each pooled key stands
for ``c`` keys, and ``sum_{j in seg} exp(q.k_j) v_j ~ c exp(q.mean k) mean v``, so the
logit of row r gets ``+ log c_r``.  ``c_r`` is the effective number of keys of the row,
``|e_r|_1^2 / |e_r|_2^2``: the kept count for a segment mean (pool, learned at init).
It only matters when segments differ in size (S not a multiple of R, padding): there it
lowers the error against exact attention -- relative output error, structured inputs
(tests/test_lowrank.py), D = 64, R = 256: S = 500 0.012 instead of 0.024; S = 512 with
40% of the keys padded at random 0.012 instead of 0.038 (peaked attention, q x3: 0.051
instead of 0.065, and 0.063 instead of 0.097).  With S a multiple of R and no padding it
is a constant shift, which softmax ignores.  For "random" every row has about the same
effective count, so it is left out.  ``count_bias=False`` gives the paper's formula.

A row (segment) with no kept key gets a -inf logit; when a batch row has no kept key at
all, every logit is left at 0 against all-zero pooled values, so the output is 0 with
zero gradients (never NaN).

Reference:
    Wang et al., "Linformer: Self-Attention with Linear Complexity", 2020.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.capabilities import Capabilities, Method
from ..core.inputs import AttentionInputs, Shape
from ..core.reference import safe_softmax
from ..core.random import seeded_generator
from ..core.registry import register
from .tiled import compute_dtype

__all__ = [
    "LowRank",
    "LowRankProjections",
    "grouped_sdpa",
    "naive_lowrank",
    "projection_matrices",
    "segment_index",
    "segment_means",
    "segment_mean_matrix",
]

NEG_INF = float("-inf")
PROJECTIONS = ("pool", "learned", "random")


# -- segments --------------------------------------------------------------------------


def segment_index(keep: Tensor | None, s: int, r: int, device: torch.device) -> Tensor:
    """The segment of every key: R contiguous segments of the kept keys.

    Kept key of rank j (0-based, among the L kept keys) goes to segment
    ``((j + 1)·R - 1) // L``, i.e. segment r holds ranks floor(r·L/R) .. floor((r+1)·L/R)-1
    (sizes differ by at most one; with R >= L every key is alone in its segment).
    Padding keys get some valid index; callers give them zero weight.

    Args:
        keep: (..., S) bool, True = kept, or None (all kept).
        s: S.  r: R.

    Returns:
        (S,) int64 without a mask, else (..., S).
    """
    if keep is None:
        j = torch.arange(s, device=device)
        return ((j + 1) * r - 1) // max(s, 1)
    rank = keep.cumsum(-1) - 1  # (..., S): rank among kept keys, -1 before the first
    count = keep.sum(-1, keepdim=True).clamp(min=1)  # (..., 1)
    return ((rank + 1) * r - 1).clamp(min=0) // count


def segment_counts(keep: Tensor | None, s: int, r: int, device: torch.device) -> Tensor:
    """Kept keys per segment, fp32: (R,) without a mask, else (..., R)."""
    bounds = torch.arange(r + 1, device=device)  # (R+1,)
    total = torch.tensor(s, device=device) if keep is None else keep.sum(-1, keepdim=True)  # (..., 1)
    edges = (bounds * total) // r  # (..., R+1): floor(r·L/R)
    return (edges[..., 1:] - edges[..., :-1]).float()


def segment_means(x: Tensor, keep: Tensor | None, r: int) -> tuple[Tensor, Tensor]:
    """Means of x over R contiguous segments of its kept rows, without any (R, S) matrix.

    Args:
        x: (*b, H, 1|G, S, D) (any leading dims).
        keep: None, or (*b', H|1, 1|G, S) bool broadcastable to x's leading dims.
        r: R.

    Returns:
        means (*b'', R, D) (0 for an empty segment) and counts (R,) or (*b', H|1, 1|G, R).
    """
    s = x.shape[-2]
    idx = segment_index(keep, s, r, x.device)
    count = segment_counts(keep, s, r, x.device)
    if keep is None:
        sums = x.new_zeros(*x.shape[:-2], r, x.shape[-1]).index_add_(-2, idx, x)  # (..., R, D)
    else:
        # where, not a product: a padded key holding inf/NaN must not reach the sums.
        xk = torch.where(keep[..., None], x, 0.0)  # (*b'', S, D)
        idx = idx[..., None].expand(xk.shape)  # (*b'', S, D)
        sums = xk.new_zeros(*xk.shape[:-2], r, xk.shape[-1]).scatter_add(-2, idx, xk)  # (*b'', R, D)
    return sums / count.clamp(min=1).to(x.dtype)[..., None], count


def segment_mean_matrix(keep: Tensor | None, s: int, r: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The segment-mean matrix, materialised: (R, S), or (..., R, S) with a mask.

    Row r holds 1/c_r on the kept keys of segment r and 0 elsewhere (all 0 when empty).
    """
    idx = segment_index(keep, s, r, device)  # (..., S)
    member = idx[..., None, :] == torch.arange(r, device=device)[:, None]  # (..., R, S)
    if keep is not None:
        member = member & keep[..., None, :]
    member = member.to(dtype)
    return member / member.sum(-1, keepdim=True).clamp(min=1)


# -- projections (dense; the naive formula and the learned/random fast path) ----------------


class LowRankProjections(nn.Module):
    """The learned projections E and F, (R, max_len) each, shared by all heads.

    Initialised to the segment-mean matrix over max_len, so an untrained model computes
    "pool" attention at S = max_len.
    """

    def __init__(self, rank: int, max_len: int) -> None:
        super().__init__()
        init = segment_mean_matrix(None, max_len, rank, torch.float32, torch.device("cpu"))
        self.e = nn.Parameter(init.clone())  # (R, max_len)
        self.f = nn.Parameter(init.clone())  # (R, max_len)

    def extra_repr(self) -> str:
        return f"rank={self.e.shape[0]}, max_len={self.e.shape[1]}"


@torch.compiler.disable  # dynamo cannot trace a torch.Generator: one graph break, drawn eagerly
@lru_cache(maxsize=4)
def _random_projections(seed: int, r: int, s: int) -> tuple[Tensor, Tensor]:
    """E, F (R, S) fp32 on CPU, entries N(0, 1/R), from a generator seeded by ``seed``
    (cached: the same tensors for the same arguments; never modified in place)."""
    g = seeded_generator(seed)
    e = torch.randn(r, s, generator=g) / math.sqrt(r)  # (R, S)
    f = torch.randn(r, s, generator=g) / math.sqrt(r)  # (R, S)
    return e, f


def _renormalise(rows: Tensor, full_mass: Tensor) -> Tensor:
    """Rescale rows (..., R, S') to the L1 mass ``full_mass`` (R,); rows with no mass stay 0."""
    mass = rows.abs().sum(-1, keepdim=True)  # (..., R, 1)
    return rows * torch.where(mass > 0, full_mass[:, None] / mass.clamp(min=1e-30), 0.0)


def effective_count(e: Tensor) -> Tensor:
    """|e_r|_1^2 / |e_r|_2^2 per row (..., R): how many keys a pooled key stands for (0 if empty)."""
    l1 = e.abs().sum(-1)
    l2 = e.pow(2).sum(-1)
    return torch.where(l2 > 0, l1.pow(2) / l2.clamp(min=1e-30), 0.0)


def row_bias(count: Tensor, use_count: bool) -> Tensor:
    """Logit bias per pooled row (..., R): log count (or 0), -inf for an empty row.

    When no row of a batch element has a key, all are 0 instead: its pooled values are
    all zero, so the output is 0 without a softmax over nothing but -inf.
    """
    bias = count.clamp(min=1).log() if use_count else torch.zeros_like(count)
    has_any = (count > 0).any(-1, keepdim=True)
    return torch.where((count > 0) | ~has_any, bias, NEG_INF)


def projection_matrices(
    cfg: LowRank, keep: Tensor | None, s: int, state: nn.Module | None, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor, Tensor | None]:
    """E, F as dense (R, S) (or (..., R, S) with a mask) and the row bias (..., R) or None.

    Args:
        keep: (..., S) bool or None.
    """
    if cfg.projection == "pool":
        r = max(1, min(cfg.rank, s))
        e = segment_mean_matrix(keep, s, r, dtype, device)  # (..., R, S)
        f = e
    elif cfg.projection == "random":
        e, f = (t.to(device=device, dtype=dtype) for t in _random_projections(cfg.seed, cfg.rank, s))
        if keep is not None:
            e, f = (torch.where(keep[..., None, :], t, 0.0) for t in (e, f))  # (..., R, S)
        return e, f, None
    else:
        e_full, f_full = _learned(cfg, state, s)
        e_full, f_full = e_full.to(device=device, dtype=dtype), f_full.to(device=device, dtype=dtype)
        e, f = e_full[:, :s], f_full[:, :s]  # (R, S)
        if keep is not None:
            e, f = (torch.where(keep[..., None, :], t, 0.0) for t in (e, f))  # (..., R, S)
        e = _renormalise(e, e_full.abs().sum(-1))
        f = _renormalise(f, f_full.abs().sum(-1))
    return e, f, row_bias(effective_count(e), cfg.count_bias)


def _learned(cfg: LowRank, state: nn.Module | None, s: int) -> tuple[Tensor, Tensor]:
    if state is None:
        raise ValueError(
            "LowRank(projection='learned') has parameters and was called without them (state=None). "
            "Use it inside attnkit.MultiheadAttention(..., method=...), which creates them, or pass "
            "state=LowRank(...).make_state(num_heads, head_dim); for functional use choose "
            "projection='pool' (parameter-free) or projection='random' (seeded)."
        )
    e, f = state.e, state.f
    if tuple(e.shape) != (cfg.rank, cfg.max_len) or tuple(f.shape) != (cfg.rank, cfg.max_len):
        raise ValueError(
            f"the learned projections have shape {tuple(e.shape)} but {cfg.spec()} needs "
            f"(rank, max_len) = {(cfg.rank, cfg.max_len)}; make the state with this config's make_state()."
        )
    if s > cfg.max_len:
        raise ValueError(
            f"S={s} keys exceed max_len={cfg.max_len} of the learned projection; use a larger max_len "
            f"or projection='pool' (any length)."
        )
    return e, f


# -- the naive formula ------------------------------------------------------------------


def naive_lowrank(
    q: Tensor, k: Tensor, v: Tensor, e: Tensor, f: Tensor, bias: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    """Linformer's formula, materialised: the oracle of the fast path.

    Args:
        q: (*b, Hkv, G, N, D); k: (*b, Hkv, 1, S, D); v: (*b, Hkv, 1, S, Dv).
        e, f: (..., R, S) projections (padding folded in); bias: (..., R) or None.

    Returns:
        out (*b, Hkv, G, N, Dv) and the implied weights (*b, Hkv, G, N, S).

    Equivalent to::

        p = softmax(q @ (e @ k).T * scale + bias)       # (N, R)
        w = p @ f                                       # (N, S): what each query applies
        out = w @ v
    """
    scores = q @ (e @ k).transpose(-1, -2) * scale  # (*b, Hkv, G, N, R)
    if bias is not None:
        scores = scores + bias[..., None, :]
    w = safe_softmax(scores) @ f  # (*b, Hkv, G, N, S)
    return w @ v, w


# -- shared helpers ---------------------------------------------------------------------


def grouped_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """SDPA of grouped queries against per-kv-head keys, through torch's fused kernel.

    Args:
        q: (*b, Hkv, G, N, D); k: (*b, Hkv, G|1, S, D); v: (*b, Hkv, G|1, S, Dv).
        mask: None or (*b', Hkv|1, G|1, S) (bool True = attend, or float added).

    Returns:
        (*b, Hkv, G, N, Dv).
    """
    *b, hkv, g, n, d = q.shape
    s, dv = k.shape[-2], v.shape[-1]
    lead = math.prod(b)
    if k.shape[-3] == 1 and v.shape[-3] == 1 and (mask is None or mask.shape[-2] == 1):
        # The G query heads of a group share k, v and mask: fold them into the rows.
        qf = q.reshape(lead, hkv, g * n, d)  # (B*, Hkv, G·N, D)
        kf = k.expand(*b, hkv, 1, s, d).reshape(lead, hkv, s, d)  # (B*, Hkv, S, D)
        vf = v.expand(*b, hkv, 1, s, dv).reshape(lead, hkv, s, dv)  # (B*, Hkv, S, Dv)
        mf = None if mask is None else mask.expand(*b, mask.shape[-3], 1, s).reshape(lead, -1, 1, s)
        out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mf, scale=scale)  # (B*, Hkv, G·N, Dv)
    else:
        qf = q.reshape(lead, hkv * g, n, d)  # (B*, Hq, N, D)
        kf = k.expand(*b, hkv, g, s, d).reshape(lead, hkv * g, s, d)  # (B*, Hq, S, D)
        vf = v.expand(*b, hkv, g, s, dv).reshape(lead, hkv * g, s, dv)  # (B*, Hq, S, Dv)
        mf = None if mask is None else mask.expand(*b, hkv, g, s).reshape(lead, hkv * g, 1, s)
        out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mf, scale=scale)  # (B*, Hq, N, Dv)
    return out.reshape(*b, hkv, g, n, dv)


def key_keep(inp: AttentionInputs) -> Tensor | None:
    """The bool key-padding mask as (*b', Hkv|1, G|1, S), or None."""
    keep = inp.key_keep()
    return None if keep is None else keep.squeeze(-2)


# -- the method -------------------------------------------------------------------------


@register
@dataclass(frozen=True)
class LowRank(Method):
    """Linformer low-rank attention; see the module docstring for the formula and rules.

    Args:
        rank: R, rows of the projected keys and values (>= 1).  For "pool", R >= the
            number of kept keys gives exact attention.
        projection: "pool" (segment means, parameter-free), "random" (seeded
            Johnson-Lindenstrauss) or "learned" (parameters from make_state; needs max_len).
        seed: seed of the "random" projection.
        max_len: the longest sequence the "learned" projection serves (its width).
        count_bias: add log(effective count) to each pooled key's logit ("pool", "learned").

    Example::

        out = attnkit.attention(q, k, v, key_padding, method="lowrank:rank=256")
        mha = attnkit.MultiheadAttention(512, 8, method=LowRank(128, "learned", max_len=4096))
    """

    rank: int = 256
    projection: str = "pool"
    seed: int = 0
    max_len: int | None = None
    count_bias: bool = True

    name: ClassVar[str] = "lowrank"
    capabilities: ClassVar[Capabilities] = Capabilities(
        exact=False,
        causal=False,
        causal_note="Linformer's projection mixes every key position into each pooled key",
        full_masks=False,
        causal_with_mask=False,
        dropout=False,
        gqa=True,
        double_backward=False,
        deterministic=True,
    )

    def __post_init__(self):
        self.check_int("rank", 1, hint=" (e.g. rank=256)")
        self.check_choice("projection", tuple(PROJECTIONS))
        self.check_int("seed", 0)
        self.check_int("max_len", 1, optional=True)
        if self.projection == "learned":
            if self.max_len is None:
                raise ValueError(
                    "LowRank(projection='learned') needs max_len, the longest sequence it serves "
                    "(the width of its learned projections), e.g. max_len=4096"
                )
            if self.rank > self.max_len:
                raise ValueError(
                    f"LowRank(rank={self.rank}, max_len={self.max_len}): a learned projection needs "
                    f"rank <= max_len; lower rank or raise max_len"
                )
        self.check_choice("count_bias", (True, False))

    def not_supported_reasons(self, inp: AttentionInputs, *, need_weights: bool = False) -> list[str]:
        reasons = super().not_supported_reasons(inp, need_weights=need_weights)
        if self.projection == "learned" and self.max_len is not None and inp.s > self.max_len:
            reasons.append(
                f"S={inp.s} keys exceed max_len={self.max_len} of the learned projection "
                f"(use a larger max_len, or projection='pool' for any length)"
            )
        return reasons

    def make_state(self, num_heads: int, head_dim: int) -> nn.Module | None:
        if self.projection != "learned":
            return None
        return LowRankProjections(self.rank, self.max_len)

    def forward(self, inp, *, need_weights=False, average_weights=False, state=None):
        ct = compute_dtype(inp.dtype)
        q, k, v, _ = inp.grouped()
        q, k, v = q.to(ct), k.to(ct), v.to(ct)  # (*b, Hkv, G, N, D), (*b, Hkv, 1, S, D), (*b, Hkv, 1, S, Dv)
        keep = key_keep(inp)  # (*b', Hkv|1, G|1, S) or None
        if self.projection == "pool":
            r = max(1, min(self.rank, inp.s))  # S = 0: one empty segment, output 0
            kp, count = segment_means(k, keep, r)  # (*b, Hkv, G|1, R, D)
            vp, _ = segment_means(v, keep, r)  # (*b, Hkv, G|1, R, Dv)
            bias = row_bias(count, self.count_bias)  # (R,) or (*b', Hkv|1, G|1, R)
        else:
            e, f, bias = projection_matrices(self, keep, inp.s, state, ct, inp.device)
            kp, vp = e @ k, f @ v  # (*b, Hkv, G|1, R, D), (*b, Hkv, G|1, R, Dv)
        if bias is not None and bias.dim() == 1:
            bias = bias.view((1,) * (q.dim() - 3) + (1, -1))  # (1.., 1, 1, R): one row for every head
        if bias is not None and bias.requires_grad:
            # The learned bias needs its gradient, which SDPA's CPU kernel does not give for masks.
            out = safe_softmax(q @ kp.transpose(-1, -2) * inp.scale + bias[..., None, :]) @ vp
        else:
            out = grouped_sdpa(q, kp, vp, bias, inp.scale)  # (*b, Hkv, G, N, Dv)
        return inp.ungroup(out).to(inp.dtype), None

    def implied_weights(self, inp: AttentionInputs, state: nn.Module | None = None) -> Tensor:
        ct = torch.float64
        q, k, v, _ = inp.grouped()
        e, f, bias = projection_matrices(self, key_keep(inp), inp.s, state, ct, inp.device)
        _, w = naive_lowrank(q.to(ct), k.to(ct), v.to(ct), e, f, bias, inp.scale)
        return inp.ungroup(w)  # (*b, Hq, N, S)

    def flops(self, shape: Shape) -> float:
        """2·B·Hq·N·R·(D + Dv) for the attention over R pooled keys, plus, for "random"
        and "learned", 2·B·Hkv·R·S·(D + Dv) for E K and F V (pooling is elementwise)."""
        r = min(self.rank, shape.s) if self.projection == "pool" else self.rank
        total = 2.0 * shape.batch * shape.hq * shape.n * r * (shape.d + shape.dv)
        if self.projection != "pool":
            total += 2.0 * shape.batch * shape.hkv * r * shape.s * (shape.d + shape.dv)
        return total
