"""Performer: softmax attention estimated with FAVOR+ positive random features.

With ``x' = x·√scale`` and random directions ``w_1 … w_F`` (rows of the projection
``W``, (F, D)), the positive feature map

    φ(x) = exp(W x' − |x'|²/2) / √F                                  (F,)

satisfies ``E[φ(q)·φ(k)] = exp(q·k·scale)`` for ``w ~ N(0, I_D)``, so the softmax
kernel factorises and attention becomes linear in the sequence length:

    out = φ(Q) (φ(K)^T V) / (φ(Q) (φ(K)^T 1))            cost O((N + S)·F·D)

Orthogonal blocks (rows of a block mutually orthogonal, each rescaled by an
independent chi_D-distributed norm so every row is still marginally N(0, I)) lower the
variance of the estimate.  Causal attention uses chunked prefix sums: within a chunk
of C positions the masked C×C product is exact, across chunks a running (F, Dv+1)
state carries the keys seen so far -- no N×F×D cumulative tensor is ever built.

The pieces the Hybrid family reuses are public: :func:`draw_features`,
:func:`projection_matrix`, :func:`positive_features` (features and their detached
log-shifts), :func:`feature_logits`, :class:`KeyState` (running key sums with a running
shift) and :func:`safe_denominator`.

Reference:
    Choromanski et al., "Rethinking Attention with Performers", ICLR 2021.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core.capabilities import Capabilities, Method
from ..core.inputs import AttentionInputs, Shape
from ..core.reference import causal_keep
from ..core.random import seeded_generator
from ..core.registry import register

__all__ = [
    "Performer",
    "PerformerState",
    "draw_features",
    "feature_generator",
    "projection_matrix",
    "feature_logits",
    "positive_features",
    "safe_denominator",
    "KeyState",
    "naive_performer",
]

NEG_INF = float("-inf")
DEFAULT_CHUNK = 64
BLOCK_ELEMENTS = 1 << 20  # fp32 elements of one feature block (4 MiB): see block_rows


# -- random features -----------------------------------------------------------------


def feature_generator(seed: int, draw: int = 0) -> torch.Generator:
    """The CPU generator of draw number ``draw`` (0 = the first) for config seed ``seed``
    (hashed: see :func:`attnkit.core.random.seeded_generator`)."""
    return seeded_generator(seed, draw)


def draw_features(features: int, dim: int, orthogonal: bool = True, *, generator: torch.Generator) -> Tensor:
    """Random projection W (F, D), fp32 on CPU, every row marginally N(0, I_D).

    ``orthogonal``: rows come in blocks of D mutually orthogonal directions (the Q of
    a QR of a Gaussian D×D matrix, sign-corrected so that it is Haar-distributed; the
    last block is truncated when D does not divide F), each row rescaled by the norm of
    an independent Gaussian D-vector (chi_D), as in the paper's reference code.  Else
    iid Gaussian rows.

    Equivalent to (orthogonal=False)::

        torch.randn(features, dim, generator=generator)
    """
    if not orthogonal:
        return torch.randn(features, dim, generator=generator)
    blocks = -(-features // dim)
    q, r = torch.linalg.qr(torch.randn(blocks, dim, dim, generator=generator))  # one batched call
    diag = torch.diagonal(r, dim1=-2, dim2=-1)  # (blocks, D)
    q = q * torch.where(diag < 0, -1.0, 1.0)[:, None, :]  # column signs: Haar-distributed (Mezzadri 2007)
    directions = q.transpose(-1, -2).reshape(blocks * dim, dim)[:features]  # (F, D): rows orthonormal per block
    norms = torch.linalg.vector_norm(torch.randn(features, dim, generator=generator), dim=-1)  # (F,) ~ chi_D
    return directions * norms[:, None]


@torch.compiler.disable
def projection_matrix(features: int, dim: int, orthogonal: bool = True, seed: int = 0, draw: int = 0) -> Tensor:
    """The projection of draw number ``draw`` for ``seed``: (F, D) fp32 on CPU, deterministic.

    Always runs eagerly: a torch.Generator cannot be created inside a compiled region,
    so under ``torch.compile`` a functional call has one graph break here.  Inside a
    module (eval) the projection is a buffer and the method compiles to one graph.
    """
    return draw_features(features, dim, orthogonal, generator=feature_generator(seed, draw))


def feature_logits(x: Tensor, projection: Tensor, scale: float, keep: Tensor | None = None) -> Tensor:
    """Logs of the unnormalised key features: ``w_f·x' − |x'|²/2`` (−inf where not kept).

    Args:
        x: (..., L, D) keys in the compute dtype.
        projection: (F, D) in x's dtype and device.
        scale: softmax scale; x' = x·√|scale| (a negative scale's sign goes to the queries).
        keep: None or bool broadcastable to (..., L, 1); False = padded key.

    Returns:
        (..., L, F) logits; padded keys are −inf, so ``exp`` gives exactly 0 and its
        gradient is 0 too (a ``where`` after ``exp`` would give 0·inf = NaN gradients
        when a padded key's logit overflows).
    """
    xs = x * math.sqrt(abs(scale))
    sq = 0.5 * xs.pow(2).sum(dim=-1, keepdim=True)  # (..., L, 1)
    # One GEMM gives w·x' − |x'|²/2: [x', |x'|²/2] @ [W, −1]^T (saves a pass over (L, F)).
    xs1 = torch.cat([xs, sq], dim=-1)  # (..., L, D+1)
    w1 = torch.cat([projection, projection.new_full((projection.shape[0], 1), -1.0)], dim=-1)  # (F, D+1)
    logits = torch.matmul(xs1, w1.T)  # (..., L, F)
    if keep is not None:
        logits = torch.where(keep, logits, NEG_INF)
    return logits


def positive_features(
    x: Tensor, projection: Tensor, scale: float, *, is_query: bool, keep: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """FAVOR+ features with the numerical stabiliser, in x's dtype (fp32 or fp64).

    ``φ(x) = exp(W x' − |x'|²/2 − shift) / √F`` with a *detached* log-shift that makes
    every entry <= 1/√F, so nothing overflows whatever the norms:

    * queries: a per-row shift, ``max_f w_f·x' − |x'|²/2``.  Any factor common to one
      query row cancels between numerator and denominator of that row.  The value is
      computed as ``exp(W x' − max_f W x')``, free of the cancellation of two large
      ``|x'|²/2`` terms; the gradient of ``−|x'|²/2`` is still included (a zero-valued
      ``sq − sq.detach()`` term) so that φ's gradient is that of the formula with a
      constant shift -- a consumer mixing φ with exact scores (Hybrid) relies on it.
    * keys: ONE shift for all keys of a head, the max over kept keys and features of
      ``w_f·x' − |x'|²/2``.  A per-key shift would not cancel: it would reweight keys
      against each other.  A constant common to all keys of a head cancels exactly
      between numerator and denominator.  Padded keys are left out of the max (a
      large padded key could otherwise underflow every real one) and get φ = 0.

    Args:
        x: (..., L, D) in the compute dtype.
        projection: (F, D) in x's dtype and device.
        scale: softmax scale; x' = x·√|scale| (keys) or x·sign(scale)·√|scale| (queries), so
            ``E[φ(q)·φ(k)] = exp(q·k·scale)·exp(−shift_q − shift_k)``.
        is_query: which stabiliser.
        keep: keys only: None or bool broadcastable to (..., L, 1); False = padded key.

    Returns:
        phi: (..., L, F), entries in [0, 1/√F].
        shift: detached, (..., L, 1) for queries, (..., 1, 1) for keys (0 when no key is kept).
    """
    log_sqrt_f = 0.5 * math.log(projection.shape[0])  # the 1/√F folded into the exponent: no extra pass
    if is_query:
        xs = x * math.copysign(math.sqrt(abs(scale)), scale)  # a negative scale flips the queries
        wx = torch.matmul(xs, projection.T)  # (..., L, F)
        m = wx.detach().amax(dim=-1, keepdim=True)  # (..., L, 1)
        sq = 0.5 * xs.pow(2).sum(dim=-1, keepdim=True)  # (..., L, 1)
        # In place: the GEMM output is saved by nothing, and exp saves only its result.
        arg = wx.sub_(m + log_sqrt_f)
        if sq.requires_grad:
            arg = arg.sub_(sq - sq.detach())
        return arg.exp_(), (m - sq).detach()
    logits = feature_logits(x, projection, scale, keep)  # (..., L, F)
    if logits.shape[-2] == 0:  # no keys
        return logits, logits.new_zeros((*logits.shape[:-2], 1, 1))
    shift = logits.detach().amax(dim=(-2, -1), keepdim=True)  # (..., 1, 1)
    shift = torch.where(shift == NEG_INF, 0.0, shift)  # no kept key: features are all 0 anyway
    return logits.sub_(shift + log_sqrt_f).exp_(), shift


def safe_denominator(den: Tensor) -> Tensor:
    """The normaliser floored at δ = tiny/eps of its dtype (~1e-31 in fp32, ~1e-292 in fp64).

    All features are >= 0, so |num| <= den·max|v|: the numerator is on the scale of the
    denominator, and a floor never amplifies (the result stays within the range of v).
    A row without keys has den = num = 0 and gives 0.  Rows above δ are divided exactly;
    an additive epsilon would instead bias every row towards 0 by eps/den, and den
    legitimately spans many orders of magnitude.  Why not the smallest normal number:
    the backward divides by den (d num = d out / den), and 1/δ ~ 1e31 leaves fp32 seven
    orders of magnitude of headroom before d out·state/den overflows to inf (then 0·inf
    = NaN on rows without keys); rows below δ have underflowed to subnormals already.
    """
    info = torch.finfo(den.dtype)
    return den.clamp_min(info.tiny / info.eps)


def _safe_divide(num_den: Tensor, dv: int) -> Tensor:
    """(..., Dv+1) = numerator | normaliser  ->  (..., Dv) numerator / normaliser."""
    return num_den[..., :dv] / safe_denominator(num_den[..., dv:])


# -- the naive formula (the oracle) --------------------------------------------------


def naive_performer(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection: Tensor,
    *,
    scale: float,
    is_causal: bool = False,
    key_keep: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Materialised FAVOR+ in the inputs' dtype: the readable spec of the fast path.

    Args:
        q: (*b, Hq, N, D).  k: (*b, Hkv, S, D).  v: (*b, Hkv, S, Dv).
        projection: (F, D) random directions.
        key_keep: None or bool broadcastable to (*b, Hq, 1, S); False = padded key.

    Returns:
        out (*b, Hq, N, Dv) and the implied attention matrix (*b, Hq, N, S).

    Equivalent to::

        A = φ(q) @ φ(k).T                 # (N, S), causal: tril; padded keys: 0
        P = A / A.sum(-1, keepdim=True)    # rows without keys: 0
        out = P @ v
    """
    g = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(g, dim=-3), v.repeat_interleave(g, dim=-3)  # (*b, Hq, S, D)
    w = projection.to(q.dtype)
    keep = None if key_keep is None else key_keep.transpose(-1, -2)  # (*b, Hq|1, S, 1)
    phi_q, _ = positive_features(q, w, scale, is_query=True)  # (*b, Hq, N, F)
    phi_k, _ = positive_features(k, w, scale, is_query=False, keep=keep)  # (*b, Hq, S, F)
    a = torch.matmul(phi_q, phi_k.transpose(-1, -2))  # (*b, Hq, N, S)
    if is_causal:
        a = a.masked_fill(~causal_keep(0, q.shape[-2], 0, k.shape[-2], a.device), 0.0)
    p = a / safe_denominator(a.sum(dim=-1, keepdim=True))
    return torch.matmul(p, v), p


# -- the fast paths ------------------------------------------------------------------


def block_rows(lead: int, features: int, multiple: int = 1) -> int:
    """Rows per feature block: a (lead, rows, F) fp32 block of about 4 MiB, so that the
    GEMM, max, subtract and exp passes over it stay in cache (measured: ~1.6x faster at
    N=16384 than one pass over the whole (N, F) tensor).  A multiple of ``multiple``."""
    rows = max(multiple, BLOCK_ELEMENTS // max(1, lead * features))
    return rows - rows % multiple


class KeyState:
    """Σ_j φ(k_j) [v_j, 1]^T over the keys absorbed so far, at a running shift ``m``
    (detached; (*lead, 1, 1), −inf before any kept key): every absorbed φ(k_j) equals
    exp(w·k'_j − |k'_j|²/2 − m)/√F for the current ``m``.

    Keys arrive block by block; the shift ``m`` is the max of their logits so far and
    the sum is rescaled by exp(m_old − m_new) <= 1 when it grows (online-softmax style).
    So every key read together ends up with one common shift -- which cancels between
    numerator and denominator -- and the shift depends only on keys absorbed so far.
    Causal: an output never depends on keys of later chunks, not even by rounding, and
    a large future key cannot underflow the features of past ones.  Within its own
    chunk a query shares the shift with the chunk's later keys: that is the only way
    they reach it, and it cancels up to rounding.
    """

    def __init__(self, like: Tensor, lead: tuple[int, ...], features: int, dv1: int):
        # Held transposed, (Dv+1, F): [v, 1]^T @ φ(K) runs ~20% faster than φ(K)^T @ [v, 1]
        # (MKL, Dv+1 = 65 columns), and the readout takes the transpose for free.
        self.state_t = like.new_zeros((*lead, dv1, features))  # (*lead, Dv+1, F)
        self.m = like.new_full((*lead, 1, 1), NEG_INF)
        self.log_sqrt_f = 0.5 * math.log(features)

    def features(self, logits: Tensor, inplace: bool) -> Tensor:
        """Raise the shift to cover ``logits`` (*lead, L, F) and return their features
        exp(logits − shift)/√F; the state is rescaled to match.  ``inplace`` overwrites
        ``logits`` (not allowed on views of a tensor other views of which are in the
        autograd graph: in-place ops there bump a shared version counter)."""
        m_new = torch.maximum(self.m, logits.detach().amax(dim=(-2, -1), keepdim=True))
        m_safe = torch.where(m_new == NEG_INF, 0.0, m_new)  # no kept key yet: any finite shift
        self.state_t = self.state_t * torch.exp(self.m - m_safe)  # exp(-inf) = 0 while the state is empty
        self.m = m_new
        if inplace:
            return logits.sub_(m_safe + self.log_sqrt_f).exp_()
        return torch.exp(logits - (m_safe + self.log_sqrt_f))

    def absorb(self, phi_k: Tensor, v1: Tensor) -> None:
        """Add keys: phi_k (*lead, L, F) from :meth:`features`, v1 = [v, 1] (*lead', L, Dv+1)."""
        self.state_t = self.state_t + torch.matmul(v1.transpose(-1, -2), phi_k)  # (*lead, Dv+1, F)

    def read(self, phi_q: Tensor) -> Tensor:
        """φ(q) · Σ_j φ(k_j) [v_j, 1]: (*lead, L, F) -> (*lead, L, Dv+1)."""
        return torch.matmul(phi_q, self.state_t.transpose(-1, -2))


def _rows(x: Tensor | None, step: int, count: int) -> list:
    """``x`` split into blocks of ``step`` rows along dim -2 (a size-1 dim broadcasts).

    torch.split, not slicing in a loop: the backward of one slice writes into a zero
    tensor as large as the whole input, which would make the backward O(N²/step).
    """
    if x is None or x.shape[-2] == 1:
        return [x] * count
    return list(x.split(step, dim=-2))


def _with_ones(v: Tensor) -> Tensor:
    """[v, 1] (..., L, Dv+1): one product then gives numerator and normaliser.  Built per
    block: a whole-sequence copy would be one more N-sized allocation (page faults)."""
    return torch.cat([v, v.new_ones((*v.shape[:-1], 1))], dim=-1)


def _favor_bidirectional(q: Tensor, k: Tensor, v: Tensor, w: Tensor, scale: float, keep: Tensor | None) -> Tensor:
    """q (*b, Hkv, G, N, D), k (*b, Hkv, 1, S, D), v (*b, Hkv, 1, S, Dv), keep None or
    (*b', Hkv|1, G|1, S|1, 1).  Returns the normalised output (*b, Hkv, G, N, Dv)."""
    f, dv = w.shape[0], v.shape[-1]
    lead_k = torch.broadcast_shapes(k.shape[:-2], keep.shape[:-2]) if keep is not None else k.shape[:-2]
    keys = KeyState(q, lead_k, f, dv + 1)
    step = block_rows(math.prod(lead_k), f)
    k_blocks = k.split(step, dim=-2) if k.shape[-2] else ()
    for kb, vb, keepb in zip(k_blocks, v.split(step, dim=-2), _rows(keep, step, len(k_blocks))):
        phi_k = keys.features(feature_logits(kb, w, scale, keepb), inplace=True)  # (*b, Hkv, G|1, Bk, F)
        keys.absorb(phi_k, _with_ones(vb))
    outs = []
    for qb in q.split(block_rows(math.prod(q.shape[:-2]), f), dim=-2):
        phi_q, _ = positive_features(qb, w, scale, is_query=True)  # (*b, Hkv, G, Bq, F)
        outs.append(_safe_divide(keys.read(phi_q), dv))  # (*b, Hkv, G, Bq, Dv)
    return torch.cat(outs, dim=-2)


def _favor_causal(
    q: Tensor, k: Tensor, v: Tensor, w: Tensor, scale: float, keep: Tensor | None, chunk: int
) -> Tensor:
    """Chunked prefix sums; arguments and result as :func:`_favor_bidirectional`.

    Query chunk [p0, p1) reads the state of keys < p0, plus the exact masked C×C block
    φ(Q_c) φ(K_c)^T against keys [p0, p1), then absorbs those keys.  Features are
    computed a cache-sized block of chunks at a time.  Keys after the last query are
    never visible and never read.

    Memory under autograd: φ(Q) and φ(K) (N·F each), one C×C block per chunk (N·C in
    all) and one (F, Dv+1) state per chunk (N·F·(Dv+1)/C): O(N·(F + C) + N·F·Dv/C) per
    head, i.e. O(N·F) for C ~ Dv.  Never an N×F×D cumulative tensor.
    """
    s, f, dv = min(q.shape[-2], k.shape[-2]), w.shape[0], v.shape[-1]
    k, v = k[..., :s, :], v[..., :s, :]
    keep = keep[..., :s, :] if keep is not None and keep.shape[-2] > 1 else keep
    lead_k = torch.broadcast_shapes(k.shape[:-2], keep.shape[:-2]) if keep is not None else k.shape[:-2]
    keys = KeyState(q, lead_k, f, dv + 1)
    step = block_rows(math.prod(q.shape[:-2]), f, multiple=chunk)
    k_blocks = k.split(step, dim=-2) if s else ()
    keep_blocks = _rows(keep, step, len(k_blocks))
    v_blocks = v.split(step, dim=-2)
    outs = []
    for bi, qb in enumerate(q.split(step, dim=-2)):
        phi_q, _ = positive_features(qb, w, scale, is_query=True)  # (*b, Hkv, G, Bq, F)
        k_chunks = v_chunks = ()
        if bi < len(k_blocks):
            logits = feature_logits(k_blocks[bi], w, scale, keep_blocks[bi])  # (*b, Hkv, G|1, Bk, F)
            k_chunks = logits.split(chunk, dim=-2)
            v_chunks = _with_ones(v_blocks[bi]).split(chunk, dim=-2)  # (*b, Hkv, 1, Ck, Dv+1) each
        block_out = []
        for ci, qf in enumerate(phi_q.split(chunk, dim=-2)):  # qf (*b, Hkv, G, Cq, F)
            if ci >= len(k_chunks):  # N > S: these queries see every key
                block_out.append(keys.read(qf))
                continue
            p0 = bi * step + ci * chunk
            kf = keys.features(k_chunks[ci], inplace=False)  # (*b, Hkv, G|1, Ck, F); split views: not in place
            a = torch.matmul(qf, kf.transpose(-1, -2))  # (*b, Hkv, G, Cq, Ck)
            a = a.masked_fill(~causal_keep(p0, p0 + qf.shape[-2], p0, p0 + kf.shape[-2], a.device), 0.0)
            block_out.append(keys.read(qf) + torch.matmul(a, v_chunks[ci]))
            keys.absorb(kf, v_chunks[ci])
        outs.append(_safe_divide(torch.cat(block_out, dim=-2), dv))  # (*b, Hkv, G, Bq, Dv)
    return torch.cat(outs, dim=-2)


# -- module state --------------------------------------------------------------------


class PerformerState(nn.Module):
    """The random projection of a Performer inside a module, and its redraw schedule.

    Buffers (round-trip through ``state_dict``):
        projection: (F, D) shared by all heads, as in the paper's reference code (one
            projection per layer): one draw, one GEMM for all heads; heads differ by their
            inputs, not by their features.  Kept in fp32 (or fp64) when the module is
            cast to fp16/bf16 -- features are computed in fp32 anyway.
        step: training forward calls so far (int64).

    In training mode, call ``i`` (0-based) uses draw number ``i // redraw`` of
    :func:`projection_matrix` for ``(seed, draw)``: deterministic, and reproducible from
    the state_dict.  ``redraw=0`` never redraws; eval mode never redraws nor counts.
    """

    def __init__(self, features: int, head_dim: int, orthogonal: bool, seed: int, redraw: int):
        super().__init__()
        self.features, self.head_dim, self.orthogonal, self.seed, self.redraw = features, head_dim, orthogonal, seed, redraw
        self.register_buffer("projection", projection_matrix(features, head_dim, orthogonal, seed, 0))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def extra_repr(self) -> str:
        return f"features={self.features}, head_dim={self.head_dim}, orthogonal={self.orthogonal}, seed={self.seed}, redraw={self.redraw}"

    def _apply(self, fn, recurse=True):
        before = self.projection
        super()._apply(fn, recurse)
        if self.projection.dtype in (torch.float16, torch.bfloat16):
            self.projection = before.to(device=self.projection.device, dtype=torch.float32)
        return self

    @torch.no_grad()
    def projection_for_call(self) -> Tensor:
        """The projection for this forward call; in training, advances the schedule."""
        if self.training:
            step = int(self.step)
            if self.redraw > 0 and step > 0 and step % self.redraw == 0:
                w = projection_matrix(self.features, self.head_dim, self.orthogonal, self.seed, step // self.redraw)
                self.projection.copy_(w)
            self.step += 1
        return self.projection


# -- the method ----------------------------------------------------------------------


@register
@dataclass(frozen=True)
class Performer(Method):
    """FAVOR+ random-feature attention (Choromanski et al., ICLR 2021): O((N+S)·F·D).

    Args:
        features: F, the number of random features (error ~ 1/√F).
        orthogonal: orthogonal random blocks (lower variance) instead of iid rows.
        redraw: in a module in training mode, draw new features every ``redraw``
            forward calls (0 = never); eval keeps them fixed.
        seed: seed of the random projection (functional calls use draw 0 of it).
        chunk: causal only: positions per chunk of the prefix sums (None: 64).

    Keys and values are O(S·F) work; in functional use the projection is drawn per call
    (a few D×D QRs).  Supports key-padding masks only (bool, or float 0/-inf), causal,
    GQA, any leading batch dims; no dropout; cannot return weights (use
    :meth:`implied_weights` for analysis).

    Equivalent to::

        phi = lambda x: exp(W @ (x·√scale) − |x·√scale|²/2) / √F     # (F,) per row
        A = phi(q) @ phi(k).T                                      # tril if causal
        out = (A @ v) / A.sum(-1, keepdim=True)
    """

    features: int = 256
    orthogonal: bool = True
    redraw: int = 0
    seed: int = 0
    chunk: int | None = None

    name: ClassVar[str] = "performer"
    capabilities: ClassVar[Capabilities] = Capabilities(
        exact=False, full_masks=False, dropout=False, double_backward=True, returns_weights=False
    )

    def __post_init__(self):
        self.check_int("features", 1)
        self.check_int("redraw", 0)
        self.check_int("chunk", 1, optional=True)
        self.check_choice("orthogonal", (True, False))
        self.check_int("seed", None)

    def chunk_size(self) -> int:
        return self.chunk or DEFAULT_CHUNK

    def _projection(self, inp: AttentionInputs, state: PerformerState | None) -> Tensor:
        if state is None:
            return projection_matrix(self.features, inp.d, self.orthogonal, self.seed, 0)
        if tuple(state.projection.shape) != (self.features, inp.d):
            raise ValueError(
                f"Performer: the module's projection has shape {tuple(state.projection.shape)} but this call "
                f"needs (features, head dim) = ({self.features}, {inp.d}); build the state with "
                f"make_state(num_heads, head_dim={inp.d}) from this config."
            )
        return state.projection_for_call()

    def forward(self, inp, *, need_weights=False, average_weights=False, state=None):
        acc = torch.float64 if inp.dtype == torch.float64 else torch.float32
        w = self._projection(inp, state).to(device=inp.device, dtype=acc)
        q, k, v, _ = inp.grouped()  # (*b, Hkv, G, N, D), (*b, Hkv, 1, S, D), (*b, Hkv, 1, S, Dv)
        q, k, v = q.to(acc), k.to(acc), v.to(acc)
        keep = inp.key_keep()
        keep = None if keep is None else keep.transpose(-1, -2)  # (*b', Hkv|1, G|1, S|1, 1)
        if inp.is_causal:
            out = _favor_causal(q, k, v, w, inp.scale, keep, self.chunk_size())
        else:
            out = _favor_bidirectional(q, k, v, w, inp.scale, keep)  # (*b, Hkv, G, N, Dv)
        return inp.ungroup(out).to(inp.dtype), None

    def flops(self, shape: Shape) -> float:
        """2·(N·F·D + S·F·D) features + 2·(S + N)·F·(Dv+1) state and readout (the +1 is the
        normaliser); keys per kv head, queries per query head.  Causal: S' = min(N, S)
        keys, plus the in-chunk products 2·Cq·Ck·(F + Dv + 1) per chunk."""
        f, d, dv1 = self.features, shape.d, shape.dv + 1
        s = min(shape.n, shape.s) if shape.is_causal else shape.s
        per_q_head = 2.0 * shape.n * f * d + 2.0 * shape.n * f * dv1
        per_kv_head = 2.0 * s * f * d + 2.0 * s * f * dv1
        if shape.is_causal:
            c = self.chunk_size()
            pairs = sum(min(c, shape.n - p0) * min(c, s - p0) for p0 in range(0, min(shape.n, s), c))
            per_q_head += 2.0 * pairs * (f + dv1)
        return shape.batch * (shape.hq * per_q_head + shape.hkv * per_kv_head)

    def implied_weights(self, inp, state=None):
        """φ(Q)φ(K)^T normalised per row, from :func:`naive_performer` in float64: (*b, Hq, N, S)."""
        w = state.projection if state is not None else projection_matrix(self.features, inp.d, self.orthogonal, self.seed, 0)
        keep = inp.key_keep()
        keep = None if keep is None else keep.flatten(-4, -3)  # (*b', 1|Hq, 1, S)
        _, p = naive_performer(
            inp.q.double(), inp.k.double(), inp.v.double(), w.double(), scale=inp.scale,
            is_causal=inp.is_causal, key_keep=keep,
        )
        return p

    def make_state(self, num_heads: int, head_dim: int) -> PerformerState:
        return PerformerState(self.features, head_dim, self.orthogonal, self.seed, self.redraw)
