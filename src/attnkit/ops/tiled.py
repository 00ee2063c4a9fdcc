"""FlashAttention-2-style tiled attention in pure PyTorch: O(N) memory forward and backward.

Forward walks query blocks; for each it streams key blocks with the online softmax
(running max ``m``, running sum ``l``, accumulator ``acc``, all fp32) and saves only the
output and the log-sum-exp per query row.  Backward recomputes each score tile from the
saved log-sum-exp (Dao 2023, Algorithm 2), so neither pass ever holds an N x S tensor:
extra memory is O(N·D + tile), the tile being ``lead·block_q·block_k`` scores.

Causal tiles wholly in the future are skipped (about half the work); masks are sliced
per tile and never expanded; dropout is drawn per tile from a generator seeded by
(seed, tile) so backward replays it exactly without storing it.

References:
    Dao et al., "FlashAttention", NeurIPS 2022.  Dao, "FlashAttention-2", 2023.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.random import seeded_generator
from ..core.reference import causal_keep

__all__ = [
    "TileParams",
    "choose_blocks",
    "compute_dtype",
    "dropout_keep_tile",
    "partial_attention",
    "partial_attention_backward",
    "tiled_attention",
    "tiled_weights",
]

NEG_INF = float("-inf")


@dataclass(frozen=True)
class TileParams:
    """Everything about a tiled call that is not a tensor (one object for autograd)."""

    scale: float
    is_causal: bool
    dropout_p: float
    seed: int
    block_q: int
    block_k: int


def choose_blocks(lead: int, n: int, s: int, block_q: int | None, block_k: int | None) -> tuple[int, int]:
    """The block-size rule.

    A score tile holds ``lead·block_q·block_k`` fp32 values, where ``lead`` is the
    product of the batch and head dims.  Each tile is touched by ~5 elementwise passes
    (max, subtract, exp, sum, and the dropout/mask step), so it should stay in the
    last-level cache: the rule aims at a 4 MiB tile (1 Mi scores) and keeps block_k a
    multiple of 64 (GEMM-friendly) and no larger than needed.  Larger tiles mean fewer
    Python-level steps; past the cache, elementwise passes become memory-bound.  See
    ``benchmarks/bench_exact.py --blocks`` for the measurement behind the numbers.
    """
    target = 1 << 20  # scores per tile
    if block_k is None:
        block_k = min(s, 512)
    if block_q is None:
        block_q = max(16, min(n, target // max(1, lead * block_k)))
        if block_q > 16:
            block_q -= block_q % 16
    return max(1, min(block_q, n)), max(1, min(block_k, s))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and accumulators: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dropout_keep_tile(seed: int, i: int, j: int, shape: torch.Size, p: float, device: torch.device) -> Tensor:
    """Bool keep-mask of one (query block i, key block j) tile; the same for the same args."""
    g = seeded_generator(seed, i, j, device=device)
    return torch.rand(shape, generator=g, device=device) >= p


def _mask_tile(mask: Tensor | None, i0: int, i1: int, j0: int, j1: int) -> Tensor | None:
    if mask is None:
        return None
    rows = slice(i0, i1) if mask.shape[-2] != 1 else slice(None)
    cols = slice(j0, j1) if mask.shape[-1] != 1 else slice(None)
    return mask[..., rows, cols]


def _key_end(prm: TileParams, i1: int, s: int) -> int:
    """Keys a query block [i0, i1) can see end here (causal: key j <= query i)."""
    return min(s, i1) if prm.is_causal else s


def _scores(qs_i: Tensor, k_j: Tensor, mask: Tensor | None, prm: TileParams, i0: int, i1: int, j0: int, j1: int) -> Tensor:
    """One score tile (*lead, bq, bk) in fp32, masked; ``qs_i`` is already scaled."""
    s = torch.matmul(qs_i, k_j.transpose(-1, -2))
    mt = _mask_tile(mask, i0, i1, j0, j1)
    if mt is not None:
        s = s.masked_fill(~mt, NEG_INF) if mt.dtype == torch.bool else s + mt.to(s.dtype)
    if prm.is_causal and j1 - 1 > i0:  # the tile crosses the diagonal
        s = s.masked_fill(~causal_keep(i0, i1, j0, j1, s.device), NEG_INF)
    return s


def _forward(qs: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, prm: TileParams) -> tuple[Tensor, Tensor]:
    """Online-softmax forward.  qs (*lead, N, D) scaled fp32, k (*lead', S, D), v (*lead', S, Dv).

    Returns out (*lead, N, Dv) fp32 and lse (*lead, N) fp32 (-inf on fully masked rows).
    Differentiable by autograd when grad mode is on (used for double backward).
    """
    n, s = qs.shape[-2], k.shape[-2]
    lead = torch.broadcast_shapes(qs.shape[:-2], v.shape[:-2])
    outs, lses = [], []
    inplace = not torch.is_grad_enabled()
    for bi, i0 in enumerate(range(0, n, prm.block_q)):
        i1 = min(i0 + prm.block_q, n)
        qs_i = qs[..., i0:i1, :]
        m = qs.new_full((*lead, i1 - i0), NEG_INF)
        l = qs.new_zeros((*lead, i1 - i0))
        acc = qs.new_zeros((*lead, i1 - i0, v.shape[-1]))
        for bj, j0 in enumerate(range(0, _key_end(prm, i1, s), prm.block_k)):
            j1 = min(j0 + prm.block_k, s)
            sc = _scores(qs_i, k[..., j0:j1, :], mask, prm, i0, i1, j0, j1)  # (*lead, bq, bk)
            # The running max is a shift the result does not depend on: keep it out of
            # the autograd graph entirely (a half-detached shift would give wrong grads).
            m_new = torch.maximum(m, sc.detach().amax(dim=-1))
            m_safe = torch.where(m_new == NEG_INF, 0.0, m_new)  # rows masked so far stay at 0
            if inplace:
                p = sc.sub_(m_safe[..., None]).exp_()
            else:
                p = torch.exp(sc - m_safe[..., None])
            alpha = torch.exp(m - m_safe)
            l = l * alpha + p.sum(dim=-1)
            if prm.dropout_p > 0:
                keep = dropout_keep_tile(prm.seed, bi, bj, p.shape, prm.dropout_p, p.device)
                p = p * keep * (1.0 / (1.0 - prm.dropout_p))
            acc = acc * alpha[..., None] + torch.matmul(p, v[..., j0:j1, :])
            m = m_new
        l_safe = torch.where(l == 0, 1.0, l)
        outs.append(acc / l_safe[..., None])
        lses.append(torch.where(l == 0, NEG_INF, torch.where(m == NEG_INF, 0.0, m) + torch.log(l_safe)))
    if not outs:  # N == 0
        return qs.new_zeros((*lead, 0, v.shape[-1])), qs.new_zeros((*lead, 0))
    return torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)


def _backward(
    qs: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, out: Tensor, lse: Tensor, dout: Tensor,
    prm: TileParams, mask_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """FlashAttention-2 backward: recompute P per tile from lse.  All fp32.

    Returns dq (w.r.t. the *unscaled* q), dk, dv (reduced over the query groups) and
    the gradient of a float mask (its broadcast shape) when ``mask_grad``.
    """
    n, s = qs.shape[-2], k.shape[-2]
    delta = (dout * out).sum(dim=-1)  # (*lead, N)
    lse_safe = torch.where(lse == NEG_INF, float("inf"), lse)  # fully masked rows give P = 0
    dq = torch.zeros_like(qs)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    dmask = torch.zeros(mask.shape, dtype=qs.dtype, device=qs.device) if mask_grad else None
    drop_scale = 1.0 / (1.0 - prm.dropout_p) if prm.dropout_p > 0 else 1.0
    for bi, i0 in enumerate(range(0, n, prm.block_q)):
        i1 = min(i0 + prm.block_q, n)
        qs_i, do_i = qs[..., i0:i1, :], dout[..., i0:i1, :]
        for bj, j0 in enumerate(range(0, _key_end(prm, i1, s), prm.block_k)):
            j1 = min(j0 + prm.block_k, s)
            k_j, v_j = k[..., j0:j1, :], v[..., j0:j1, :]
            # Runs without autograd (double backward takes the other path): in place.
            p = _scores(qs_i, k_j, mask, prm, i0, i1, j0, j1).sub_(lse_safe[..., i0:i1, None]).exp_()
            dp = torch.matmul(do_i, v_j.transpose(-1, -2))  # (*lead, bq, bk)
            if prm.dropout_p > 0:
                keep = dropout_keep_tile(prm.seed, bi, bj, p.shape, prm.dropout_p, p.device)
                p_dropped = p * keep * drop_scale
                dp.mul_(keep).mul_(drop_scale)
            else:
                p_dropped = p
            ds = dp.sub_(delta[..., i0:i1, None]).mul_(p)
            dv[..., j0:j1, :] += torch.matmul(p_dropped.transpose(-1, -2), do_i).sum_to_size(dv[..., j0:j1, :].shape)
            dk[..., j0:j1, :] += torch.matmul(ds.transpose(-1, -2), qs_i).sum_to_size(dk[..., j0:j1, :].shape)
            dq[..., i0:i1, :] += torch.matmul(ds, k_j)
            if dmask is not None:
                dmt = _mask_tile(dmask, i0, i1, j0, j1)
                dmt += ds.sum_to_size(dmt.shape)
    return dq * prm.scale, dk, dv, dmask


def partial_attention(qs: Tensor, k: Tensor, v: Tensor, prm: TileParams) -> tuple[Tensor, Tensor]:
    """The forward over one key chunk, for callers that merge chunks themselves (ring attention).

    Args:
        qs: (*lead, N, D) queries, already scaled and in the compute dtype.
        k: (*lead', S, D) and v: (*lead', S, Dv) keys and values in the compute dtype.
        prm: the tiling; ``prm.is_causal`` aligns the chunks top-left (local indices).

    Returns:
        out (*lead, N, Dv) and lse (*lead, N), normalised within this chunk only; two
        chunks merge as ``lse = logaddexp(lse1, lse2)``, ``out = Σ exp(lse_i - lse)·out_i``.
    """
    return _forward(qs, k, v, None, prm)


def partial_attention_backward(
    qs: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor, prm: TileParams
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward over one key chunk, given the *merged* ``out`` and ``lse`` of all chunks.

    P is recomputed as exp(scores - lse), the true probabilities over every chunk, so
    the chunks' dq contributions sum to the full dq and dk, dv are exact for this chunk.
    Same arguments as :func:`partial_attention` plus out (*lead, N, Dv), lse (*lead, N)
    and dout (*lead, N, Dv) in the compute dtype.  Returns dq (w.r.t. the unscaled q),
    dk, dv (reduced to k's and v's shapes).
    """
    dq, dk, dv, _ = _backward(qs, k, v, None, out, lse, dout, prm, False)
    return dq, dk, dv


