"""Nyströmformer: softmax attention through m landmarks and an iterative pseudo-inverse.

Landmarks are segment means: Q~ (m, D) of the queries (m contiguous segments of the N
queries) and K~ (m, D) of the kept keys (m contiguous segments of the kept keys, the rule
of :func:`attnkit.ops.lowrank.segment_index`).  With three small softmax kernels::

    F = softmax(Q  K~^T · scale)      (N, m)
    A = softmax(Q~ K~^T · scale)      (m, m)
    B = softmax(Q~ K^T  · scale)      (m, S)    padding keys masked out
    out = F · pinv(A) · (B V)         cost O(N·m·D + S·m·D + iters·m^3)

``pinv(A)`` is the paper's iteration (in fp32, fp64 for fp64 inputs), from
Z_0 = A^T / (|A|_1 |A|_inf) (max column sum times max row sum, per matrix)::

    Z_{j+1} = 1/4 · Z_j (13 I - A Z_j (15 I - A Z_j (7 I - A Z_j)))

Both products with F and B run through torch's fused SDPA kernel (F·W is SDPA of Q
against K~ with values W = pinv(A)·(B V)), so no (N, m) tensor is held either.

Masks: key padding only.  Padding keys are left out of the key landmarks and get zero
weight in B; a landmark segment with no kept key is masked out of F and A; a batch row
with no kept key gives 0.  The depthwise convolution skip on V of the paper is left
out: it is a separate learned layer, not part of the attention approximation.

All keys or all queries as landmarks (m >= S or m >= N): then A = B or A = F, and
F A^+ B = softmax(Q K^T) exactly (P P^+ P = P), so the method computes exact attention
in closed form instead of through the iteration, which at 6 steps has not converged on
such a large, ill-conditioned A: measured at N = S = m = 256 on structured inputs
(condition number 6e5 to 3e6, fp64), the iterated formula is off exact attention by a
relative 1.7e-2 to 2.1e-2 after 6 steps, 7e-4 after 10, 2e-7 after 20.

Reference:
    Xiong et al., "Nyströmformer: A Nyström-Based Algorithm for Approximating
    Self-Attention", AAAI 2021.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..core.capabilities import Capabilities, Method
from ..core.inputs import AttentionInputs, Shape
from ..core.reference import safe_softmax
from ..core.registry import register
from .lowrank import grouped_sdpa, key_keep, segment_mean_matrix, segment_means
from .tiled import compute_dtype

__all__ = ["Nystrom", "naive_nystrom", "newton_schulz_pinv"]

NEG_INF = float("-inf")


def newton_schulz_pinv(a: Tensor, iters: int) -> Tensor:
    """The Nyströmformer iterative Moore-Penrose pseudo-inverse of a (..., m, m').

    Computed in a's dtype (callers pass fp32 or fp64).  An all-zero matrix gives zeros.

    Equivalent to (converged)::

        torch.linalg.pinv(a)
    """
    *lead, m, m2 = a.shape
    a = a.reshape(-1, m, m2)  # (B*, m, m'): the loop runs on fused batched products
    absa = a.abs()
    norm_1 = absa.sum(-2).amax(-1)  # (B*,): max column sum
    norm_inf = absa.sum(-1).amax(-1)  # (B*,): max row sum
    denom = norm_1 * norm_inf
    alpha = torch.where(denom > 0, 1.0 / denom.clamp(min=1e-30), 0.0)
    z = a.transpose(-1, -2) * alpha[:, None, None]  # (B*, m', m)
    eye = torch.eye(m, dtype=a.dtype, device=a.device)  # (m, m)
    eye_7, eye_15, eye_13_4 = 7 * eye, 15 * eye, 3.25 * eye
    for _ in range(iters):
        x = torch.bmm(a, z)  # A Z: (B*, m, m)
        t = eye_7 - x
        t = torch.baddbmm(eye_15, x, t, alpha=-1)  # 15 I - X (7 I - X)
        t = torch.baddbmm(eye_13_4, x, t, alpha=-0.25)  # (13 I - X (...)) / 4
        z = torch.bmm(z, t)
    z = z.reshape(*lead, m2, m)
    return z


def _landmark_keep(count: Tensor) -> Tensor:
    """Which key landmarks exist (..., m): non-empty, or all of them in a row without keys."""
    return (count > 0) | ~(count > 0).any(-1, keepdim=True)


def _has_keys(keep: Tensor | None) -> Tensor | None:
    """(*b', Hkv|1, G|1, 1, 1): 1 where a batch row has at least one kept key."""
    return None if keep is None else keep.any(-1)[..., None, None]


def _exact_rows(keep: Tensor | None) -> Tensor | None:
    """The key mask with rows that keep no key opened up (their output is zeroed later)."""
    return None if keep is None else keep | ~keep.any(-1, keepdim=True)


def naive_nystrom(
    q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, landmarks: int, iters: int, scale: float
) -> tuple[Tensor, Tensor]:
    """The Nyström formula, materialised with explicit segment-mean matrices: the oracle.

    Args:
        q: (*b, Hkv, G, N, D); k: (*b, Hkv, 1, S, D); v: (*b, Hkv, 1, S, Dv).
        keep: (*b', Hkv|1, G|1, S) bool (True = kept) or None.

    Returns:
        out (*b, Hkv, G, N, Dv) and the implied weights W = F pinv(A) B (*b, Hkv, G, N, S).

    Equivalent to::

        qt, kt = Mq @ q, Mk @ k                 # segment-mean matrices (m, N), (m, S)
        F = softmax(q @ kt.T * scale); A = softmax(qt @ kt.T * scale)
        B = softmax(qt @ k.T * scale)           # padding masked
        W = F @ pinv(A) @ B; out = W @ v
    """
    n, s = q.shape[-2], k.shape[-2]
    if keep is not None:
        k, v = torch.where(keep[..., None], k, 0.0), torch.where(keep[..., None], v, 0.0)
    if landmarks >= min(n, s):  # F A^+ B = P exactly: see the module docstring
        scores = q @ k.transpose(-1, -2) * scale  # (*b, Hkv, G, N, S)
        if keep is not None:
            scores = scores.masked_fill(~keep[..., None, :], NEG_INF)
        w = safe_softmax(scores)
        return w @ v, w
    mq = segment_mean_matrix(None, n, landmarks, q.dtype, q.device)  # (m, N)
    mk = segment_mean_matrix(keep, s, landmarks, q.dtype, q.device)  # (m, S) or (..., m, S)
    qt, kt = mq @ q, mk @ k  # (*b, Hkv, G, m, D), (*b, Hkv, G|1, m, D)
    lm_keep = _landmark_keep((mk > 0).sum(-1))  # (m,) or (..., m)
    f = safe_softmax((q @ kt.transpose(-1, -2) * scale).masked_fill(~lm_keep[..., None, :], NEG_INF))
    a = safe_softmax((qt @ kt.transpose(-1, -2) * scale).masked_fill(~lm_keep[..., None, :], NEG_INF))
    b_scores = qt @ k.transpose(-1, -2) * scale  # (*b, Hkv, G, m, S)
    if keep is not None:
        b_scores = b_scores.masked_fill(~keep[..., None, :], NEG_INF)
    w = f @ newton_schulz_pinv(a, iters) @ safe_softmax(b_scores)  # (*b, Hkv, G, N, S)
    return w @ v, w


@register
@dataclass(frozen=True)
class Nystrom(Method):
    """Nyströmformer attention with segment-mean landmarks; see the module docstring.

    Args:
        landmarks: m, the number of query and key landmarks (>= 1); m >= min(N, S)
            gives exact attention.
        iters: steps of the iterative pseudo-inverse (>= 1; the paper uses 6).

    Example::

        out = attnkit.attention(q, k, v, key_padding, method="nystrom:landmarks=128")
    """

    landmarks: int = 64
    iters: int = 6

    name: ClassVar[str] = "nystrom"
    capabilities: ClassVar[Capabilities] = Capabilities(
        exact=False,
        causal=False,
        causal_note="every Nyström landmark averages queries and keys over the whole sequence",
        full_masks=False,
        causal_with_mask=False,
        dropout=False,
        gqa=True,
        double_backward=False,
        deterministic=True,
    )

    def __post_init__(self):
        self.check_int("landmarks", 1, hint=" (e.g. 64)")
        self.check_int("iters", 1, hint=" (the paper uses 6)")

    def forward(self, inp, *, need_weights=False, average_weights=False, state=None):
        ct = compute_dtype(inp.dtype)
        q, k, v, _ = inp.grouped()
        q, k, v = q.to(ct), k.to(ct), v.to(ct)  # (*b, Hkv, G, N, D), (*b, Hkv, 1, S, D), (*b, Hkv, 1, S, Dv)
        keep = key_keep(inp)  # (*b', Hkv|1, G|1, S) or None
        has_keys = _has_keys(keep)
        if keep is not None:  # a padded slot may hold inf/NaN: keep it out of every product
            k = torch.where(keep[..., None], k, 0.0)  # (*b, Hkv, G|1, S, D)
            v = torch.where(keep[..., None], v, 0.0)  # (*b, Hkv, G|1, S, Dv)
        m = self.landmarks
        if m >= min(inp.n, inp.s):
            out = grouped_sdpa(q, k, v, _exact_rows(keep), inp.scale)  # exact: F A^+ B = P
        else:
            qt, _ = segment_means(q, None, m)  # (*b, Hkv, G, m, D)
            kt, count = segment_means(k, keep, m)  # (*b, Hkv, G|1, m, D)
            lm_bias = None  # -inf for landmarks without keys
            a = qt @ kt.transpose(-1, -2) * inp.scale  # (*b, Hkv, G, m, m)
            if keep is not None:
                lm_bias = torch.where(_landmark_keep(count), 0.0, NEG_INF).to(ct)  # (*b', Hkv|1, G|1, m)
                a = a + lm_bias[..., None, :]
            a = safe_softmax(a) if keep is not None else torch.softmax(a, dim=-1)
            bv = grouped_sdpa(qt, k, v, _exact_rows(keep), inp.scale)  # B V: (*b, Hkv, G, m, Dv)
            w = newton_schulz_pinv(a, self.iters) @ bv  # (*b, Hkv, G, m, Dv)
            # F·W: queries against the key landmarks, with W as the values; W differs per
            # query head, so the landmarks are given per query head.
            out = grouped_sdpa(q, kt.expand(*w.shape[:-2], *kt.shape[-2:]), w, lm_bias, inp.scale)
        if has_keys is not None:
            out = out * has_keys  # rows without any kept key: 0
        return inp.ungroup(out).to(inp.dtype), None

    def implied_weights(self, inp: AttentionInputs, state=None) -> Tensor:
        ct = torch.float64
        q, k, v, _ = inp.grouped()
        _, w = naive_nystrom(q.to(ct), k.to(ct), v.to(ct), key_keep(inp), self.landmarks, self.iters, inp.scale)
        return inp.ungroup(w)  # (*b, Hq, N, S)

    def flops(self, shape: Shape) -> float:
        """Exact attention's count when m >= min(N, S); else 2·B·Hq·[N·m·(D + Dv) (F and
        F·W) + m·S·(D + Dv) (B and B·V) + m²·(D + Dv) (A and pinv(A)·BV) + iters·4·m³
        (the pseudo-inverse)]."""
        m = self.landmarks
        if m >= min(shape.n, shape.s):
            return super().flops(shape)
        d, dv = shape.d, shape.dv
        per_head = shape.n * m * (d + dv) + m * shape.s * (d + dv) + m * m * (d + dv) + self.iters * 4 * m**3
        return 2.0 * shape.batch * shape.hq * per_head
