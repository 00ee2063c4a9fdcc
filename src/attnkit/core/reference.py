"""The plain, materialised attention: the oracle every exact method is tested against.

``math_attention`` is written to read as the specification; ``reference_attention``
runs it in float64.  The "math" method runs the same code in fp32 (fp32 statistics for
fp16/bf16 inputs), so the oracle and the method cannot drift apart.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .inputs import AttentionInputs, prepare_inputs

__all__ = ["reference_attention", "math_attention", "safe_softmax", "causal_keep"]


def causal_keep(n0: int, n1: int, s0: int, s1: int, device: torch.device) -> Tensor:
    """Bool (n1-n0, s1-s0) tile of the causal pattern, True = attend.

    Top-left aligned, as SDPA: query i sees key j iff j <= i.  For N=3, S=5::

        1 0 0 0 0
        1 1 0 0 0
        1 1 1 0 0
    """
    rows = torch.arange(n0, n1, device=device)[:, None]
    cols = torch.arange(s0, s1, device=device)[None, :]
    return cols <= rows


def safe_softmax(scores: Tensor) -> Tensor:
    """Softmax over the last dim that gives zeros (not NaN) on rows that are all -inf."""
    if scores.shape[-1] == 0:  # no keys at all: like a fully masked row
        return scores
    m = scores.amax(dim=-1, keepdim=True).detach()
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    p = torch.exp(scores - m)
    denom = p.sum(dim=-1, keepdim=True)
    return p / torch.where(denom == 0, torch.ones_like(denom), denom)


def masked_scores(inp: AttentionInputs, q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
    """Scaled scores with the mask and causal pattern applied: (*b, Hkv, G, N, S)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * inp.scale  # (*b, Hkv, G, N, S)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.to(scores.dtype)
    if inp.is_causal:
        scores = scores.masked_fill(~causal_keep(0, inp.n, 0, inp.s, scores.device), float("-inf"))
    return scores


def math_attention(
    inp: AttentionInputs,
    compute_dtype: torch.dtype,
    *,
    need_weights: bool = False,
    average_weights: bool = False,
    dropout_keep: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """softmax(q k^T * scale + mask) v, materialised, computed in ``compute_dtype``.

    Args:
        inp: a validated call.
        compute_dtype: dtype of every intermediate (float64 for the reference).
        need_weights / average_weights: also return the (dropped-out) probabilities,
            (*batch, Hq, N, S), or averaged over heads to (*batch, N, S).
        dropout_keep: bool (*batch, Hq, N, S) keep-mask to apply instead of drawing one
            from the global RNG (tests use it to replay another method's dropout).

    Returns:
        (out (*batch, Hq, N, Dv) in q's dtype, weights or None).
    """
    q, k, v, mask = inp.grouped()
    q, k, v = q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype)
    probs = safe_softmax(masked_scores(inp, q, k, mask))  # (*b, Hkv, G, N, S)
    if inp.dropout_p > 0:
        if dropout_keep is None:
            dropout_keep = torch.rand(probs.shape, device=probs.device) >= inp.dropout_p
        else:
            dropout_keep = dropout_keep.unflatten(-3, (inp.hkv, inp.groups))
        probs = probs * dropout_keep / (1.0 - inp.dropout_p)
    out = inp.ungroup(torch.matmul(probs, v)).to(inp.dtype)  # (*b, Hq, N, Dv)
    if not need_weights:
        return out, None
    weights = inp.ungroup(probs)  # (*b, Hq, N, S)
    if average_weights:
        weights = weights.mean(dim=-3)
    return out, weights.to(inp.dtype)


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    return_weights: bool = False,
    dropout_keep: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact attention in float64 with the mask materialised -- the oracle.

    Same arguments and semantics as :func:`attnkit.attention`; the result is float64
    (not cast back), so that errors of other methods can be measured against it.

    Equivalent to::

        s = (q @ k.transpose(-1, -2)) * scale + mask      # -inf where masked
        p = softmax(s, dim=-1)                            # rows all -inf -> 0
        out = p @ v

    Returns:
        out (*batch, Hq, N, Dv) float64, and the probabilities (*batch, Hq, N, S) when
        ``return_weights``.
    """
    inp = prepare_inputs(q, k, v, attn_mask, dropout_p, is_causal, scale)
    inp64 = AttentionInputs(
        q.double(), k.double(), v.double(), attn_mask, inp.dropout_p, inp.is_causal, inp.scale
    )
    out, weights = math_attention(inp64, torch.float64, need_weights=return_weights, dropout_keep=dropout_keep)
    return (out, weights) if return_weights else out