class _TiledAttention(torch.autograd.Function):
    """q (*b, Hkv, G, N, D), k (*b, Hkv, 1, S, D), v (*b, Hkv, 1, S, Dv), mask grouped or None."""

    @staticmethod
    def forward(ctx, q, k, v, mask, prm: TileParams):
        acc = compute_dtype(q.dtype)
        out, lse = _forward(q.to(acc) * prm.scale, k.to(acc), v.to(acc), mask, prm)
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.prm = prm
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, mask, out, lse = ctx.saved_tensors
        prm: TileParams = ctx.prm
        mask_grad = mask is not None and ctx.needs_input_grad[3]
        if torch.is_grad_enabled():
            # create_graph=True (double backward): differentiate a recomputed forward with
            # autograd.  This keeps every tile alive, O(N·S) memory, only on this path.
            inputs = [t for t in (q, k, v, mask) if t is not None and t.requires_grad]
            acc = compute_dtype(q.dtype)
            out2, _ = _forward(q.to(acc) * prm.scale, k.to(acc), v.to(acc), mask, prm)
            grads = iter(torch.autograd.grad(out2, inputs, dout.to(acc), create_graph=True, allow_unused=True))
            result = [next(grads) if t is not None and t.requires_grad else None for t in (q, k, v, mask)]
            return (*[g.to(t.dtype) if g is not None else None for g, t in zip(result, (q, k, v, mask))], None)
        acc = compute_dtype(q.dtype)
        dq, dk, dv, dmask = _backward(
            q.to(acc) * prm.scale, k.to(acc), v.to(acc), mask, out, lse, dout.to(acc), prm, mask_grad
        )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), (dmask.to(mask.dtype) if mask_grad else None), None


