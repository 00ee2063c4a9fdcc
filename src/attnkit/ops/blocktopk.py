"""Query-aware block top-k attention: a local window, sinks, and the key blocks each query
block is most likely to need, chosen per head from cheap per-block key bounds.

Keys are cut into blocks of ``block`` (Bk) keys and queries into blocks of the same size.
Each query block keeps (1) its window blocks: the consecutive key blocks holding every
key of its queries' :class:`~attnkit.ops.local.Local` windows, (2) the sink blocks
holding the first ``sinks`` keys, and (3) the ``topk`` other key blocks with the highest
Quest score (Tang et al. 2024): with ``kmax``/``kmin`` the elementwise max/min of a
block's keys, ``score(q) = sum_d max(q_d·kmax_d, q_d·kmin_d)``, an upper bound of
``q·k`` over the block, computed as ``relu(q)·kmax + min(q, 0)·kmin`` (two matmuls).
The query block is represented by its mean query (``score="mean"``) or scored by the
max over its queries (``score="max"``, N/Bk times dearer).  Attention over the kept
blocks is then exact: keys and values of the window come as a strided view, those of
the selected blocks are gathered with one ``index_select`` per chunk of query blocks,
and one fp32 softmax runs over them.  The selection is not differentiable (indices);
gradients flow through the attention over the kept blocks, by a FlashAttention-2-style
backward that recomputes each chunk's scores from the saved log-sum-exp (training
memory O(N·D) plus one chunk).

Cost: O(N·(W + Bk + (K + sinks/Bk)·Bk)·D) for the attention and O((N/Bk)²·D) for the
selection (``score="max"``: O(N·(N/Bk)·D) time and N·N/Bk memory, for analysis).  When
K·Bk + W >= S every block is kept and the result is exact attention.

Causal: no output depends on a later key or value, but a query block is scored by all
of its queries (the mean, or the max), so row i's *selection* can depend on queries up
to Bk - 1 positions later -- harmless for prefill and inference, a small leak for
training a causal model.  With GQA each query head selects its own blocks.

References:
    Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference", ICML 2024.
    Jiang et al., "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via
    Dynamic Sparse Attention", NeurIPS 2024.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.capabilities import Capabilities, Method
from ..core.inputs import AttentionInputs, Shape
from ..core.reference import math_attention
from ..core.registry import register
from .local import combine_masks, softmax_lastdim
from .tiled import compute_dtype

__all__ = ["BlockTopK", "BlockLayout", "Selection", "select_blocks", "selection_mask", "kept_keys", "naive_blocktopk"]

NEG_INF = float("-inf")
_CHUNK_TARGET = 1 << 20  # scores per chunk of query blocks


@dataclass(frozen=True)
class BlockLayout:
    """Where the blocks are: query blocks b and key blocks c of ``bk`` positions each.

    Window blocks of query block b are ``[lo(b), lo(b) + nwin)``: a fixed number of
    consecutive key blocks, shifted inwards at the sequence ends, that hold every key of
    the Local window (same ``window``, same definition) of each of b's queries.
    Sink blocks are ``[0, nsink)`` with ``nsink = ceil(sinks / bk)``.
    """

    n: int
    s: int
    bk: int
    window: int
    sinks: int
    causal: bool

    @property
    def nqb(self) -> int:
        return -(-self.n // self.bk)

    @property
    def nkb(self) -> int:
        return -(-self.s // self.bk)

    @property
    def _offsets(self) -> tuple[int, int]:
        """(first, last) window block of query block b, relative to b, before clamping."""
        if self.causal:  # keys i - W < j <= i
            return (1 - self.window) // self.bk, 0
        h = self.window // 2  # keys [i - W//2, i - W//2 + W) for i in the block
        return -h // self.bk, (self.bk - 2 - h + self.window) // self.bk

    @property
    def nwin(self) -> int:
        first, last = self._offsets
        return min(last - first + 1, self.nkb)

    @property
    def nsink(self) -> int:
        return min(-(-self.sinks // self.bk), self.nkb)

    def lo(self, b: int) -> int:
        return min(max(b + self._offsets[0], 0), self.nkb - self.nwin)

    def los(self) -> list[int]:
        return [self.lo(b) for b in range(self.nqb)]


class Selection(NamedTuple):
    """The blocks each query block keeps beyond its window.

    extra: (*lead, nqb, E) long key-block indices (sink blocks, then the top-k), E =
        nsink + min(topk, nkb); extra_ok: (*lead, nqb, E) bool, False for slots that are
        unused (fewer candidates than topk) or sink blocks already in the window.
    """

    extra: Tensor
    extra_ok: Tensor


def _pad_len(x: Tensor, length: int, value: float | bool = 0) -> Tensor:
    """Pad dim -2 of x (…, L, D) to ``length`` rows."""
    if x.shape[-2] == length:
        return x
    return F.pad(x, (0, 0, 0, length - x.shape[-2]), value=value)


def _key_keep(layout: BlockLayout, keep: Tensor | None, device: torch.device) -> Tensor | None:
    """Bool (…', nkb·bk) visible keys: within S and not padded; None when all are."""
    length = layout.nkb * layout.bk
    if keep is None:
        if length == layout.s:
            return None
        return torch.arange(length, device=device) < layout.s
    keep = keep.squeeze(-2)  # (*b', Hkv|1, G|1, S)
    return F.pad(keep, (0, length - layout.s), value=False)


@torch.no_grad()
def select_blocks(q: Tensor, k: Tensor, keep: Tensor | None, layout: BlockLayout, topk: int, score: str) -> Selection:
    """Choose the top-k key blocks per query block and head by the Quest bound.

    Args:
        q: (*b, Hkv, G, N, D) grouped queries (scaled or not: the ranking is the same).
        k: (*b, Hkv, 1, S, D) grouped keys.
        keep: grouped key-padding keep mask (*b', Hkv|1, G|1, 1, S) or None.
        layout: the block geometry.
        topk: K, blocks chosen beyond the window and sinks.
        score: "mean" (the block's mean query) or "max" (max over its queries).
    """
    bk, nqb, nkb = layout.bk, layout.nqb, layout.nkb
    dev = q.device
    kk = _pad_len(k, nkb * bk).unflatten(-2, (nkb, bk))  # (*b, Hkv, 1, nkb, bk, D)
    valid = _key_keep(layout, keep, dev)
    if valid is not None:
        vmask = valid.unflatten(-1, (nkb, bk))[..., None]  # (…', nkb, bk, 1)
        kmax = kk.masked_fill(~vmask, NEG_INF).amax(dim=-2)
        kmin = kk.masked_fill(~vmask, float("inf")).amin(dim=-2)
        block_ok = vmask.squeeze(-1).any(dim=-1)  # (…', nkb)
        kmax = kmax.masked_fill(~block_ok[..., None], 0.0)  # empty blocks: finite, scored -inf below
        kmin = kmin.masked_fill(~block_ok[..., None], 0.0)
    else:
        kmax, kmin, block_ok = kk.amax(dim=-2), kk.amin(dim=-2), None  # (*b, Hkv, 1, nkb, D)
    if score == "mean":
        qq = _pad_len(q, nqb * bk).unflatten(-2, (nqb, bk))  # (*b, Hkv, G, nqb, bk, D)
        counts = torch.full((nqb, 1), float(bk), dtype=q.dtype, device=dev)
        counts[-1] = layout.n - (nqb - 1) * bk
        qr = qq.sum(dim=-2) / counts  # (*b, Hkv, G, nqb, D)
        sc = qr.clamp(min=0) @ kmax.transpose(-1, -2) + qr.clamp(max=0) @ kmin.transpose(-1, -2)
    else:
        per_q = q.clamp(min=0) @ kmax.transpose(-1, -2) + q.clamp(max=0) @ kmin.transpose(-1, -2)  # (…, N, nkb)
        sc = _pad_len(per_q, nqb * bk, NEG_INF).unflatten(-2, (nqb, bk)).amax(dim=-2)  # (…, nqb, nkb)
    # Candidates: not a window or sink block, not wholly in the future, not empty.
    c = torch.arange(nkb, device=dev)
    b = torch.arange(nqb, device=dev)[:, None]
    lo = torch.tensor(layout.los(), device=dev)[:, None]
    in_window = (c >= lo) & (c < lo + layout.nwin)  # (nqb, nkb)
    # Causal: blocks wholly in the future are never kept.  No kept extra block is
    # partly in the future: that is only the diagonal block, always a window block.
    if layout.causal:
        future = c * bk > torch.clamp((b + 1) * bk, max=layout.n) - 1
    else:
        future = torch.zeros((), dtype=torch.bool, device=dev)
    taken = in_window | future | (c < layout.nsink)
    sc = sc.masked_fill(taken, NEG_INF)
    if block_ok is not None:
        sc = sc.masked_fill(~block_ok.unsqueeze(-2), NEG_INF)
    kk_ = min(topk, nkb)
    val, idx = sc.topk(kk_, dim=-1, sorted=False) if kk_ > 0 else (sc[..., :0], sc[..., :0].long())
    sinks = torch.arange(layout.nsink, device=dev).expand(*idx.shape[:-1], layout.nsink)
    sink_ok = ~(in_window | future)[:, : layout.nsink].expand(*idx.shape[:-1], layout.nsink)
    return Selection(torch.cat([sinks, idx], dim=-1), torch.cat([sink_ok, val > NEG_INF], dim=-1))


def selection_mask(layout: BlockLayout, sel: Selection) -> Tensor:
    """Dense bool (*lead, N, S) of the kept keys (window and extra blocks, causal cut).

    Materialises N x S: the naive path and implied weights only.
    """
    nkb, bk = layout.nkb, layout.bk
    dev = sel.extra.device
    c = torch.arange(nkb, device=dev)
    lo = torch.tensor(layout.los(), device=dev)[:, None]
    blocks = (c >= lo) & (c < lo + layout.nwin)  # (nqb, nkb)
    # scatter_add, not scatter_: an unused slot may repeat a used block's index.
    hits = torch.zeros((*sel.extra.shape[:-1], nkb), dtype=torch.int32, device=dev)
    extra = hits.scatter_add_(-1, sel.extra, sel.extra_ok.to(torch.int32)) > 0
    blocks = blocks | extra
    dense = blocks.repeat_interleave(bk, dim=-2).repeat_interleave(bk, dim=-1)[..., : layout.n, : layout.s]
    if layout.causal:
        i = torch.arange(layout.n, device=dev)[:, None]
        dense = dense & (torch.arange(layout.s, device=dev)[None, :] <= i)
    return dense


def naive_blocktopk(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
    scale: float | None = None, *, window: int, block: int = 64, topk: int = 8, sinks: int = 0,
    score: str = "mean", need_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Block top-k attention, materialised: the oracle of the fast path.

    Equivalent to::

        sel = select_blocks(q, k, key_keep, layout, topk, score)    # which blocks
        keep = selection_mask(layout, sel)                          # (…, N, S) bool
        softmax(q @ k.T * scale + where(keep & attn_mask, 0, -inf)) @ v

    computed in fp32 (fp64 for fp64 inputs).

    Returns:
        out (*batch, Hq, N, Dv) in q's dtype, and the probabilities (*batch, Hq, N, S)
        when ``need_weights``.
    """
    from ..core.inputs import prepare_inputs

    inp = prepare_inputs(q, k, v, attn_mask, 0.0, is_causal, scale)
    keep = kept_keys(inp, BlockLayout(inp.n, inp.s, block, window, sinks, is_causal), topk, score)
    inp = AttentionInputs(q, k, v, combine_masks(attn_mask, keep), 0.0, is_causal, inp.scale)
    out, w = math_attention(inp, compute_dtype(q.dtype), need_weights=need_weights)
    return (out, w) if need_weights else out


def kept_keys(inp: AttentionInputs, layout: BlockLayout, topk: int, score: str) -> Tensor:
    """Dense bool (*batch, Hq, N, S): the keys each query keeps, selected exactly as the
    fast path selects them (in the compute dtype of ``inp``)."""
    acc = compute_dtype(inp.dtype)
    gq, gk, _, _ = inp.grouped()
    sel = select_blocks(gq.to(acc) * inp.scale, gk.to(acc), inp.key_keep(), layout, topk, score)
    return inp.ungroup(selection_mask(layout, sel).expand(*gq.shape[:-2], inp.n, inp.s))


def choose_chunk(lead: int, bk: int, slots: int) -> int:
    """Query blocks per chunk: about 2^20 scores, at least one."""
    return max(1, _CHUNK_TARGET // max(1, lead * bk * slots * bk))


class _Gathered:
    """The kept keys and values of chunks of query blocks, for the forward and the backward.

    Window blocks come as a strided view of k (consecutive windows: no copy; the few
    shifted in at the sequence ends are copied), the extra blocks with one
    ``index_select`` per chunk from a flat (blocks, bk·D) view.
    """

    def __init__(self, qs: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, layout: BlockLayout, sel: Selection):
        bk, nqb, nkb, nwin = layout.bk, layout.nqb, layout.nkb, layout.nwin
        self.layout, self.sel, self.device = layout, sel, qs.device
        self.e = e = sel.extra.shape[-1]
        self.lead = lead = torch.broadcast_shapes(qs.shape[:-2], k.shape[:-2])
        self.kp, self.vp = _pad_len(k, nkb * bk), _pad_len(v, nkb * bk)  # (*b, Hkv, 1, nkb·bk, D)
        self.kwin = self.kp.unfold(-2, nwin * bk, bk)  # (*b, Hkv, 1, nkb-nwin+1, D, nwin·bk): a view
        self.vwin = self.vp.unfold(-2, nwin * bk, bk).transpose(-1, -2)  # (…, nkb-nwin+1, nwin·bk, Dv)
        kv_lead = k.shape[:-3]  # (*b, Hkv)
        nl = math.prod(kv_lead)
        self.kflat = self.kp.reshape(nl * nkb, bk * k.shape[-1])
        self.vflat = self.vp.reshape(nl * nkb, bk * v.shape[-1])
        self.gidx = sel.extra + (torch.arange(nl, device=self.device) * nkb).view(*kv_lead, 1, 1, 1)  # (…, nqb, E)
        valid = _key_keep(layout, keep, self.device)  # (…', nkb·bk) or None
        # Which gathered keys are visible: a used slot, within S, not padded.
        ok_e = sel.extra_ok[..., None].expand(*sel.extra_ok.shape, bk)  # (…, nqb, E, bk)
        if valid is not None:
            vb = valid.unflatten(-1, (nkb, bk)).expand(*lead, nkb, bk)
            ok_e = ok_e & torch.gather(vb, -2, sel.extra.flatten(-2)[..., None].expand(*lead, nqb * e, bk)).view(ok_e.shape)
        self.ok_e = ok_e.flatten(-2)  # (…, nqb, E·bk)
        self.valid_win = valid.unfold(-1, nwin * bk, bk) if valid is not None else None  # (…', nkb-nwin+1, nwin·bk)
        self.los = layout.los()
        self.may_be_empty = keep is not None

    def chunk(self, b0: int, b1: int):
        """Keys, values and visibility of query blocks [b0, b1): kw (…, C, D, nwin·bk) (keys
        transposed), vw (…, C, nwin·bk, Dv), ke (…, C, E·bk, D), ve, and the masks of both."""
        lay, los, dev = self.layout, self.los, self.device
        bk, nwin = lay.bk, lay.nwin
        if los[b1 - 1] - los[b0] == b1 - 1 - b0:  # consecutive windows: a slice of the view
            sl = slice(los[b0], los[b0] + b1 - b0)
            kw, vw = self.kwin[..., sl, :, :], self.vwin[..., sl, :, :]
            vw_keep = self.valid_win[..., sl, :] if self.valid_win is not None else None
        else:  # windows shifted inwards at the ends: copy those few
            ix = torch.tensor(los[b0:b1], device=dev)
            kw, vw = self.kwin.index_select(-3, ix), self.vwin.index_select(-3, ix)
            vw_keep = self.valid_win.index_select(-2, ix) if self.valid_win is not None else None
        g = self.gidx[..., b0:b1, :].reshape(-1)
        shape = (*self.gidx.shape[:-2], b1 - b0, self.e * bk)
        ke = self.kflat.index_select(0, g).view(*shape, self.kp.shape[-1])  # (*b, Hkv, G, C, E·bk, D)
        ve = self.vflat.index_select(0, g).view(*shape, self.vp.shape[-1])
        win_ok = vw_keep[..., None, :] if vw_keep is not None else None  # (…', C, 1, nwin·bk)
        if lay.causal:
            rows = (torch.arange(b0, b1, device=dev) * bk)[:, None, None] + torch.arange(bk, device=dev)[:, None]
            cols = (torch.tensor(los[b0:b1], device=dev) * bk)[:, None, None] + torch.arange(nwin * bk, device=dev)
            causal = cols <= rows  # (C, bk, nwin·bk)
            win_ok = causal if win_ok is None else win_ok & causal
        return kw, vw, ke, ve, win_ok, self.ok_e[..., b0:b1, None, :]

    def put_back(self, b0: int, b1: int, dk: Tensor, dk_win: Tensor, dk_e: Tensor) -> None:
        """Add gradients of the chunk's window keys (…, G, C, nwin·bk, D) and extra keys
        (…, G, C, E·bk, D) into dk (*b, Hkv, 1, nkb, bk, D) (also used for values)."""
        bk, nwin = self.layout.bk, self.layout.nwin
        c = b1 - b0
        d = dk.shape[-1]
        dk_win = dk_win.sum_to_size((*dk.shape[:-3], c, nwin * bk, d)).unflatten(-2, (nwin, bk))
        lo = torch.tensor(self.los[b0:b1], device=self.device)
        for t in range(nwin):  # window slot t of block b is key block lo(b) + t
            dk.index_add_(-3, lo + t, dk_win[..., t, :, :])
        dk.view(-1, bk * d).index_add_(0, self.gidx[..., b0:b1, :].reshape(-1), dk_e.reshape(-1, bk * d))


def _chunk_scores(qc: Tensor, kw: Tensor, ke: Tensor, win_ok: Tensor | None, e_ok: Tensor) -> tuple[Tensor, Tensor]:
    s_w = torch.matmul(qc, kw)  # (*b, Hkv, G, C, bk, nwin·bk)
    s_e = torch.matmul(qc, ke.transpose(-1, -2))  # (*b, Hkv, G, C, bk, E·bk)
    if win_ok is not None:
        s_w.masked_fill_(~win_ok, NEG_INF)
    s_e.masked_fill_(~e_ok, NEG_INF)
    return s_w, s_e


def _forward(qs: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, layout: BlockLayout, sel: Selection,
             want_lse: bool, batched: bool) -> tuple[Tensor, Tensor | None]:
    """The gathered attention.  qs (*b, Hkv, G, N, D) scaled, k (*b, Hkv, 1, S, D),
    v (*b, Hkv, 1, S, Dv) in the compute dtype; keep the grouped key-padding mask or None.

    Returns out (*b, Hkv, G, N, Dv) and, when ``want_lse``, the log-sum-exp of each row's
    kept scores (*b, Hkv, G, nqb·bk), -inf where a row keeps no key.  ``batched``: all
    query blocks in one step (the plain-autograd path: per-chunk slices of the key views
    would each cost a full-size zero tensor in the backward).
    """
    bk, nqb, nwin = layout.bk, layout.nqb, layout.nwin
    gat = _Gathered(qs, k, v, keep, layout, sel)
    qb = _pad_len(qs, nqb * bk).unflatten(-2, (nqb, bk))  # (*b, Hkv, G, nqb, bk, D)
    chunk = nqb if batched else choose_chunk(math.prod(gat.lead), bk, nwin + gat.e)
    outs, lses = [], []
    for b0 in range(0, nqb, chunk):
        b1 = min(b0 + chunk, nqb)
        kw, vw, ke, ve, win_ok, e_ok = gat.chunk(b0, b1)
        s_w, s_e = _chunk_scores(qb[..., b0:b1, :, :], kw, ke, win_ok, e_ok)
        sc = torch.cat([s_w, s_e], dim=-1)
        row_ok = None
        if gat.may_be_empty:
            w_any = win_ok.any(dim=-1, keepdim=True) if win_ok is not None else torch.ones((), dtype=torch.bool, device=sc.device)
            row_ok = w_any | e_ok.any(dim=-1, keepdim=True)
            sc.masked_fill_(~row_ok, 0.0)
        # split, not slicing: a slice's backward zero-fills a tensor the size of p.
        p_w, p_e = softmax_lastdim(sc).split([nwin * bk, gat.e * bk], dim=-1)
        out = torch.matmul(p_w, vw) + torch.matmul(p_e, ve)  # (…, C, bk, Dv)
        lse = torch.logsumexp(sc, dim=-1) if want_lse else None  # (…, C, bk)
        if row_ok is not None:
            out = out * row_ok
            lse = lse.masked_fill(~row_ok.squeeze(-1), NEG_INF) if want_lse else None
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs, dim=-3).flatten(-3, -2)[..., : layout.n, :]  # (*b, Hkv, G, N, Dv)
    return out, torch.cat(lses, dim=-2).flatten(-2) if want_lse else None


def _backward(qs: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, layout: BlockLayout, sel: Selection,
              out: Tensor, lse: Tensor, dout: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """FlashAttention-2-style backward over the forward's chunks: scores recomputed from
    the saved lse, gradients added in place.  Returns dqs (w.r.t. the scaled queries), dk, dv."""
    bk, nqb, nkb, nwin = layout.bk, layout.nqb, layout.nkb, layout.nwin
    gat = _Gathered(qs, k, v, keep, layout, sel)
    qb = _pad_len(qs, nqb * bk).unflatten(-2, (nqb, bk))  # (*b, Hkv, G, nqb, bk, D)
    dob = _pad_len(dout, nqb * bk).unflatten(-2, (nqb, bk))
    delta = _pad_len((dout * out).sum(dim=-1, keepdim=True), nqb * bk).unflatten(-2, (nqb, bk))  # (…, nqb, bk, 1)
    lse = torch.where(lse == NEG_INF, float("inf"), lse).unflatten(-1, (nqb, bk))[..., None]  # no key: P = 0
    dq = torch.zeros_like(qb)
    dk = k.new_zeros((*k.shape[:-2], nkb, bk, k.shape[-1]))  # (*b, Hkv, 1, nkb, bk, D)
    dv = v.new_zeros((*v.shape[:-2], nkb, bk, v.shape[-1]))
    chunk = choose_chunk(math.prod(gat.lead), bk, nwin + gat.e)
    for b0 in range(0, nqb, chunk):
        b1 = min(b0 + chunk, nqb)
        kw, vw, ke, ve, win_ok, e_ok = gat.chunk(b0, b1)
        qc, doc = qb[..., b0:b1, :, :], dob[..., b0:b1, :, :]
        s_w, s_e = _chunk_scores(qc, kw, ke, win_ok, e_ok)
        p_w = s_w.sub_(lse[..., b0:b1, :, :]).exp_()
        p_e = s_e.sub_(lse[..., b0:b1, :, :]).exp_()
        ds_w = torch.matmul(doc, vw.transpose(-1, -2)).sub_(delta[..., b0:b1, :, :]).mul_(p_w)
        ds_e = torch.matmul(doc, ve.transpose(-1, -2)).sub_(delta[..., b0:b1, :, :]).mul_(p_e)
        dq[..., b0:b1, :, :] = torch.matmul(ds_w, kw.transpose(-1, -2)).add_(torch.matmul(ds_e, ke))
        gat.put_back(b0, b1, dk, torch.matmul(ds_w.transpose(-1, -2), qc), torch.matmul(ds_e.transpose(-1, -2), qc))
        gat.put_back(b0, b1, dv, torch.matmul(p_w.transpose(-1, -2), doc), torch.matmul(p_e.transpose(-1, -2), doc))
    dq = dq.flatten(-3, -2)[..., : layout.n, :]
    return dq, dk.flatten(-3, -2)[..., : layout.s, :], dv.flatten(-3, -2)[..., : layout.s, :]


@dataclass(frozen=True)
class _Call:
    """The non-tensor arguments of one BlockTopK attention call (one object for autograd)."""

    layout: BlockLayout
    scale: float


class _BlockTopKAttention(torch.autograd.Function):
    """Attention over the selected blocks with a recomputing backward: saves q, k, v, the
    selection, the output and the lse -- O(N·D) -- instead of every block's probabilities
    and gathered keys.  q (*b, Hkv, G, N, D), k, v (*b, Hkv, 1, S, ·) grouped."""

    @staticmethod
    def forward(ctx, q, k, v, keep, extra, extra_ok, call: _Call):
        acc = compute_dtype(q.dtype)
        sel = Selection(extra, extra_ok)
        out, lse = _forward(q.to(acc) * call.scale, k.to(acc), v.to(acc), keep, call.layout, sel, want_lse=True,
                            batched=False)
        ctx.save_for_backward(q, k, v, keep, extra, extra_ok, out, lse)
        ctx.call = call
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, keep, extra, extra_ok, out, lse = ctx.saved_tensors
        call: _Call = ctx.call
        acc = compute_dtype(q.dtype)
        sel = Selection(extra, extra_ok)
        if torch.is_grad_enabled():  # create_graph=True: differentiate a plain-autograd recomputation
            inputs = [t for t in (q, k, v) if t.requires_grad]
            out2, _ = _forward(q.to(acc) * call.scale, k.to(acc), v.to(acc), keep, call.layout, sel, want_lse=False,
                               batched=True)
            grads = iter(torch.autograd.grad(out2, inputs, dout, create_graph=True, allow_unused=True))
            return (*[next(grads) if t.requires_grad else None for t in (q, k, v)], None, None, None, None)
        dq, dk, dv = _backward(q.to(acc) * call.scale, k.to(acc), v.to(acc), keep, call.layout, sel, out, lse,
                               dout.to(acc))
        return (dq * call.scale).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


@register
@dataclass(frozen=True)
class BlockTopK(Method):
    """Query-aware dynamic block-sparse attention (Quest / MInference style), training-free.

    Per query block (``block`` queries) and head: the window blocks (every key of
    :class:`~attnkit.ops.local.Local`'s window of the same ``window``, in whole blocks),
    the sink blocks (the first ``sinks`` keys, in whole blocks), and the ``topk`` other
    key blocks with the highest Quest bound ``relu(q)·kmax + min(q, 0)·kmin``; exact
    softmax attention over those blocks only.  Causal: future blocks are never
    selected and the diagonal blocks are masked (the selection itself uses the whole
    query block, see the module notes).  K·Bk + W >= S gives exact attention.

    Equivalent to ``naive_blocktopk(q, k, v, ...)``: attention with the dense mask of
    the selected blocks (see :func:`selection_mask`).

    Args:
        window: W >= 1, the Local window every query keeps.
        block: Bk >= 1, keys per key block and queries per query block.
        topk: K >= 0, key blocks chosen per query block beyond the window and sinks.
        sinks: s >= 0, leading keys always kept (as ceil(s/Bk) whole blocks).
        score: how a query block scores a key block: "mean" (the Quest bound of its
            mean query, O((N/Bk)²·D), default: lower error on the tests' inputs) or
            "max" (the max of its queries' bounds, O(N·(N/Bk)·D)).

    References:
        Tang et al. 2024 (Quest); Jiang et al. 2024 (MInference).
    """

    window: int = 512
    block: int = 64
    topk: int = 8
    sinks: int = 0
    score: str = "mean"

    name: ClassVar[str] = "blocktopk"
    capabilities: ClassVar[Capabilities] = Capabilities(
        exact=False, full_masks=False, dropout=False, double_backward=True, returns_weights=False
    )

    def __post_init__(self):
        for field, low in (("window", 1), ("block", 1), ("topk", 0), ("sinks", 0)):
            self.check_int(field, low)
        self.check_choice("score", ("mean", "max"))

    def layout(self, n: int, s: int, is_causal: bool) -> BlockLayout:
        return BlockLayout(n, s, self.block, self.window, self.sinks, is_causal)

    def forward(self, inp, *, need_weights=False, average_weights=False, state=None):
        if inp.n == 0 or inp.s == 0:
            return inp.q.new_zeros((*inp.q.shape[:-1], inp.dv)), None
        q, k, v, _ = inp.grouped()
        acc = compute_dtype(inp.dtype)
        qs, k32, v32 = q.to(acc) * inp.scale, k.to(acc), v.to(acc)
        layout = self.layout(inp.n, inp.s, inp.is_causal)
        keep = inp.key_keep()
        sel = select_blocks(qs, k32, keep, layout, self.topk, self.score)
        if inp.requires_grad:
            out = _BlockTopKAttention.apply(q, k, v, keep, sel.extra, sel.extra_ok, _Call(layout, inp.scale))
        else:
            out, _ = _forward(qs, k32, v32, keep, layout, sel, want_lse=False, batched=False)
        return inp.ungroup(out).to(inp.dtype), None

    def selection_flops(self, shape: Shape) -> float:
        """The block scoring: two (rows x D) @ (D x nkb) products per head."""
        lay = self.layout(shape.n, shape.s, shape.is_causal)
        rows = lay.nqb if self.score == "mean" else shape.n
        return 2.0 * shape.batch * shape.hq * rows * lay.nkb * 2 * shape.d

    def flops(self, shape: Shape) -> float:
        """Attention over the kept blocks, 2·B·Hq·(D + Dv)·(nqb·Bk)·(nwin + nsink + K)·Bk,
        plus :meth:`selection_flops`, 2·B·Hq·(N/Bk)·(S/Bk)·2D."""
        lay = self.layout(shape.n, shape.s, shape.is_causal)
        slots = lay.nwin + lay.nsink + min(self.topk, lay.nkb)
        attn = 2.0 * shape.batch * shape.hq * (shape.d + shape.dv) * lay.nqb * lay.bk * slots * lay.bk
        return attn + self.selection_flops(shape)

    def implied_weights(self, inp, state=None):
        # Select in the inputs' own compute dtype (as forward does), then weigh in fp64.
        keep = kept_keys(inp, self.layout(inp.n, inp.s, inp.is_causal), self.topk, self.score)
        inp64 = AttentionInputs(inp.q.double(), inp.k.double(), inp.v.double(), combine_masks(inp.attn_mask, keep),
                                0.0, inp.is_causal, inp.scale)
        return math_attention(inp64, torch.float64, need_weights=True)[1]
