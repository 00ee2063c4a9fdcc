"""Hybrid: the exact local band plus a random-feature estimate of the rest (Scatterbrain).

Query i weighs the keys of its Local window ``band(i)`` (see :class:`LocalPattern`)
exactly and every other key with the FAVOR+ estimate ``φ(q_i)·φ(k_j) ≈ exp(s_ij)``
(:mod:`attnkit.ops.performer`), under one normaliser:

    out_i = [Σ_{j∈band(i)} exp(s_ij) v_j + Σ_{j∉band(i)} φ(q_i)·φ(k_j) v_j]
          / [Σ_{j∈band(i)} exp(s_ij)     + Σ_{j∉band(i)} φ(q_i)·φ(k_j)]        s_ij = q_i·k_j·scale

The far field is never formed pair by pair:

* bidirectional: ``φ(q_i)·Σ_all φ(k_j)[v_j, 1] − φ(q_i)·Σ_{j∈band(i)} φ(k_j)[v_j, 1]``: the
  feature state of all keys (one (F, Dv+1) state per head) minus the band's own share of
  it, so that no key is counted twice (Scatterbrain's rule: the sparse part replaces the
  low-rank estimate on its support).  Per block of C query rows the windows slide by
  one key per row: the keys common to the block's rows come out of the total state as
  per-block states (sums of C-key segments), the rest is two C-wide triangles of
  feature products (:func:`_far_field`).
* causal: the band is the previous W keys, the far field the keys ``j <= i − W``.  A
  running state absorbs keys as they leave the band: query block [i0, i0 + C) reads the
  state of keys < i0 − W + 1 and a C×C triangle over the next C keys, which it then
  absorbs (prefix sums in chunks, as Performer's causal path).  No subtraction here.

The band comes from :func:`local_band_stats` (exact softmax statistics per query), the
features and running key state from Performer's public pieces.  Cost
O(N·(W + C)·D + N·(C + D + Dv)·F): no N×S tensor, no N×F×D cumulative tensor.

Reference:
    Chen, Dao, Winsor, Song, Rudra, Ré, "Scatterbrain: Unifying Sparse and Low-rank
    Attention Approximation", NeurIPS 2021.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..core.capabilities import Capabilities, Method
from ..core.inputs import Shape
from ..core.reference import causal_keep
from ..core.registry import register
from .local import BandStats, Local, LocalPattern, choose_block, local_band_stats, local_mask
from .performer import (
    KeyState,
    PerformerState,
    _with_ones,
    block_rows,
    feature_logits,
    positive_features,
    projection_matrix,
    safe_denominator,
)
from .tiled import compute_dtype

__all__ = ["Hybrid", "naive_hybrid", "hybrid_attention"]

NEG_INF = float("-inf")


# -- the naive formula (the oracle) --------------------------------------------------


def naive_hybrid(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection: Tensor,
    *,
    scale: float,
    window: int,
    is_causal: bool = False,
    key_keep: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Materialised Hybrid in the inputs' dtype: the readable spec of the fast path.

    Args:
        q: (*b, Hq, N, D).  k: (*b, Hkv, S, D).  v: (*b, Hkv, S, Dv).
        projection: (F, D) random directions (:func:`projection_matrix`).
        scale: softmax scale.
        window: W, the band of :class:`LocalPattern` (bidirectional: W keys centred on
            i; causal: the previous W keys).
        key_keep: None or bool broadcastable to (*b, Hq, 1, S); False = padded key.

    Returns:
        out (*b, Hq, N, Dv) and the implied attention matrix (*b, Hq, N, S).

    Equivalent to::

        band = local_mask(N, S, W, is_causal=causal) & visible      # visible: key_keep, causal
        far = ~local_mask(N, S, W, is_causal=causal) & visible
        A = where(band, exp(q @ k.T * scale), 0) + where(far, φ(q) @ φ(k).T, 0)
        P = A / A.sum(-1, keepdim=True)                               # rows without keys: 0
        out = P @ v
    """
    g = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(g, dim=-3), v.repeat_interleave(g, dim=-3)  # (*b, Hq, S, D)
    n, s = q.shape[-2], k.shape[-2]
    w = projection.to(q.dtype)
    phi_q, shift_q = positive_features(q, w, scale, is_query=True)  # (*b, Hq, N, F), (*b, Hq, N, 1)
    kk = None if key_keep is None else key_keep.transpose(-1, -2)  # (*b, Hq|1, S, 1)
    phi_k, shift_k = positive_features(k, w, scale, is_query=False, keep=kk)  # (*b, Hq, S, F), (*b, Hq, 1, 1)
    visible = torch.ones(n, s, dtype=torch.bool, device=q.device)
    if is_causal:
        visible = causal_keep(0, n, 0, s, q.device)
    if key_keep is not None:
        visible = visible & key_keep  # (*b, Hq|1, N, S)
    in_band = local_mask(n, s, window, is_causal=is_causal, device=q.device) & visible
    far = visible & ~in_band
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~in_band, NEG_INF)  # (*b, Hq, N, S)
    # φ(q_i)·φ(k_j) estimates exp(s_ij − shift_q_i − shift_k) and is at most 1; one
    # reference per row (detached, it cancels) keeps both terms <= 1.
    log_far = shift_q + shift_k  # (*b, Hq, N, 1)
    ref = torch.maximum(scores.detach().amax(dim=-1, keepdim=True), log_far)
    a = torch.exp(scores - ref) + torch.where(far, phi_q @ phi_k.transpose(-1, -2), 0.0) * torch.exp(log_far - ref)
    p = a / safe_denominator(a.sum(dim=-1, keepdim=True))
    return p @ v, p