def tiled_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, prm: TileParams) -> tuple[Tensor, Tensor]:
    """Tiled attention on grouped views; returns out (q's dtype) and lse (fp32, no grad)."""
    return _TiledAttention.apply(q, k, v, mask, prm)


@torch.no_grad()
def tiled_weights(
    q: Tensor, k: Tensor, mask: Tensor | None, lse: Tensor, prm: TileParams, *, average: bool, out_dtype: torch.dtype
) -> Tensor:
    """Attention probabilities, tile by tile from the saved lse (after dropout, like torch).

    Returns (*b, Hkv, G, N, S), or (*b, N, S) averaged over all heads when ``average``.
    Peak extra memory: the returned tensor plus one tile.
    """
    n, s = q.shape[-2], k.shape[-2]
    acc = compute_dtype(q.dtype)
    qs, k32 = q.to(acc) * prm.scale, k.to(acc)
    lead = torch.broadcast_shapes(qs.shape[:-2], k.shape[:-2])
    heads = lead[-2] * lead[-1]
    shape = (*lead[:-2], n, s) if average else (*lead, n, s)
    weights = torch.zeros(shape, dtype=out_dtype, device=q.device)
    lse_safe = torch.where(lse == NEG_INF, float("inf"), lse)
    for bi, i0 in enumerate(range(0, n, prm.block_q)):
        i1 = min(i0 + prm.block_q, n)
        for bj, j0 in enumerate(range(0, _key_end(prm, i1, s), prm.block_k)):
            j1 = min(j0 + prm.block_k, s)
            p = torch.exp(_scores(qs[..., i0:i1, :], k32[..., j0:j1, :], mask, prm, i0, i1, j0, j1) - lse_safe[..., i0:i1, None])
            if prm.dropout_p > 0:
                p = p * dropout_keep_tile(prm.seed, bi, bj, p.shape, prm.dropout_p, p.device) / (1.0 - prm.dropout_p)
            if average:
                weights[..., i0:i1, j0:j1] = (p.sum(dim=(-4, -3)) / heads).to(out_dtype)
            else:
                weights[..., i0:i1, j0:j1] = p.to(out_dtype)
    return weights
