"""Local attention: a sliding window plus global tokens and attention sinks, block-sparse.

Each query sees the keys of its window, the first ``sinks`` keys (attention sinks,
StreamingLLM) and the first ``global_tokens`` keys; the first ``global_tokens`` queries
see every key (Longformer/BigBird global tokens).  The fast path walks query blocks
and scores each against the contiguous key range its window needs (plus the prefix
columns of sinks and global tokens), with one fp32 softmax per block: it computes
O(N·(W + block)·D), never an N x S tensor.  Interior blocks share one relative band
mask and run batched over strided views of k and v (no copies).  Within its pattern it
is exact: it equals :func:`attnkit.reference_attention` with the dense mask
:func:`local_mask`.

The backward is FlashAttention-2's (Dao 2023): only q, k, v, the output and the
log-sum-exp are saved, each score tile is recomputed over the same block plan, so
training memory is O(N·D) plus one chunk of scores.  (A float mask that needs its own
gradient goes through plain autograd instead: O(N·(W + block)) saved.)

The band computation is exposed as :func:`local_band_stats`, which returns the
unnormalised softmax statistics (running max ``m``, sum ``l``, accumulator ``acc``) per
query, so that a method can add its own estimate of the keys outside the band.

References:
    Beltagy et al., "Longformer: The Long-Document Transformer", 2020.
    Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning", 2023.
    Zaheer et al., "Big Bird: Transformers for Longer Sequences", NeurIPS 2020.
    Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from ..core.capabilities import Capabilities, Method
from ..core.inputs import AttentionInputs, Shape
from ..core.reference import math_attention
from ..core.registry import register
from .tiled import _mask_tile, compute_dtype

__all__ = ["Local", "LocalPattern", "BandStats", "local_mask", "naive_local", "local_band_stats"]

NEG_INF = float("-inf")
_CHUNK_SCORES = 1 << 18  # scores per batched chunk of blocks (measured: larger is slower on CPU)


@dataclass(frozen=True)
class LocalPattern:
    """Which (query i, key j) pairs Local attends, as positions (top-left aligned, like SDPA).

    * window, bidirectional: the ``window`` keys nearest to i, a span centred on i that
      slides inwards at the ends of the sequence so that every query sees exactly
      min(W, S) keys: ``c_i <= j < c_i + W`` with ``c_i = clamp(i - W//2, 0, max(S - W, 0))``.
      In the middle of the sequence that is ``i - W//2 <= j < i - W//2 + W`` (W//2 keys
      before i, (W-1)//2 after).  A window W >= S covers every key: exact attention.
    * window, causal: the previous W keys, ``i - W < j <= i``.  W >= N: exact causal.
    * sinks and global tokens: keys ``j < max(sinks, global_tokens)`` are seen by every
      query; queries ``i < global_tokens`` see every key.
    * causal always adds ``j <= i``.

    For N=6, S=6, W=3, one sink, bidirectional::

        1 1 1 0 0 0
        1 1 1 0 0 0
        1 1 1 1 0 0
        1 0 1 1 1 0
        1 0 0 1 1 1
        1 0 0 1 1 1
    """

    n: int
    s: int
    window: int
    global_tokens: int = 0
    sinks: int = 0
    causal: bool = False

    @property
    def prefix(self) -> int:
        """Keys [0, prefix) are visible to every query (sinks and global tokens)."""
        return min(max(self.sinks, self.global_tokens), self.s)

    def start(self, i: int) -> int:
        """First key of query i's window (before the causal cut)."""
        if self.causal:
            return max(0, i - self.window + 1)
        return min(max(i - self.window // 2, 0), max(self.s - self.window, 0))

    def end(self, i: int) -> int:
        """One past the last key of query i's window."""
        if self.causal:
            return min(self.s, i + 1)
        return min(self.s, self.start(i) + self.window)

    def keep(self, rows: Tensor, cols: Tensor) -> Tensor:
        """Bool (len(rows), len(cols)), True = attend, for query positions ``rows`` and key positions ``cols``."""
        i, j = rows[:, None], cols[None, :]
        if self.causal:
            win = (j > i - self.window) & (j <= i)
        else:
            c = (i - self.window // 2).clamp(0, max(self.s - self.window, 0))
            win = (j >= c) & (j < c + self.window)
        keep = win | (j < self.prefix) | (i < self.global_tokens)
        return keep & (j <= i) if self.causal else keep

    def all_visible(self, i0: int, i1: int, j0: int, j1: int) -> bool:
        """Every query of [i0, i1) sees every key of [j0, j1) (decided without tensors)."""
        if j0 >= j1 or i0 >= i1:
            return True
        if self.causal and j1 - 1 > i0:
            return False
        if j1 <= self.prefix or i1 <= self.global_tokens:
            return True
        # The keys every row's window holds: [latest start, earliest end).
        return self.start(i1 - 1) <= j0 and j1 <= self.end(i0)

    def rows_may_be_empty(self, i0: int, i1: int) -> bool:
        """Some query of [i0, i1) may see no key at all (causal rows past S + W - 1)."""
        return self.s == 0 or (self.causal and self.prefix == 0 and i1 - 1 >= self.s + self.window - 1 and i1 > self.global_tokens)


class Block(NamedTuple):
    """Query rows [i0, i1) against the key ranges ``segments`` ((j0, j1), ...)."""

    i0: int
    i1: int
    segments: tuple[tuple[int, int], ...]

    @property
    def keys(self) -> int:
        return sum(j1 - j0 for j0, j1 in self.segments)


def plan_blocks(p: LocalPattern, block: int, global_rows: int) -> list[Block]:
    """The query blocks the fast path computes and the key ranges each needs.

    Global query rows [0, G) come first, ``global_rows`` at a time, against all keys
    (causal: the keys up to their last row); then the other rows in blocks of ``block``
    against the union of their windows, and the prefix columns not already in it.
    """
    blocks = []
    g = min(p.global_tokens, p.n)
    for i0 in range(0, g, global_rows):
        i1 = min(i0 + global_rows, g)
        j1 = min(p.s, i1) if p.causal else p.s
        blocks.append(Block(i0, i1, ((0, j1),) if j1 > 0 else ()))
    for i0 in range(g, p.n, block):
        i1 = min(i0 + block, p.n)
        lo, hi = p.start(i0), p.end(i1 - 1)
        pre = min(p.prefix, i1) if p.causal else p.prefix
        if hi <= lo:  # empty window (causal rows far past S)
            segments = ((0, pre),) if pre > 0 else ()
        elif pre >= lo:
            segments = ((0, max(hi, pre)),)
        elif pre > 0:
            segments = ((0, pre), (lo, hi))
        else:
            segments = ((lo, hi),)
        blocks.append(Block(i0, i1, segments))
    return blocks


def choose_block(window: int, block: int | None) -> int:
    """Query rows per block: 64 (the fastest measured for W=512 on CPU), down to 16 for
    small windows, whose blocks would otherwise score mostly masked keys.  Small blocks
    cost no Python overhead: consecutive blocks run as one batched computation."""
    if block is not None:
        return block
    return min(64, max(16, window))


def local_mask(
    n: int, s: int, window: int, global_tokens: int = 0, sinks: int = 0, is_causal: bool = False,
    device: torch.device | str | None = None,
) -> Tensor:
    """The dense (N, S) bool mask of Local's pattern (True = attend); see :class:`LocalPattern`.

    Materialises N x S: for tests and small N.  ``reference_attention(q, k, v,
    local_mask(N, S, W, G, s, causal))`` is what :class:`Local` computes.
    """
    p = LocalPattern(n, s, window, global_tokens, sinks, is_causal)
    return p.keep(torch.arange(n, device=device), torch.arange(s, device=device))


def combine_masks(attn_mask: Tensor | None, keep: Tensor) -> Tensor:
    """A user mask restricted to a bool pattern ``keep`` (dense; naive paths only)."""
    if attn_mask is None:
        return keep
    if attn_mask.dtype == torch.bool:
        return attn_mask & keep
    return torch.where(keep, attn_mask, torch.full((), NEG_INF, dtype=attn_mask.dtype, device=attn_mask.device))


def naive_local(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
    scale: float | None = None, *, window: int, global_tokens: int = 0, sinks: int = 0,
    need_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Local attention, materialised: the oracle of the fast path.

    Equivalent to::

        keep = local_mask(N, S, window, global_tokens, sinks, is_causal)
        softmax(q @ k.T * scale + where(keep & attn_mask, 0, -inf)) @ v

    computed in fp32 (fp64 for fp64 inputs); rows with no visible key give zeros.

    Returns:
        out (*batch, Hq, N, Dv) in q's dtype, and the probabilities (*batch, Hq, N, S)
        when ``need_weights``.
    """
    from ..core.inputs import prepare_inputs

    inp = prepare_inputs(q, k, v, attn_mask, 0.0, is_causal, scale)
    keep = local_mask(inp.n, inp.s, window, global_tokens, sinks, is_causal, q.device)
    inp = AttentionInputs(q, k, v, combine_masks(attn_mask, keep), 0.0, is_causal, inp.scale)
    out, w = math_attention(inp, compute_dtype(q.dtype), need_weights=need_weights)
    return (out, w) if need_weights else out


class BandStats(NamedTuple):
    """Unnormalised softmax statistics of a band of keys, per query (online-softmax convention).

    With s_ij the scaled, masked scores over the band's keys:
    ``sum_j exp(s_ij) = l_i · exp(m_i)`` and ``sum_j exp(s_ij) v_j = acc_i · exp(m_i)``, so
    the band's attention output is ``acc / l``.  ``m`` is a shift without gradient
    (finite; 0 where a row sees no key, and there l = 0, acc = 0); gradients flow
    through ``l`` and ``acc``.  Shapes: m, l (*lead, N); acc (*lead, N, Dv); fp32
    (fp64 for fp64 inputs).
    """

    m: Tensor
    l: Tensor
    acc: Tensor


class _Part(NamedTuple):
    """One group of keys a unit of query rows is scored against.

    k (…, L, D), v (…, L, Dv): views into the keys and values; ``keep`` (bool, True =
    attend) / ``bias`` (float, added) broadcastable to the (…, rows, L) score tile, or
    None; ``src`` says where the keys sit, for the backward to put their gradients back:
    ("slice", j0, j1), ("windows", lo, wk, step) for C overlapping windows, or
    ("prefix", P) for the prefix keys shared by the C blocks of a run.
    """

    k: Tensor
    v: Tensor
    keep: Tensor | None
    bias: Tensor | None
    src: tuple
    drop: Tensor | None = None  # ~keep, made once per plan: a small op per block costs a thread wake-up


class _Unit(NamedTuple):
    """Query rows computed together: a single block [i0, i1), or a run of C uniform
    blocks (rows [i0, i0 + C·bq) seen as (…, C, bq, ·) when ``run`` is C)."""

    i0: int
    i1: int
    run: int | None
    parts: list[_Part]
    may_be_empty: bool


def softmax_lastdim(sc: Tensor) -> Tensor:
    """``torch.softmax(sc, -1)``; below 2^15 elements by plain ops instead: torch's CPU
    softmax starts a parallel region whatever the size, and on a busy machine waking the
    other threads costs milliseconds per call (measured: 8 ms for 48 elements), while
    elementwise ops that small run inline.  Rows must hold at least one finite score."""
    if sc.numel() >= 1 << 15:
        return torch.softmax(sc, dim=-1)
    e = torch.exp(sc - sc.detach().amax(dim=-1, keepdim=True))
    return e / e.sum(dim=-1, keepdim=True)


def _scores(qs_i: Tensor, part: _Part) -> tuple[Tensor, Tensor | None]:
    """Masked scores (…, rows, L) of one part (-inf where not visible), and the visible mask."""
    sc = torch.matmul(qs_i, part.k.transpose(-1, -2))
    visible = part.keep
    if part.bias is not None:
        sc.add_(part.bias)
        finite = part.bias != NEG_INF
        visible = finite if visible is None else visible & finite
    if visible is not None:
        sc.masked_fill_(part.drop if part.bias is None and part.drop is not None else ~visible, NEG_INF)
    return sc, visible


def _attend(qs_i: Tensor, parts: list[_Part], may_be_empty: bool, want_lse: bool) -> tuple[Tensor, Tensor | None]:
    """softmax over the keys of all ``parts`` at once (one fused softmax), times their values.

    qs_i (…, rows, D) is scaled.  Rows with no visible key give zeros (and lse -inf):
    their scores are unmasked before the softmax, so no NaN reaches autograd, and their
    output is zeroed.  Returns out (…, rows, Dv) and, when ``want_lse``, the log-sum-exp
    of the scores (…, rows).
    """
    scores, row_ok = [], None
    for part in parts:
        sc, visible = _scores(qs_i, part)
        if may_be_empty:
            any_ok = visible.any(dim=-1, keepdim=True) if visible is not None else torch.ones((), dtype=torch.bool, device=sc.device)
            row_ok = any_ok if row_ok is None else row_ok | any_ok
        scores.append(sc)
    sc = scores[0] if len(scores) == 1 else torch.cat(scores, dim=-1)
    if row_ok is not None:
        sc.masked_fill_(~row_ok, 0.0)
    p = softmax_lastdim(sc)
    # split, not slicing: a slice's backward zero-fills a tensor the size of p.
    probs = p.split([part.k.shape[-2] for part in parts], dim=-1) if len(parts) > 1 else (p,)
    out = None
    for part, pp in zip(parts, probs):
        o = torch.matmul(pp, part.v)  # (…, rows, Dv)
        out = o if out is None else out + o
    # log-sum-exp from the softmax's own result: lse = max(s) − log(max(p)), since the
    # largest score's probability is exp(max − lse).  Two read-only max passes instead
    # of logsumexp's four (max, subtract, exp, sum); max(p) >= 1/L keeps the log well
    # conditioned, and the gradient is still p (the two max terms' parts cancel).
    lse = sc.amax(dim=-1) - torch.log(p.amax(dim=-1)) if want_lse else None
    if row_ok is not None:
        out = out * row_ok
        lse = lse.masked_fill(~row_ok.squeeze(-1), NEG_INF) if want_lse else None
    return out, lse


def _user_parts(mask: Tensor | None, i0: int, i1: int, j0: int, j1: int) -> tuple[Tensor | None, Tensor | None]:
    """The user mask's (keep, bias) tile for rows [i0, i1) and keys [j0, j1)."""
    mt = _mask_tile(mask, i0, i1, j0, j1)
    if mt is None:
        return None, None
    return (mt, None) if mt.dtype == torch.bool else (None, mt)


def _window_tiles(mask: Tensor, i0: int, lo: int, c: int, bq: int, wk: int) -> Tensor:
    """View of the mask tiles of C consecutive uniform blocks: block t's rows
    [i0 + t·bq, +bq) against its keys [lo + t·bq, +wk), as (…', C, bq|1, wk|1).  No copy:
    a strided view whose block step moves bq rows and bq columns at once."""
    rows, cols = mask.shape[-2], mask.shape[-1]
    if rows == 1:  # key padding / per-key bias: windows along the keys only
        return mask[..., 0, lo : lo + (c - 1) * bq + wk].unfold(-1, wk, bq).unsqueeze(-2) if cols != 1 \
            else mask.unsqueeze(-3)
    sn, ss = mask.stride(-2), mask.stride(-1) if cols != 1 else 0
    return mask.as_strided(
        (*mask.shape[:-2], c, bq, wk if cols != 1 else 1),
        (*mask.stride()[:-2], bq * (sn + ss), sn, ss),
        mask.storage_offset() + i0 * sn + (lo * ss if cols != 1 else 0),
    )


def _band(block: int, window: int, device: torch.device) -> Tensor:
    """Bool (block, window + block - 1): row r keeps columns r .. r + window - 1."""
    d = torch.arange(window + block - 1, device=device)[None, :] - torch.arange(block, device=device)[:, None]
    return (d >= 0) & (d < window)


class _Plan:
    """The units of work for one call: uniform interior blocks batched in runs over
    strided views, the others (sequence ends, prefix overlap, global rows) one by one.

    Both the forward and the backward walk the same units, so they agree on which keys
    each query row was scored against.
    """

    def __init__(self, n: int, lead: torch.Size, k: Tensor, v: Tensor, mask: Tensor | None, p: LocalPattern,
                 block: int, batched: bool):
        self.k, self.v, self.mask, self.p, self.block = k, v, mask, p, block
        self.lead, self.device = lead, k.device
        self.cache: dict[tuple, Tensor] = {}  # positional masks that depend on j - i only
        self.negated: dict[int, tuple[Tensor, Tensor]] = {}  # id(mask) -> (mask, ~mask) for cached masks
        width = p.window + block - 1 + p.prefix
        # batched: one run for all uniform blocks (the plain-autograd path: per-chunk
        # slices of k would each cost a k-sized zero tensor in the backward).
        self.chunk = n if batched else max(1, _CHUNK_SCORES // max(1, math.prod(lead) * block * width))
        self.global_rows = max(1, 4 * _CHUNK_SCORES // max(1, math.prod(lead) * max(p.s, 1)))

    def uniform(self, blk: Block) -> bool:
        """Full size, window away from both ends and the prefix: the shared relative band."""
        p, (i0, i1) = self.p, (blk.i0, blk.i1)
        if i1 - i0 != self.block or not blk.segments:
            return False
        lo, hi = blk.segments[-1]
        if blk.segments[:-1] != (((0, p.prefix),) if p.prefix else ()) or (p.prefix > 0 and lo <= p.prefix):
            return False
        off = -(p.window - 1) if p.causal else -(p.window // 2)
        if lo != i0 + off or hi != lo + p.window + self.block - 1 or lo < 0 or hi > p.s:
            return False
        return p.causal or p.start(i1 - 1) == i1 - 1 + off

    def segment_keep(self, i0: int, i1: int, j0: int, j1: int) -> Tensor | None:
        p = self.p
        if p.all_visible(i0, i1, j0, j1):
            return None
        relative = j0 >= p.prefix and i0 >= p.global_tokens and (
            p.causal or (p.start(i0) == i0 - p.window // 2 and p.start(i1 - 1) == i1 - 1 - p.window // 2))
        key = (i0 - j0, i1 - i0, j1 - j0)
        if relative and key in self.cache:
            return self.cache[key]
        keep = p.keep(torch.arange(i0, i1, device=self.device), torch.arange(j0, j1, device=self.device))
        if relative:
            self.cache[key] = keep
        return keep

    def drop(self, keep: Tensor | None) -> Tensor | None:
        """``~keep``, computed once for each positional mask of ``self.cache`` (masks
        combined with a user mask are per block: negated per block, not kept)."""
        if keep is None:
            return None
        hit = self.negated.get(id(keep))
        if hit is not None and hit[0] is keep:
            return hit[1]
        if not any(keep is t for t in self.cache.values()):
            return ~keep
        self.negated[id(keep)] = (keep, ~keep)
        return self.negated[id(keep)][1]

    def single(self, blk: Block) -> _Unit:
        i0, i1 = blk.i0, blk.i1
        parts = []
        for j0, j1 in blk.segments:
            keep = self.segment_keep(i0, i1, j0, j1)
            ukeep, bias = _user_parts(self.mask, i0, i1, j0, j1)
            if ukeep is not None:
                keep = ukeep if keep is None else keep & ukeep
            parts.append(_Part(self.k[..., j0:j1, :], self.v[..., j0:j1, :], keep, bias, ("slice", j0, j1), self.drop(keep)))
        may_be_empty = self.mask is not None or self.p.rows_may_be_empty(i0, i1)
        return _Unit(i0, i1, None, parts, may_be_empty)

    def batch(self, blks: list[Block]) -> _Unit:
        """C consecutive uniform blocks as one (…, C, block, ·) computation."""
        p, bq, c = self.p, self.block, len(blks)
        i0, lo = blks[0].i0, blks[0].segments[-1][0]
        wk = p.window + bq - 1
        span = (c - 1) * bq + wk
        kw = self.k[..., lo : lo + span, :].unfold(-2, wk, bq).transpose(-1, -2)  # (…, C, wk, D): a view
        vw = self.v[..., lo : lo + span, :].unfold(-2, wk, bq).transpose(-1, -2)  # (…, C, wk, Dv)
        key = ("band", bq, p.window)
        if key not in self.cache:
            self.cache[key] = _band(bq, p.window, self.device)
        keep, bias, m = self.cache[key], None, self.mask
        if m is not None:
            mw = _window_tiles(m, i0, lo, c, bq, wk)  # (…', C, bq|1, wk)
            keep, bias = (keep & mw, None) if m.dtype == torch.bool else (keep, mw)
        parts = [_Part(kw, vw, keep, bias, ("windows", lo, wk, bq), self.drop(keep))]
        if p.prefix:
            ukeep, ubias = _user_parts(m, i0, i0 + c * bq, 0, p.prefix)
            if m is not None and m.shape[-2] != 1:
                ukeep, ubias = (t.unflatten(-2, (c, bq)) if t is not None else None for t in (ukeep, ubias))
            else:
                ukeep, ubias = (t.unsqueeze(-3) if t is not None else None for t in (ukeep, ubias))
            parts.insert(0, _Part(self.k[..., None, : p.prefix, :], self.v[..., None, : p.prefix, :], ukeep, ubias,
                                  ("prefix", p.prefix)))
        return _Unit(i0, i0 + c * bq, c, parts, m is not None)

    def __iter__(self):
        pending: list[Block] = []
        for blk in plan_blocks(self.p, self.block, self.global_rows):
            if self.uniform(blk):
                if len(pending) == self.chunk:
                    yield self.batch(pending)
                    pending = []
                pending.append(blk)
                continue
            if pending:
                yield self.batch(pending)
                pending = []
            yield self.single(blk) if blk.segments else _Unit(blk.i0, blk.i1, None, [], False)
        if pending:
            yield self.batch(pending)


def _rows(x: Tensor, unit: _Unit) -> Tensor:
    """The unit's rows of a (…, N, ·) tensor, as (…, C, bq, ·) for a run."""
    x = x[..., unit.i0 : unit.i1, :]
    return x.unflatten(-2, (unit.run, -1)) if unit.run else x


def _forward(qs: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, p: LocalPattern, block: int,
             want_lse: bool, batched: bool) -> tuple[Tensor, Tensor | None]:
    """All units: out (*lead, N, Dv) and lse (*lead, N) (when ``want_lse``), in qs's dtype."""
    lead = torch.broadcast_shapes(qs.shape[:-2], k.shape[:-2])
    outs, lses = [], []
    for unit in _Plan(qs.shape[-2], lead, k, v, mask, p, block, batched):
        rows = unit.i1 - unit.i0
        if not unit.parts:
            outs.append(qs.new_zeros((*lead, rows, v.shape[-1])))
            lses.append(qs.new_full((*lead, rows), NEG_INF))
            continue
        out, lse = _attend(_rows(qs, unit), unit.parts, unit.may_be_empty, want_lse)
        outs.append(out.flatten(-3, -2) if unit.run else out)
        lses.append((lse.flatten(-2) if unit.run else lse) if want_lse else None)
    if not outs:  # N == 0
        return qs.new_zeros((*lead, 0, v.shape[-1])), qs.new_zeros((*lead, 0)) if want_lse else None
    return torch.cat(outs, dim=-2), torch.cat(lses, dim=-1) if want_lse else None


def _put_back(grad: Tensor, part: _Part, dk: Tensor) -> None:
    """Add a part's key (or value) gradient (…, G, [C,] L, D) into dk (*b, Hkv, 1, S + pad, D)."""
    kind = part.src[0]
    if kind == "slice":
        _, j0, j1 = part.src
        dst = dk[..., j0:j1, :]
        dst += grad.sum_to_size(dst.shape)
    elif kind == "prefix":
        dst = dk[..., None, : part.src[1], :]
        dst += grad.sum_to_size(dst.shape)
    else:  # overlapping windows of C blocks: add window t's piece s at block t + s
        _, lo, wk, step = part.src
        c = grad.shape[-3]
        grad = grad.sum_to_size((*dk.shape[:-2], c, wk, grad.shape[-1]))  # (…, 1, C, wk, D)
        pieces = -(-wk // step)
        grad = torch.nn.functional.pad(grad, (0, 0, 0, pieces * step - wk)).unflatten(-2, (pieces, step))
        dst = dk[..., lo : lo + (c + pieces - 1) * step, :].unflatten(-2, (c + pieces - 1, step))
        for s in range(pieces):
            dst[..., s : s + c, :, :] += grad[..., s, :, :]


def _backward(qs: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, p: LocalPattern, block: int,
              out: Tensor, lse: Tensor, dout: Tensor, dlse: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """FlashAttention-2-style backward over the forward's units: each score tile is
    recomputed from the saved lse, gradients accumulate in place; no autograd graph.

    Returns dqs (w.r.t. the scaled queries), dk, dv, in the compute dtype.
    """
    lead = torch.broadcast_shapes(qs.shape[:-2], k.shape[:-2])
    pad = p.window + block  # room for the window gradients' last, partly outside, piece
    dq = torch.zeros_like(qs)
    dk = k.new_zeros((*k.shape[:-2], k.shape[-2] + pad, k.shape[-1]))
    dv = v.new_zeros((*v.shape[:-2], v.shape[-2] + pad, v.shape[-1]))
    delta = (dout * out).sum(dim=-1)  # (*lead, N)
    if dlse is not None:
        delta = delta - dlse
    lse_safe = torch.where(lse == NEG_INF, float("inf"), lse)  # rows with no key get P = 0
    for unit in _Plan(qs.shape[-2], lead, k, v, mask, p, block, batched=False):
        if not unit.parts:
            continue
        q_u, do_u = _rows(qs, unit), _rows(dout, unit)
        lse_u = _rows(lse_safe[..., None], unit)  # (…, [C,] rows, 1)
        delta_u = _rows(delta[..., None], unit)
        dq_u = None
        for part in unit.parts:
            sc, _ = _scores(q_u, part)
            prob = sc.sub_(lse_u).exp_()  # (…, rows, L)
            ds = torch.matmul(do_u, part.v.transpose(-1, -2)).sub_(delta_u).mul_(prob)
            _put_back(torch.matmul(prob.transpose(-1, -2), do_u), part, dv)
            _put_back(torch.matmul(ds.transpose(-1, -2), q_u), part, dk)
            g = torch.matmul(ds, part.k)
            dq_u = g if dq_u is None else dq_u.add_(g)
        dq[..., unit.i0 : unit.i1, :] += dq_u.flatten(-3, -2) if unit.run else dq_u
    return dq, dk[..., : k.shape[-2], :], dv[..., : v.shape[-2], :]


@dataclass(frozen=True)
class _Call:
    """The non-tensor arguments of one Local call (one object for autograd)."""

    pattern: LocalPattern
    block: int
    scale: float


class _LocalAttention(torch.autograd.Function):
    """Local attention with a recomputing backward: saves q, k, v, out and lse only.

    q (*b, Hkv, G, N, D), k (*b, Hkv, 1, S, D), v (*b, Hkv, 1, S, Dv) grouped, any float
    dtype; mask grouped, without gradient.  Returns out (compute dtype) and lse.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, call: _Call):
        acc = compute_dtype(q.dtype)
        out, lse = _forward(q.to(acc) * call.scale, k.to(acc), v.to(acc), mask, call.pattern, call.block,
                            want_lse=True, batched=False)
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.call = call
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, mask, out, lse = ctx.saved_tensors
        call: _Call = ctx.call
        acc = compute_dtype(q.dtype)
        if torch.is_grad_enabled():  # create_graph=True: differentiate a plain-autograd recomputation
            inputs = [t for t in (q, k, v) if t.requires_grad]
            out2, lse2 = _forward(q.to(acc) * call.scale, k.to(acc), v.to(acc), mask, call.pattern, call.block,
                                  want_lse=True, batched=True)
            outs, grads_in = [out2], [dout]
            if dlse is not None:
                outs.append(torch.where(lse2 == NEG_INF, 0.0, lse2))
                grads_in.append(dlse)
            grads = iter(torch.autograd.grad(outs, inputs, grads_in, create_graph=True, allow_unused=True))
            return (*[next(grads) if t.requires_grad else None for t in (q, k, v)], None, None)
        if dlse is not None:
            dlse = torch.where(lse == NEG_INF, 0.0, dlse)
        dq, dk, dv = _backward(q.to(acc) * call.scale, k.to(acc), v.to(acc), mask, call.pattern, call.block,
                               out, lse, dout.to(acc), dlse)
        return (dq * call.scale).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def _local(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, p: LocalPattern, block: int, scale: float,
           want_lse: bool) -> tuple[Tensor, Tensor | None]:
    """Grouped q, k, v in any float dtype -> out (*lead, N, Dv) and lse (*lead, N) in the
    compute dtype.  With gradients: the recomputing autograd Function, or plain autograd
    over one batched run when a float mask needs its gradient too."""
    acc = compute_dtype(q.dtype)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if mask is not None and mask.requires_grad and torch.is_grad_enabled():
        return _forward(q.to(acc) * scale, k.to(acc), v.to(acc), mask, p, block, want_lse, batched=True)
    if needs_grad:
        out, lse = _LocalAttention.apply(q, k, v, mask, _Call(p, block, scale))
        return out, lse if want_lse else None
    return _forward(q.to(acc) * scale, k.to(acc), v.to(acc), mask, p, block, want_lse, batched=False)


def local_band_stats(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, pattern: LocalPattern, scale: float,
    block: int | None = None,
) -> BandStats:
    """Softmax statistics of Local's pattern, per query, computed block by block.

    Args:
        q: (*b, Hkv, G, N, D) grouped queries (:meth:`AttentionInputs.grouped`), any float dtype.
        k: (*b, Hkv, 1, S, D) grouped keys.
        v: (*b, Hkv, 1, S, Dv) grouped values.
        mask: grouped user mask (bool True = attend, or float added) or None.
        pattern: the window / sinks / global tokens / causal pattern; global query rows
            [0, G) cover every key, so their statistics are exact attention.
        scale: the softmax scale.
        block: query rows per block (None: :func:`choose_block`).

    Returns:
        :class:`BandStats` (m, l (*b, Hkv, G, N); acc (*b, Hkv, G, N, Dv)) in fp32,
        fp64 for fp64 inputs.  The band's output is ``acc / l`` (0 where l = 0).
    """
    out, lse = _local(q, k, v, mask, pattern, choose_block(pattern.window, block), scale, want_lse=True)
    empty = lse == NEG_INF
    m = torch.where(empty, 0.0, lse).detach()
    l = torch.where(empty, 0.0, torch.exp(lse - m))  # 1 or 0 in value; the gradient of lse under autograd
    if not l.requires_grad:  # out is already 0 where l is: skip a pass over (N, Dv)
        return BandStats(m, l, out)
    return BandStats(m, l, out * l[..., None])


@register
@dataclass(frozen=True)
class Local(Method):
    """Sliding-window attention with global tokens and attention sinks, computed block-sparse.

    Query i attends (see :class:`LocalPattern` for the exact definition and a picture):

    * its window: bidirectional, the ``window`` keys centred on i (W//2 before, (W-1)//2
      after, sliding inwards at the sequence ends so every query sees min(W, S) keys);
      causal, the previous W keys ``i - W < j <= i``;
    * the first ``sinks`` keys (StreamingLLM attention sinks);
    * the first ``global_tokens`` keys, and if ``i < global_tokens`` every key
      (Longformer/BigBird global tokens);
    * always subject to ``attn_mask`` and, when causal, ``j <= i``.

    Equivalent to::

        reference_attention(q, k, v, local_mask(N, S, window, global_tokens, sinks, causal) & attn_mask)

    A window >= S (causal: >= N) is exact attention.  Cost O(N·(W + block + sinks)·D +
    G·S·D) time; memory O(N·D) plus a chunk of scores, forward and backward (a
    recomputing backward); no N x S tensor.

    Args:
        window: W >= 1, keys per query in its window.
        global_tokens: G >= 0, leading positions that attend everywhere and are seen by all.
        sinks: s >= 0, leading keys every query sees.
        block: queries per block (None: 64, down to 16 for windows under 64).

    References:
        Beltagy et al. 2020 (Longformer); Zaheer et al. 2020 (BigBird); Xiao et al. 2024
        (attention sinks).
    """

    window: int = 512
    global_tokens: int = 0
    sinks: int = 0
    block: int | None = None

    name: ClassVar[str] = "local"
    capabilities: ClassVar[Capabilities] = Capabilities(
        exact=False, dropout=False, double_backward=True, returns_weights=False
    )

    def __post_init__(self):
        for field, low in (("window", 1), ("global_tokens", 0), ("sinks", 0)):
            self.check_int(field, low)
        self.check_int("block", 1, optional=True)

    def pattern(self, n: int, s: int, is_causal: bool) -> LocalPattern:
        return LocalPattern(n, s, self.window, self.global_tokens, self.sinks, is_causal)

    def forward(self, inp, *, need_weights=False, average_weights=False, state=None):
        q, k, v, mask = inp.grouped()
        pattern = self.pattern(inp.n, inp.s, inp.is_causal)
        out, _ = _local(q, k, v, mask, pattern, choose_block(self.window, self.block), inp.scale, want_lse=False)
        return inp.ungroup(out).to(inp.dtype), None

    def flops(self, shape: Shape) -> float:
        """2·B·Hq·(D + Dv)·(pairs scored): every block's rows times the keys it gathers."""
        p = self.pattern(shape.n, shape.s, shape.is_causal)
        block = choose_block(self.window, self.block)
        pairs = sum((b.i1 - b.i0) * b.keys for b in plan_blocks(p, block, max(1, shape.n)))
        return 2.0 * shape.batch * shape.hq * pairs * (shape.d + shape.dv)

    def implied_weights(self, inp, state=None):
        _, w = naive_local(
            inp.q.double(), inp.k.double(), inp.v.double(), inp.attn_mask, inp.is_causal, inp.scale,
            window=self.window, global_tokens=self.global_tokens, sinks=self.sinks, need_weights=True,
        )
        return w