# -- the fast path -------------------------------------------------------------------


def _keys_lead(k: Tensor, keep: Tensor | None) -> tuple[int, ...]:
    return tuple(torch.broadcast_shapes(k.shape[:-2], keep.shape[:-2]) if keep is not None else k.shape[:-2])


def _strict_lower(rows: int, cols: int, diag: int, device: torch.device) -> Tensor:
    """Bool (rows, cols): True where column c < r + diag (c - r < diag)."""
    return torch.arange(cols, device=device)[None, :] - torch.arange(rows, device=device)[:, None] < diag


def _interior_blocks(p: LocalPattern, block: int, r0: int, r1: int) -> tuple[int, int]:
    """The blocks [first, stop) of rows [r0, r1) (r0 a multiple of ``block``) that are
    whole (b·C + C <= N) and whose windows are unclamped (b·C − W//2 >= 0, and the last
    row's window ends at most at S: b·C − W//2 + C − 1 + W <= S).  Bidirectional."""
    off = p.window // 2
    b0, b1 = r0 // block, -(-r1 // block)
    first = min(max(-(-off // block), b0), b1)
    stop = min(max(min(p.n // block, (p.s - p.window - block + 1 + off) // block + 1), first), b1)
    return first, stop


def _far_flops(p: LocalPattern, block: int, rows: int, f: int, dv: int) -> tuple[float, float]:
    """Product FLOPs of :func:`_far_field` over all N rows taken ``rows`` at a time (2 per
    multiply-add), mirroring its plan block for block: (per query head, per kv head --
    the key segments' states)."""
    m, rem = divmod(p.window, block)
    dv1, per_q, per_kv = dv + 1, 0.0, 0.0
    for r0 in range(0, p.n, rows):
        r1 = min(p.n, r0 + rows)
        first, stop = _interior_blocks(p, block, r0, r1)
        u0, u1 = min(first * block, r1), min(stop * block, r1)
        for i0 in [*range(r0, u0, block), *range(u1, r1, block)]:  # end blocks: readout + band tile
            i1 = min(i0 + block, r1)
            per_q += 2.0 * (i1 - i0) * (f * dv1 + (p.end(i1 - 1) - p.start(i0)) * (f + dv1))
        if u1 > u0:
            nb = stop - first
            per_q += 2.0 * nb * block * (f * dv1 + (2 * block + rem - 1) * (f + dv1))
            per_kv += 2.0 * (nb + m - 1) * block * f * dv1 if m else 0.0
    return per_q, per_kv


def _far_field(
    phi_q: Tensor, keys: KeyState, phi_k: Tensor, v1: Tensor, p: LocalPattern, block: int, r0: int = 0
) -> Tensor:
    """Σ_{j∉band(i)} φ(q_i)·φ(k_j) [v_j, 1] of the query rows [r0, r0 + L) that ``phi_q``
    (…, L, F) holds (r0 a multiple of ``block``): the state of all keys minus the band's
    own share, (…, L, Dv+1).  Bidirectional pattern.

    Interior blocks (windows not clamped at the sequence ends) use the sliding structure:
    row r of a block of C rows starting at key a = i0 − W//2 has the band [a + r, a + r + W)
    = [a, a + mC) + [a + mC, a + r + W) − [a, a + r), W = mC + rem.  The first part is the
    same for every row of the block, a sum of m key segments' states (F, Dv+1), so it is
    taken out of the total state before one readout per row; the other two are a C×(C+rem−1)
    and a C×C triangle of feature products.  Per row that is one F·(Dv+1) readout plus
    ~2C·(F + Dv + 1) instead of (W + C)·(F + Dv + 1) for the whole band tile.  Memory: a
    (Dv+1, F) state per block, N·F·(Dv+1)/C per head, as the causal path.

    The few end blocks take the band tile directly (Local's block plan: at most W + C − 1
    keys, masked to each row's window) and subtract it from the total.
    """
    w, off = p.window, p.window // 2
    m, rem = divmod(w, block)
    r1 = r0 + phi_q.shape[-2]
    first, stop = _interior_blocks(p, block, r0, r1)
    u0, u1 = min(first * block, r1), min(stop * block, r1)  # no interior block: u0 = u1
    head, mid, tail = phi_q.split([u0 - r0, u1 - u0, r1 - u1], dim=-2)  # split, not slices: see Local
    outs = []

    def one(qb: Tensor, i0: int) -> Tensor:
        i1 = i0 + qb.shape[-2]
        lo, hi = p.start(i0), p.end(i1 - 1)
        keep = p.keep(torch.arange(i0, i1, device=qb.device), torch.arange(lo, hi, device=qb.device))
        a = torch.matmul(qb, phi_k[..., lo:hi, :].transpose(-1, -2)).masked_fill_(~keep, 0.0)  # (…, C, L)
        return keys.read(qb) - torch.matmul(a, v1[..., lo:hi, :])  # (…, C, Dv+1)

    outs.extend(one(qb, i0) for qb, i0 in zip(head.split(block, dim=-2), range(r0, u0, block)))
    if u1 > u0:
        nb, a0 = stop - first, u0 - off  # blocks, and the first block's window start
        qc = mid.unflatten(-2, (nb, block))  # (…, nb, C, F)
        state_t = keys.state_t.unsqueeze(-3)  # (…, 1, Dv+1, F)
        if m:
            # Key segments [a0 + t·C, a0 + t·C + C), t < nb + m − 1; block b sums m of them.
            seg = (nb + m - 1) * block
            ks = phi_k[..., a0 : a0 + seg, :].unflatten(-2, (nb + m - 1, block))  # (…, nb+m−1, C, F)
            vs = v1[..., a0 : a0 + seg, :].unflatten(-2, (nb + m - 1, block))  # (…, nb+m−1, C, Dv+1)
            g_t = torch.matmul(vs.transpose(-1, -2), ks)  # (…, nb+m−1, Dv+1, F)
            state_t = state_t - (g_t.unfold(-3, m, 1).sum(dim=-1) if m > 1 else g_t)  # (…, nb, Dv+1, F)
            k_left, v_left = ks[..., :nb, :, :], vs[..., :nb, :, :]
        else:
            k_left = phi_k[..., a0 : a0 + nb * block, :].unflatten(-2, (nb, block))
            v_left = v1[..., a0 : a0 + nb * block, :].unflatten(-2, (nb, block))
        far = torch.matmul(qc, state_t.transpose(-1, -2))  # (…, nb, C, Dv+1)
        # [a, a + r): the strictly lower triangle of the block's first C keys, added back.
        left = torch.matmul(qc, k_left.transpose(-1, -2)).masked_fill_(~_strict_lower(block, block, 0, qc.device), 0.0)
        far = far + torch.matmul(left, v_left)
        width = block + rem - 1  # [a + mC, a + r + W): columns c < rem + r, removed
        if width:
            lo = a0 + m * block
            span = (nb - 1) * block + width
            kw = phi_k[..., lo : lo + span, :].unfold(-2, width, block)  # (…, nb, F, width): a view
            vw = v1[..., lo : lo + span, :].unfold(-2, width, block).transpose(-1, -2)  # (…, nb, width, Dv+1)
            right = torch.matmul(qc, kw).masked_fill_(~_strict_lower(block, width, rem, qc.device), 0.0)
            far = far - torch.matmul(right, vw)
        outs.append(far.flatten(-3, -2))  # (…, nb·C, Dv+1)
    outs.extend(one(qb, i0) for qb, i0 in zip(tail.split(block, dim=-2), range(u1, r1, block)))
    return torch.cat(outs, dim=-2) if len(outs) > 1 else outs[0]


def _key_features(
    k: Tensor, v: Tensor, w: Tensor, scale: float, keep: Tensor | None
) -> tuple[KeyState, Tensor, Tensor]:
    """All keys absorbed into one :class:`KeyState`, and φ(K) (…, S, F), [V, 1] (…, S, Dv+1).

    Under autograd, computed a cache-sized block of keys at a time (as Performer's
    bidirectional path): the running shift grows from block to block, and the stored
    features of earlier blocks are then brought to the final shift (× exp(m_block −
    m_final) <= 1), so that the band share uses exactly the features the state summed.
    """
    f, dv = w.shape[0], v.shape[-1]
    lead = _keys_lead(k, keep)
    keys = KeyState(k, lead, f, dv + 1)
    step = block_rows(math.prod(lead), f)
    v1 = _with_ones(v)  # (…, S, Dv+1)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (k, v, w))):
        # No autograd: all logits in one GEMM, the final shift known up front, then the
        # exp and the state a cache-sized block at a time, in place -- φ(K) is the logits'
        # own buffer (no concatenation, no second pass to a later shift).
        phi_k = feature_logits(k, w, scale, keep)  # (…, S, F)
        keys.m = phi_k.amax(dim=(-2, -1), keepdim=True) if phi_k.shape[-2] else keys.m
        for kb, v1b in zip(phi_k.split(step, dim=-2), v1.split(step, dim=-2)):
            keys.absorb(keys.features(kb, inplace=True), v1b)
        return keys, phi_k, v1
    k_blocks = k.split(step, dim=-2)
    keep_blocks = keep.split(step, dim=-2) if keep is not None and keep.shape[-2] > 1 else [keep] * len(k_blocks)
    phis, shifts = [], []
    for kb, v1b, keepb in zip(k_blocks, v1.split(step, dim=-2), keep_blocks):
        phi = keys.features(feature_logits(kb, w, scale, keepb), inplace=True)  # (…, Bk, F)
        keys.absorb(phi, v1b)
        phis.append(phi)
        shifts.append(keys.m)
    m_safe = torch.where(keys.m == NEG_INF, 0.0, keys.m)
    for i, m in enumerate(shifts[:-1]):
        factor = torch.exp(torch.where(m == NEG_INF, 0.0, m) - m_safe)  # (…, 1, 1)
        phis[i] = phis[i].mul_(factor) if not phis[i].requires_grad else phis[i] * factor
    return keys, torch.cat(phis, dim=-2) if len(phis) > 1 else phis[0], v1


def _bidirectional(
    q: Tensor, k: Tensor, v: Tensor, w: Tensor, scale: float, keep: Tensor | None, p: LocalPattern, block: int,
    band: BandStats,
) -> Tensor:
    """Bidirectional Hybrid output from the band's statistics: far field = (all keys'
    state) − (the band's share), combined with the band a cache-sized chunk of query rows
    at a time (features, readout, share and normalisation stay in cache).

    Args as :func:`hybrid_attention` prepares them: q (*b, Hkv, G, N, D), k (*b, Hkv, 1, S, D),
    v (*b, Hkv, 1, S, Dv), keep None or (*b', Hkv|1, G|1, S|1, 1), in the compute dtype.

    Returns:
        (*b, Hkv, G, N, Dv).
    """
    keys, phi_k, v1 = _key_features(k, v, w, scale, keep)
    shift_k = torch.where(keys.m == NEG_INF, 0.0, keys.m)  # (…, 1, 1)
    n = q.shape[-2]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, w))
    # Under autograd one chunk: each chunk slices φ(K), and a slice costs a φ(K)-sized zero tensor in the backward.
    rows = n if grad else max(block, block_rows(math.prod(q.shape[:-2]), w.shape[0], multiple=block))
    sizes = [min(rows, n - r) for r in range(0, n, rows)]
    chunks = zip(
        q.split(sizes, dim=-2), band.m.split(sizes, dim=-1), band.l.split(sizes, dim=-1), band.acc.split(sizes, dim=-2)
    )
    outs = []
    for r0, (qc, m, l, acc) in zip(range(0, n, rows), chunks):
        phi_q, shift_q = positive_features(qc, w, scale, is_query=True)  # (…, R, F), (…, R, 1)
        far = _far_field(phi_q, keys, phi_k, v1, p, block, r0)  # (…, R, Dv+1)
        outs.append(_combine(BandStats(m, l, acc), far, shift_q + shift_k))
    return torch.cat(outs, dim=-2) if len(outs) > 1 else outs[0]


def causal_rows(window: int, block: int, lead: int, features: int) -> int:
    """Causal: query rows per step, a whole number of blocks, at most W (so that a step's
    keys all precede its first row, see :func:`_causal`) and cache-sized."""
    return block * max(1, min(window, block_rows(lead, features)) // block)


def _causal(
    q: Tensor, k: Tensor, v: Tensor, w: Tensor, scale: float, keep: Tensor | None, window: int, block: int,
    band: BandStats,
) -> Tensor:
    """Causal Hybrid output from the band's statistics; the far field of query i is the
    keys j <= i − W, summed by a running state.

    Block b (rows [b·C, b·C + C)) reads the state of keys < b·C − W + 1, plus the strictly
    lower C×C triangle (j <= i − W) over the next C keys [b·C − W + 1, b·C + C − W + 1),
    which then join the state: keys enter it as they leave every later row's band.
    A step of R = a few blocks (R <= W) runs batched: its keys' features at one running
    shift (:class:`KeyState`), their per-block sums G_b, the state before each block as
    the state so far plus an exclusive prefix sum of the G_b, then one batched readout
    and one batched triangle.  The step's keys are all <= its first row when R <= W, so
    the running shift never looks ahead: outputs up to i do not depend on later keys,
    not even by rounding (with C > W, a block's first rows share the shift with up to
    C − W later keys, which cancels up to rounding).  Keys before 0 or past S are zeros.

    Args as :func:`_bidirectional`.  Memory under autograd: one (Dv+1, F) state per block,
    N·F·(Dv+1)/C per head, as Performer's causal chunks; never N×F×D.
    """
    n, s, f, dv = q.shape[-2], k.shape[-2], w.shape[0], v.shape[-1]
    lead_k = _keys_lead(k, keep)
    keys = KeyState(q, lead_k, f, dv + 1)
    step = causal_rows(window, block, math.prod(q.shape[:-2]), f)
    rows = [min(step, n - i0) for i0 in range(0, n, step)]
    # Step t covers the (virtual) keys [i0 − W + 1, i0 + C·nb − W + 1); the real ones tile [0, S).
    spans = []
    for i0, r in zip(range(0, n, step), rows):
        a = i0 - window + 1
        spans.append((a, a + block * -(-r // block)))
    real = [(min(max(a, 0), s), min(max(b, 0), s)) for a, b in spans]
    sizes = [hi - lo for lo, hi in real] + [s - real[-1][1]]
    k_steps, v_steps = k.split(sizes, dim=-2), v.split(sizes, dim=-2)
    keep_steps = keep.split(sizes, dim=-2) if keep is not None and keep.shape[-2] > 1 else [keep] * len(sizes)
    strict_upper = torch.ones(block, block, dtype=torch.bool, device=q.device).triu()  # c >= r: not far
    chunks = zip(
        q.split(rows, dim=-2), band.m.split(rows, dim=-1), band.l.split(rows, dim=-1), band.acc.split(rows, dim=-2)
    )
    outs = []
    for t, (qc, m, l, acc) in enumerate(chunks):
        (a, b), (lo, hi), r = spans[t], real[t], rows[t]
        nb = (b - a) // block
        if hi > lo:
            kf = keys.features(feature_logits(k_steps[t], w, scale, keep_steps[t]), inplace=True)  # (…, L, F)
            v1 = _with_ones(v_steps[t])  # (…, L, Dv+1)
            pad = (0, 0, lo - a, b - hi)
        else:
            kf, v1 = q.new_zeros((*lead_k, 0, f)), v.new_zeros((*v.shape[:-2], 0, dv + 1))
            pad = (0, 0, b - a, 0)
        if pad[2] or pad[3]:  # virtual keys before 0 or past S: zero features
            kf, v1 = torch.nn.functional.pad(kf, pad), torch.nn.functional.pad(v1, pad)
        kb, vb = kf.unflatten(-2, (nb, block)), v1.unflatten(-2, (nb, block))  # (…, nb, C, F), (…, nb, C, Dv+1)
        g_t = torch.matmul(vb.transpose(-1, -2), kb)  # (…, nb, Dv+1, F): each block's key sums
        before = torch.cat([torch.zeros_like(g_t[..., :1, :, :]), g_t[..., :-1, :, :].cumsum(dim=-3)], dim=-3)
        states_t = keys.state_t.unsqueeze(-3) + before  # (…, nb, Dv+1, F): the state each block reads
        keys.state_t = keys.state_t + g_t.sum(dim=-3)
        phi_q, shift_q = positive_features(qc, w, scale, is_query=True)  # (…, G, R, F), (…, G, R, 1)
        if nb * block != r:  # the last step's partial block: zero query rows
            phi_q = torch.nn.functional.pad(phi_q, (0, 0, 0, nb * block - r))
        qb = phi_q.unflatten(-2, (nb, block))  # (…, G, nb, C, F)
        tri = torch.matmul(qb, kb.transpose(-1, -2)).masked_fill_(strict_upper, 0.0)  # (…, nb, C, C)
        far = torch.matmul(qb, states_t.transpose(-1, -2)) + torch.matmul(tri, vb)  # (…, nb, C, Dv+1)
        far = far.flatten(-3, -2)[..., :r, :] if nb * block != r else far.flatten(-3, -2)
        outs.append(_combine(BandStats(m, l, acc), far, shift_q + torch.where(keys.m == NEG_INF, 0.0, keys.m)))
    return torch.cat(outs, dim=-2) if len(outs) > 1 else outs[0]


def _combine(band: BandStats, far: Tensor, log_scale: Tensor) -> Tensor:
    """(band exact + far estimate) / (their normaliser): (…, N, Dv).

    The band's sums are exp(m)·[acc, l] (``m`` its row max, ``l`` = 1 in value), the far
    field's exp(log_scale)·far.  Either may lie far outside fp32's range on its own
    (|q·k|·scale up to ~90 is fine in exp(s − m) but not in exp(s)), so both are put on
    one reference per row, ``r = max(m, log_scale + log far_den)``, the log of the larger
    of the two masses: after it every weight is <= 1 and the larger mass is 1, so the
    normaliser is >= 1 (no overflow, no underflow of the dominant part) and the
    smaller part underflows only where it is below fp32's resolution of the sum anyway.
    ``r`` is detached: a factor common to numerator and normaliser cancels.

    Guard: the far normaliser Σ_{j∉band} φ(q)·φ(k) is >= 0 by construction (positive
    features), but the bidirectional path gets it as total − band share, and where the
    band holds nearly all of a row's feature mass the difference is rounding noise of
    either sign.  Such rows (far_den <= 0) are given no far field, numerator included
    (it is noise of the same size): the estimate is clamped at 0, as Scatterbrain clamps
    its approximate normaliser.  Rows with neither part (all keys padded) give 0.
    """
    dv = far.shape[-1] - 1
    far_den = far[..., dv:]  # (…, N, 1)
    ok = far_den.detach() > 0
    l = band.l[..., None]  # (…, N, 1)
    log_band = torch.where(l.detach() > 0, band.m[..., None], NEG_INF)
    log_far = torch.where(ok, log_scale + torch.log(torch.where(ok, far_den.detach(), 1.0)), NEG_INF)
    ref = torch.maximum(log_band, log_far)
    ref = torch.where(ref == NEG_INF, 0.0, ref)  # a row without keys: any finite reference
    w_band = torch.exp(log_band - ref)  # 0 where the band is empty (never inf·0)
    w_far = torch.exp(torch.where(ok, log_scale, NEG_INF) - ref)  # 0 where the far field is dropped
    num = torch.addcmul(w_band * band.acc, w_far, far[..., :dv])  # (…, N, Dv)
    den = w_band * l + w_far * far_den
    return num / safe_denominator(den)


def hybrid_attention(
    q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, projection: Tensor | None, scale: float,
    window: int, is_causal: bool, block: int,
) -> Tensor:
    """Hybrid attention on grouped inputs (:meth:`AttentionInputs.grouped`), any float dtype.

    Args:
        q: (*b, Hkv, G, N, D).  k: (*b, Hkv, 1, S, D).  v: (*b, Hkv, 1, S, Dv).
        keep: None or the grouped key-padding view (*b', Hkv|1, G|1, 1, S), True = attend.
        projection: (F, D) random directions; None when the band covers every key.
        block: query rows per block (band and far field alike).

    Returns:
        (*b, Hkv, G, N, Dv) in the compute dtype (fp32, fp64 for fp64 inputs).
    """
    acc = compute_dtype(q.dtype)
    n, s = q.shape[-2], k.shape[-2]
    pattern = LocalPattern(n, s, window, causal=is_causal)
    band = local_band_stats(q, k, v, keep, pattern, scale, block)
    if projection is None or window >= (n if is_causal else s) or n == 0:  # the band holds every key: exact
        return band.acc / torch.where(band.l == 0, 1.0, band.l)[..., None]
    q, k, v, w = q.to(acc), k.to(acc), v.to(acc), projection.to(device=q.device, dtype=acc)
    keep_t = None if keep is None else keep.transpose(-1, -2)  # (*b', Hkv|1, G|1, S|1, 1)
    if is_causal:
        return _causal(q, k, v, w, scale, keep_t, window, block, band)
    return _bidirectional(q, k, v, w, scale, keep_t, pattern, block, band)


# -- the method ----------------------------------------------------------------------


@register
@dataclass(frozen=True)
class Hybrid(Method):
    """Exact sliding-window band + FAVOR+ estimate of the keys outside it (Scatterbrain).

    Query i attends the keys of its Local window exactly (bidirectional: the W keys
    centred on i, sliding inwards at the ends; causal: the previous W keys) and every
    other visible key through positive random features, under one normaliser; the
    band's own random-feature share is removed from the estimate so that no key is
    counted twice.  See the module docstring for the two far-field paths.

    Equivalent to::

        band = local_mask(N, S, W, is_causal=causal)
        A = where(band, exp(q @ k.T * scale), φ(q) @ φ(k).T)    # 0 where masked / future
        out = (A @ v) / A.sum(-1, keepdim=True)

    A window W >= S (causal: >= N) is exact attention.  Key-padding masks (bool, or
    float 0/-inf), causal, GQA, any leading batch dims; no dropout; no weights returned
    (use :meth:`implied_weights` for analysis).

    Args:
        window: W >= 1, keys per query in the exact band.
        features: F >= 1, random features of the far-field estimate.
        orthogonal: orthogonal random blocks (lower variance) instead of iid rows.
        redraw: in a module in training mode, draw new features every ``redraw`` forward
            calls (0 = never), as :class:`PerformerState`; eval keeps them fixed.
        seed: seed of the random projection (functional calls use draw 0 of it).
        block: query rows per block (None: 64, down to 16 for windows under 64).  Causal
            with block <= W (the default for W >= 16) is leak-free bitwise; a larger
            block lets a block's first rows share a feature shift with up to
            block − W later keys, which cancels up to rounding.

    Reference:
        Chen et al., "Scatterbrain: Unifying Sparse and Low-rank Attention
        Approximation", NeurIPS 2021.
    """

    window: int = 256
    features: int = 128
    orthogonal: bool = True
    redraw: int = 0
    seed: int = 0
    block: int | None = None

    name: ClassVar[str] = "hybrid"
    capabilities: ClassVar[Capabilities] = Capabilities(
        exact=False, full_masks=False, dropout=False, double_backward=True, returns_weights=False
    )

    def __post_init__(self):
        for field, low in (("window", 1), ("features", 1), ("redraw", 0)):
            self.check_int(field, low)
        self.check_int("block", 1, optional=True)
        self.check_choice("orthogonal", (True, False))
        self.check_int("seed", None)

    def block_size(self) -> int:
        return choose_block(self.window, self.block)

    def _projection(self, d: int, state: PerformerState | None) -> Tensor:
        if state is None:
            return projection_matrix(self.features, d, self.orthogonal, self.seed, 0)
        if tuple(state.projection.shape) != (self.features, d):
            raise ValueError(
                f"Hybrid: the module's projection has shape {tuple(state.projection.shape)} but this call "
                f"needs (features, head dim) = ({self.features}, {d}); build the state with "
                f"make_state(num_heads, head_dim={d}) from this config."
            )
        return state.projection_for_call()

    def forward(self, inp, *, need_weights=False, average_weights=False, state=None):
        # The projection first: drawing it is a graph break under torch.compile (a
        # torch.Generator cannot be made in a compiled region); before any tensor op,
        # the computation stays one graph.  A module's schedule advances on every call.
        far_needed = inp.n > 0 and self.window < (inp.n if inp.is_causal else inp.s)
        w = self._projection(inp.d, state) if far_needed or state is not None else None
        q, k, v, _ = inp.grouped()  # (*b, Hkv, G, N, D), (*b, Hkv, 1, S, D), (*b, Hkv, 1, S, Dv)
        out = hybrid_attention(q, k, v, inp.key_keep(), w, inp.scale, self.window, inp.is_causal, self.block_size())
        return inp.ungroup(out).to(inp.dtype), None

    def flops(self, shape: Shape) -> float:
        """Forward FLOPs of the products that run (2 per multiply-add):

        * band (exact): :meth:`Local.flops`, 2·(D + Dv) per (query, key) pair of the
          block tiles, about 2·N·(W + C)·(D + Dv) per query head (~4·N·W·D);
        * features, 2·(N + S)·F·D, and the (F, Dv+1) key state, 2·S·F·(Dv+1);
        * bidirectional far field (:func:`_far_field`, counted block for block): per
          interior row one readout 2·F·(Dv+1) and two triangles 2·(2C + W mod C − 1)·(F + Dv + 1),
          plus the key segments' states 2·F·(Dv+1) per key; end blocks take their band
          tile, 2·(W + C)·(F + Dv + 1) per row.  About 2·N·F·(2D + 2(Dv+1) + 2C) in all;
        * causal: the C×C triangles, 2·C·C·(F + Dv + 1) per query block, and the state
          and readout per block of C rows (the last block zero-padded).

        With W >= S (causal: >= N) only the band runs.
        """
        band = Local(window=self.window, block=self.block_size()).flops(shape)
        if self.window >= (shape.n if shape.is_causal else shape.s):
            return band
        c, f, d, dv1 = self.block_size(), self.features, shape.d, shape.dv + 1
        if not shape.is_causal:
            rows = max(c, block_rows(shape.batch * shape.hq, f, multiple=c))  # as _bidirectional, no autograd
            far_q, far_kv = _far_flops(LocalPattern(shape.n, shape.s, self.window), c, rows, f, shape.dv)
            per_q_head = 2.0 * shape.n * f * d + far_q
            per_kv_head = 2.0 * shape.s * f * d + 2.0 * shape.s * f * dv1 + far_kv
            return band + shape.batch * (shape.hq * per_q_head + shape.hkv * per_kv_head)
        rows = -(-shape.n // c) * c  # whole blocks (the last one zero-padded)
        far_keys = min(shape.s, max(0, rows - self.window + 1))
        per_q_head = 2.0 * shape.n * f * d + 2.0 * rows * f * dv1 + 2.0 * rows * c * (f + dv1)
        per_kv_head = 2.0 * far_keys * f * d + 2.0 * rows * f * dv1
        return band + shape.batch * (shape.hq * per_q_head + shape.hkv * per_kv_head)

    def implied_weights(self, inp, state=None):
        """The normalised matrix of :func:`naive_hybrid` in float64: (*b, Hq, N, S)."""
        w = state.projection if state is not None else projection_matrix(self.features, inp.d, self.orthogonal, self.seed)
        keep = inp.key_keep()
        keep = None if keep is None else keep.flatten(-4, -3)  # (*b', Hq|1, 1, S)
        _, p = naive_hybrid(
            inp.q.double(), inp.k.double(), inp.v.double(), w.double(), scale=inp.scale, window=self.window,
            is_causal=inp.is_causal, key_keep=keep,
        )
        return p

    def make_state(self, num_heads: int, head_dim: int) -> PerformerState:
        return PerformerState(self.features, head_dim, self.orthogonal, self.seed, self.redraw)
