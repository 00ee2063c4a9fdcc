"""KIVI-style quantized KV cache: keys per channel, values per token, integers packed.

Reference: Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache",
ICML 2024.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from transformers.cache_utils import Cache

from .native import CODES_PER_ROW, dq_matmul
from .quant import BITS, FUSED_MAX_ROWS, SCALES, code_matmul, code_order, dequantize, fused, quantize_packed, unpack, unpack_bytes
from .keyplan import KeyLayout, as_plan
from .layer import HeldTensorsLayer
from .valuechannels import ValueChannels
from .views import CacheView, OnlineSoftmax, Snapshot, new_token_keep

__all__ = ["QuantizedCache", "QuantizedLayer", "QuantizedSnapshot"]

DEFAULT_BLOCK = 1024  # cached tokens dequantized per step of the attention (a multiple of the group)
TWO_PASS_MAX = 1 << 20  # scores (B·H·rows·keys) up to which a call takes the two-pass path (4 MiB fp32)


class QuantizedSnapshot(Snapshot):
    """A :class:`QuantizedLayer`'s contents before one update, plus the new tokens.

    Tokens [0, P) are cached: the first S (the sinks, S <= ``sinks``) in full precision.
    The packed part starts at token a0 = G·floor(S/G), so that key groups stay aligned to
    multiples of G whatever S is (at P = k·G no key waits for its group): key group g
    holds tokens [a0 + g·G, a0 + (g+1)·G), value row t token a0 + t, with keys [0, nG·G)
    and values [0, Lv) packed (Lv >= nG·G), the rest up to P in full precision.  The first
    ``lead`` = S − a0 slots of the packed part are the sinks' places: placeholders (the
    first group's mean as keys, the sinks' values quantized), never attended -- the exact
    sinks are.  Tokens [P, P + N) are the new ones, in full precision.
    """

    def __init__(self, layer: QuantizedLayer, k_new: Tensor, v_new: Tensor):
        self.bits, self.group, self.vgroup, self.block = layer.bits, layer.group_size, layer.vgroup, layer.block
        self.layout = layer.layout  # None: every key channel at ``bits``; else the plan's layout
        if self.layout is None:
            self.kc, self.ks, self.kl = layer.key_codes, layer.key_scale, layer.key_low  # (B, H, nG, D, ·)
            self.ngroups = self.kc.shape[2]
        else:
            self.kheld = {name: getattr(layer, name) for name in self.layout.names()}  # (B, nG, E, ·) each
            self.ngroups = next(iter(self.kheld.values())).shape[1]
        self.vc, self.vs, self.vl = layer.value_codes, layer.value_scale, layer.value_low  # (B, H, Lv, ng, ·)
        self.apart = layer.apart  # None, or the value channels held apart (then their slots in vc are placeholders)
        self.vheld = {} if self.apart is None else {name: getattr(layer, name) for name in self.apart.names()}
        self.kr, self.vr = layer.key_residual, layer.value_residual  # (B, H, ·, D), (B, H, ·, Dv)
        self.sk, self.sv = layer.sink_keys, layer.sink_values  # (B, H, S, D), (B, H, S, Dv)
        self.offset = self.sk.shape[-2]  # S
        self.start, self.lead = sink_layout(self.offset, self.group)  # a0, S − a0
        self.k_new, self.v_new = k_new, v_new
        self.batch, self.heads, n, self.head_dim = k_new.shape
        self.value_dim = v_new.shape[-1]
        self.cached = layer.seen
        self.length = self.cached + n
        self.dtype, self.device = k_new.dtype, k_new.device

    # -- dequantization, one block at a time -----------------------------------------

    def keys(self, g0: int, g1: int) -> Tensor:
        """Key groups [g0, g1) dequantized: (B, H, (g1−g0)·G, D) fp32."""
        if self.layout is not None:
            return self.layout.dequantize(self._held(g0, g1))
        codes = unpack(self.kc[:, :, g0:g1], self.bits, self.group)  # (B, H, nb, D, G)
        k = dequantize(codes, self.ks[:, :, g0:g1], self.kl[:, :, g0:g1])  # (B, H, nb, D, G)
        return k.transpose(-1, -2).reshape(self.batch, self.heads, -1, self.head_dim)  # (B, H, nb·G, D)

    def _held(self, g0: int, g1: int) -> dict[str, Tensor]:
        return {name: t[:, g0:g1] for name, t in self.kheld.items()}

    def values(self, t0: int, t1: int) -> Tensor:
        """Value rows [t0, t1) (t1 <= Lv) dequantized: (B, H, t1−t0, Dv) fp32."""
        codes = unpack(self.vc[:, :, t0:t1], self.bits, self.vgroup)  # (B, H, L, ng, Gv)
        v = dequantize(codes, self.vs[:, :, t0:t1], self.vl[:, :, t0:t1])  # (B, H, L, ng, Gv)
        v = v.flatten(-2)[..., : self.value_dim]  # (B, H, L, Dv)
        return v if self.apart is None else self.apart.put(v, self.apart.rows(self.vheld, t0, t1))

    def _with_apart(self, out: Tensor, p: Tensor, t0: int, t1: int) -> Tensor:
        """out (B, H, M, Dv) = p (B, H, M, t1−t0) times the packed value rows [t0, t1), with
        the held-apart channels' columns (products of placeholder codes) replaced by p times
        the held-apart rows (k channels: (B, H, t1−t0, k) dequantized, small next to the codes)."""
        if self.apart is None:
            return out
        return self.apart.put(out, self.apart.product(self.vheld, p, t0, t1))  # (B, H, M, k) put in

    def _tail(self) -> tuple[Tensor, Tensor]:
        """Keys and values of tokens [max(a0 + nG·G, S), P + N): the full-precision residual
        and the new tokens (and the packed values there)."""
        q_end = max(self.ngroups * self.group, self.lead)
        k = torch.cat([self.kr.float(), self.k_new.float()], dim=-2)
        v = torch.cat([self.values(q_end, self.vc.shape[2]), self.vr.float(), self.v_new.float()], dim=-2)
        return k, v

    # -- the fast path: scales folded into the products --------------------------------

    def _key_scores(self, qs: Tensor, g0: int, g1: int, rows=None) -> Tensor:
        """Scaled scores of qs (B, H, M, D) against key groups [g0, g1): (B, H, M, (g1−g0)·G).

        Σ_d q_d (low_d + s_d c_dt) = (q ⊙ s)·c_t + q·low per group: the codes are used as
        they unpack (:func:`code_matmul`); only the (M, W·k) scores are put back in token
        order.  Under a plan, ``rows`` are the layout's query rows (:meth:`KeyLayout.rows`),
        gathered once per call of :meth:`attend`."""
        if self.layout is not None:
            return self.layout.scores(rows, self._held(g0, g1), qs.shape[-2])
        s, low = self.ks[:, :, g0:g1].float(), self.kl[:, :, g0:g1].float()  # (B, H, nb, D)
        qsg = qs[:, :, None] * s[:, :, :, None, :]  # (B, H, nb, M, D)
        scores = code_matmul(qsg, self.kc[:, :, g0:g1], self.bits)[..., : self.group]  # (B, H, nb, M, G)
        scores += torch.matmul(low, qs.transpose(-1, -2))[..., None]  # + q·low: (B, H, nb, M, 1)
        b, h, nb, m, g = scores.shape
        return scores.transpose(2, 3).reshape(b, h, m, nb * g)  # (B, H, M, L)

    def _value_product(self, p: Tensor, t0: int, t1: int) -> Tensor:
        """p (B, H, M, L) times value rows [t0, t1): (B, H, M, Dv).

        Σ_t p_t (low_t + s_t c_t) = (p ⊙ s)·c + p·low per channel group, the codes used as
        they unpack (:func:`code_matmul`)."""
        s, low = self.vs[:, :, t0:t1].float(), self.vl[:, :, t0:t1].float()  # (B, H, L, ng)
        if s.shape[-1] == 1:  # one group per token (Gv = Dv): plain matmuls
            out = code_matmul(p * s[..., 0][:, :, None], self.vc[:, :, t0:t1, 0], self.bits)  # (B, H, M, W·k)
            out = out[..., : self.vgroup] + torch.matmul(p, low)  # (B, H, M, Gv)
        else:
            codes = unpack_bytes(self.vc[:, :, t0:t1], self.bits).flatten(-2)  # (B, H, L, ng, W·k)
            per = 8 // self.bits
            ps = p[..., None] * s[:, :, None]  # (B, H, M, L, ng)
            out = code_order(torch.einsum("bhmlg,bhlgc->bhmgc", ps, codes), per)[..., : self.vgroup]
            out = (out + torch.matmul(p, low)[..., None]).flatten(-2)  # (B, H, M, ng·Gv)
        return self._with_apart(out[..., : self.value_dim], p, t0, t1)

    def _fused(self, qs: Tensor) -> bool:
        """Whether :meth:`_attend_two_pass` reads the packed parts for rows qs through the C
        kernel: built and fit for these rows (fp32, few of them), rows of 64/128/256 codes,
        values in one group per token."""
        rows = qs.shape[-2] * (self.heads if self.layout is not None else 1)  # a plan stacks every head's rows
        return (self.vs.shape[-1] == 1 and self.group in CODES_PER_ROW and rows <= FUSED_MAX_ROWS
                and fused(qs, self.vc[:, :, :0, 0], self.bits))

    def _new_scores(self, qs: Tensor, k: Tensor, is_causal: bool, out: Tensor | None = None) -> Tensor:
        """Scores against the full-precision tail k (its last N keys are the new tokens),
        into ``out`` (a view of a wider score tensor) when given."""
        n = self.k_new.shape[-2]
        scores = torch.matmul(qs, k.transpose(-1, -2), out=out)  # (B, H, G·N, L)
        if is_causal and n > 1:
            new = scores[..., -n:]
            new.masked_fill_(~new_token_keep(n, qs.shape[-2] // n, qs.device), float("-inf"))
        return scores

    def _packed_scores(self, qs: Tensor, out: Tensor, fast: bool) -> None:
        """Scores of qs (B, H, M, D) against every packed key group, written into ``out``
        (B, H, M, nG·G), a view into the score tensor: by the C kernel straight from the codes
        where ``fast``, else block by block through :func:`code_matmul` (the scales folded into
        the rows: Σ_d q_d (low_d + s_d c_dt) = (q ⊙ s)·c_t + q·low per group)."""
        ng, g = self.ngroups, self.group
        grouped = out.unflatten(-1, (ng, g)).transpose(2, 3)  # (B, H, nG, M, G) view
        if self.layout is not None and fast:
            self.layout.scores_fused(qs, self.kheld, out)
        elif self.layout is not None:
            out.copy_(self.layout.scores(self.layout.rows(qs), self.kheld, qs.shape[-2], max(1, self.block // g)))
        elif fast:
            dq_matmul(qs[:, :, None], self.kc, self.bits, self.ks, self.kl, out=grouped)
        else:
            step = max(1, self.block // g)
            qsg = qs[:, :, None] * self.ks.float()[:, :, :, None, :]  # (B, H, nG, M, D)
            for g0 in range(0, ng, step):
                grouped[:, :, g0 : g0 + step] = code_matmul(qsg[:, :, g0 : g0 + step], self.kc[:, :, g0 : g0 + step],
                                                            self.bits)[..., :g]
            grouped += torch.matmul(self.kl.float(), qs.transpose(-1, -2))[..., None]  # + q·low per group

    def _packed_values(self, pq: Tensor, fast: bool) -> Tensor:
        """pq (B, H, M, Lv) times the packed value rows (one group per token), rows [0, lead)
        -- the sinks' places -- left out: (B, H, M, Dv); by the C kernel where ``fast``, else
        block by block through :func:`code_matmul` (Σ_t p_t (low_t + s_t c_t) = (p ⊙ s)·c + p·low)."""
        lead, lv = self.lead, pq.shape[-1]
        if fast:
            out = dq_matmul(pq, self.vc[:, :, :, 0], self.bits, self.vs[..., 0], self.vl[..., 0], start=lead)
        else:
            if lead:
                pq = torch.cat([pq.new_zeros(*pq.shape[:-1], lead), pq[..., lead:]], dim=-1)
            ps = pq * self.vs[:, :, :, 0].float()[:, :, None]  # (B, H, M, Lv)
            span = max(1, self.block // self.group) * self.group
            out = sum(code_matmul(ps[..., t0 : t0 + span], self.vc[:, :, t0 : t0 + span, 0], self.bits)
                      for t0 in range(0, lv, span))  # (B, H, M, W·k)
            out = out[..., : self.vgroup] + torch.matmul(pq, self.vl.float())
        return self._with_apart(out[..., : self.value_dim], pq[..., lead:], lead, lv)

    def _attend_two_pass(self, qs: Tensor, *, is_causal: bool, keep: Tensor | None) -> Tensor:
        """:meth:`attend` for few rows (decoding): every score first, into one (B, H, M, S)
        tensor -- the (rows, keys) scores are small -- then one softmax and the value
        products.  The packed parts go through the C kernel straight from the codes where it
        fits (:meth:`_fused`: a dozen operators per call, no code converted to fp32 in
        memory), else through :func:`code_matmul` one block of codes at a time."""
        b, h, m, _ = qs.shape
        off, ng, g, a0, lead = self.offset, self.ngroups, self.group, self.start, self.lead
        fast = self._fused(qs)
        lv = self.vc.shape[2]  # packed value rows (token a0 + row)
        k_at, v_at = max(a0 + ng * g, off), max(a0 + lv, off)  # where the full-precision tails start
        k = torch.cat([self.kr, self.k_new], dim=-2).float()  # tokens [k_at, P + N)
        v = torch.cat([self.vr, self.v_new], dim=-2).float()  # tokens [v_at, P + N)
        scores = qs.new_empty(b, h, m, self.length)
        if ng:
            self._packed_scores(qs, scores[..., a0 : a0 + ng * g], fast)
        if off:  # after the packed groups: the sinks' places at their front are the sinks' scores
            torch.matmul(qs, self.sk.float().transpose(-1, -2), out=scores[..., :off])
        self._new_scores(qs, k, is_causal, out=scores[..., k_at:])
        if keep is not None:
            scores.masked_fill_(~keep, float("-inf"))
        mx = scores.amax(dim=-1, keepdim=True)
        p = scores.sub_(torch.where(mx == float("-inf"), 0.0, mx)).exp_()  # 0 where masked
        den = p.sum(dim=-1, keepdim=True)
        out = torch.matmul(p[..., v_at:], v)  # (B, H, M, Dv)
        if off:
            out += torch.matmul(p[..., :off], self.sv.float())
        if lv > lead:
            out += self._packed_values(p[..., a0 : a0 + lv], fast)
        return out.div_(torch.where(den > 0, den, 1.0))

    def attend(self, q: Tensor, *, is_causal: bool, scale: float, keep: Tensor | None) -> Tensor:
        qs = q * scale
        if self.vs.shape[-1] == 1 and q.shape[0] * q.shape[1] * q.shape[2] * self.length <= TWO_PASS_MAX:
            return self._attend_two_pass(qs, is_causal=is_causal, keep=keep)
        state = OnlineSoftmax(q, q.shape[:-1], self.value_dim)
        step = max(1, self.block // self.group)  # groups per block
        off = self.offset
        if off:
            scores = torch.matmul(qs, self.sk.float().transpose(-1, -2))  # (B, H, G·N, S)
            if keep is not None:
                scores = scores.masked_fill(~keep[..., :off], float("-inf"))
            state.add(scores, self.sv.float())
        a0 = self.start
        rows = self.layout.rows(qs) if self.layout is not None and self.ngroups else None
        for g0 in range(0, self.ngroups, step):
            g1 = min(g0 + step, self.ngroups)
            t0, t1 = g0 * self.group, g1 * self.group
            scores = self._key_scores(qs, g0, g1, rows)  # (B, H, G·N, L): tokens [a0 + t0, a0 + t1)
            if g0 == 0 and self.lead:
                scores[..., : self.lead] = float("-inf")  # the sinks' places: attended exactly above
            if keep is not None:
                scores = scores.masked_fill(~keep[..., a0 + t0 : a0 + t1], float("-inf"))
            state.add(scores, pv=lambda p, t0=t0, t1=t1: self._value_product(p, t0, t1))
        k, v = self._tail()
        scores = self._new_scores(qs, k, is_causal)  # (B, H, G·N, L)
        if keep is not None:
            scores = scores.masked_fill(~keep[..., self.length - k.shape[-2] :], float("-inf"))
        state.add(scores, v)
        return state.result()

    def materialize(self) -> tuple[Tensor, Tensor]:
        ng = self.ngroups
        k_tail, v_tail = self._tail()
        k = torch.cat([self.keys(0, ng)[:, :, self.lead :], k_tail], dim=-2) if ng else k_tail
        v = torch.cat([self.values(self.lead, ng * self.group), v_tail], dim=-2) if ng else v_tail
        if self.offset:
            k, v = torch.cat([self.sk.float(), k], dim=-2), torch.cat([self.sv.float(), v], dim=-2)
        return k.to(self.dtype), v.to(self.dtype)


class QuantizedLayer(HeldTensorsLayer):
    """One layer of a :class:`QuantizedCache` (a transformers ``CacheLayerMixin``).

    Held tensors (B batch, H kv heads, D, Dv head dims, G group, Gv = min(G, Dv),
    ng = ceil(Dv/Gv), b bits):

    * ``key_codes`` (B, H, nG, D, G·b/8) uint8, ``key_scale``/``key_low`` (B, H, nG, D) fp16:
      keys per channel, each group G consecutive tokens;
    * ``value_codes`` (B, H, Lv, ng, Gv·b/8) uint8, ``value_scale``/``value_low`` (B, H, Lv, ng)
      fp16: values per token, each group Gv channels;
    * ``key_residual`` (B, H, P − S − nG·G, D), ``value_residual`` (B, H, P − S − Lv, Dv)
      in the model's dtype: keys not yet in a full group or among the newest R, values
      among the newest R;
    * ``sink_keys`` (B, H, S, D), ``sink_values`` (B, H, S, Dv) in the model's dtype: the
      first S = min(P, sinks) tokens, never quantized;
    * under a plan with value channels, their 4-bit copies and the rows waiting for their
      group (:mod:`attnkit.cache.valuechannels`).
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False
    _TENSORS = ("key_codes", "key_scale", "key_low", "value_codes", "value_scale", "value_low",
                "key_residual", "value_residual", "sink_keys", "sink_values")

    def __init__(self, bits: int, group_size: int, residual: int, scale: str, block: int, materialize: bool,
                 sinks: int = 0, key_bits: Tensor | None = None, value_channels: Tensor | None = None):
        super().__init__()
        self.layout = None if key_bits is None else KeyLayout(key_bits, group_size, bits)
        self.apart = None if value_channels is None else ValueChannels(value_channels, group_size)
        for plan in (self.layout, self.apart):  # the plan's tensors (key ones: same names, other shapes, key_mean)
            if plan is not None:
                self._TENSORS = tuple(dict.fromkeys((*self._TENSORS, *plan.names())))
        self.bits, self.group_size, self.residual, self.scale = bits, group_size, residual, scale
        self.sinks = sinks
        self.block, self.materialize = block, materialize
        self.seen = 0
        for name in self._TENSORS:
            setattr(self, name, None)

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        b, h, _, d = key_states.shape
        dv = value_states.shape[-1]
        self.vgroup = min(self.group_size, dv)
        ng = -(-dv // self.vgroup)
        kw = {"device": key_states.device}
        if self.layout is None:
            self.key_codes = torch.empty(b, h, 0, d, -(-self.group_size * self.bits // 8), dtype=torch.uint8, **kw)
            self.key_scale = torch.empty(b, h, 0, d, dtype=torch.float16, **kw)
            self.key_low = torch.empty(b, h, 0, d, dtype=torch.float16, **kw)
        elif (self.layout.heads, self.layout.dim) != (h, d):
            raise ValueError(
                f"QuantizedCache: argument 'key_bits' was fitted for {self.layout.heads} kv heads of dim "
                f"{self.layout.dim}, but this layer's keys have {h} heads of dim {d}: fit a plan for this model "
                f"(attnkit.cache.key_bit_plan)")
        else:
            for name, t in self.layout.empty(b, key_states.device).items():
                setattr(self, name, t)
        self.value_codes = torch.empty(b, h, 0, ng, -(-self.vgroup * self.bits // 8), dtype=torch.uint8, **kw)
        self.value_scale = torch.empty(b, h, 0, ng, dtype=torch.float16, **kw)
        self.value_low = torch.empty(b, h, 0, ng, dtype=torch.float16, **kw)
        if self.apart is not None:
            for name, t in self.apart.empty(value_states).items():
                setattr(self, name, t)
        self.key_residual = key_states.new_empty(b, h, 0, d)
        self.value_residual = value_states.new_empty(b, h, 0, dv)
        self.sink_keys = key_states.new_empty(b, h, 0, d)
        self.sink_values = value_states.new_empty(b, h, 0, dv)
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        """Add N new tokens; returns two :class:`CacheView` (or, with ``materialize``,
        plain (B, H, P+N, D) tensors) covering the P cached tokens and the new ones."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        snap = QuantizedSnapshot(self, key_states, value_states)
        self.seen += key_states.shape[-2]
        take = min(self.sinks - self.sink_keys.shape[-2], key_states.shape[-2])
        if take > 0:  # only while nothing else is held: the sinks are the first tokens
            self.sink_keys = torch.cat([self.sink_keys, key_states[:, :, :take]], dim=-2)
            self.sink_values = torch.cat([self.sink_values, value_states[:, :, :take]], dim=-2)
            key_states, value_states = key_states[:, :, take:], value_states[:, :, take:]
        self.key_residual = torch.cat([self.key_residual, key_states], dim=-2)
        self.value_residual = torch.cat([self.value_residual, value_states], dim=-2)
        self._flush()
        if self.materialize:
            return snap.materialize()
        return CacheView(snap, "key"), CacheView(snap, "value")

    def _flush(self) -> None:
        """Quantize every value older than the newest R and every full key group among them."""
        r = self.residual
        a0, lead = sink_layout(self.sink_keys.shape[-2], self.group_size)
        nv = self.value_residual.shape[-2] - r
        if nv > 0:
            v = self.value_residual[:, :, :nv].float()  # (B, H, nv, Dv)
            if lead and self.value_codes.shape[2] == 0:  # rows [0, lead): the sinks' places (never read)
                v = torch.cat([self.sink_values[:, :, a0:].float(), v], dim=-2)
            ng, gv = self.value_codes.shape[3], self.vgroup
            if self.apart is not None:  # held apart, and out of the per-token groups' ranges
                for name, t in self.apart.append(self.tensors(), v).items():
                    setattr(self, name, t)
                v = self.apart.exclude(v, gv)
            if ng * gv != v.shape[-1]:  # pad by repeating the last channel: the group's range is unchanged
                v = torch.cat([v, v[..., -1:].expand(*v.shape[:-1], ng * gv - v.shape[-1])], dim=-1)
            codes, s, low = quantize_packed(v.reshape(*v.shape[:-1], ng, gv), self.bits, self.scale)  # (B, H, nv, ng, ·)
            self.value_codes = torch.cat([self.value_codes, codes], dim=2)
            self.value_scale = torch.cat([self.value_scale, s], dim=2)
            self.value_low = torch.cat([self.value_low, low], dim=2)
            self.value_residual = self.value_residual[:, :, nv:].clone()  # clone: free the old storage
        g = self.group_size
        first = lead if self.key_groups() == 0 else 0  # the first group holds the sinks' places
        nk = (self.key_residual.shape[-2] - r + first) // g * g - first
        if nk > 0:
            b, h, _, d = self.key_residual.shape
            k = self.key_residual[:, :, :nk].float()
            if first:  # placeholders: the group's mean, which leaves its range and mean as they are
                k = torch.cat([k[:, :, : g - first].mean(-2, keepdim=True).expand(b, h, first, d), k], dim=-2)
            k = k.reshape(b, h, -1, g, d)  # (B, H, nG', G, D)
            if self.layout is not None:
                for name, t in self.layout.quantize(k).items():
                    setattr(self, name, torch.cat([getattr(self, name), t], dim=1))
            else:
                # Keys are always min-max: see QuantizedCache's ``scale`` for why the search skips them.
                codes, s, low = quantize_packed(k.transpose(-1, -2), self.bits, "minmax")  # (B, H, nG', D, ·)
                self.key_codes = torch.cat([self.key_codes, codes], dim=2)
                self.key_scale = torch.cat([self.key_scale, s], dim=2)
                self.key_low = torch.cat([self.key_low, low], dim=2)
            self.key_residual = self.key_residual[:, :, nk:].clone()

    def key_groups(self) -> int:
        """Key groups held packed."""
        if self.layout is None:
            return self.key_codes.shape[2]
        return getattr(self, self.layout.names()[0]).shape[1]

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor the layer holds, by name."""
        return {name: getattr(self, name) for name in self._TENSORS if getattr(self, name) is not None}

    def nbytes(self) -> int:
        """The held tensors plus, under a plan, its index tensors."""
        return super().nbytes() + sum(plan.nbytes() for plan in (self.layout, self.apart) if plan is not None)

    def reset(self) -> None:
        for name in self._TENSORS:
            setattr(self, name, None)
        self.seen = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "QuantizedCache cannot crop: quantized groups cannot be cut back (assisted generation and "
            "contrastive search need a croppable cache such as transformers' DynamicCache)"
        )


def sink_layout(sinks: int, group: int) -> tuple[int, int]:
    """(a0, lead): the token where the packed part starts, G·floor(S/G), and the sinks'
    places at its front, S − a0."""
    a0 = sinks // group * group
    return a0, sinks - a0


def _plan_tensors(entries, name: str) -> list[Tensor]:
    """One entry of a plan (nested lists, or tensors) as one long tensor per layer: (kv heads,
    head dim) key widths, or (kv heads, k) value channels."""
    try:
        layers = [torch.as_tensor(p, dtype=torch.long) for p in entries]
    except (TypeError, ValueError) as e:
        raise ValueError(f"QuantizedCache: argument 'key_bits': its {name!r} must be {name}[layer][kv head][·] of "
                         f"ints, as many in every head of a layer (attnkit.cache.key_bit_plan): {e}") from None
    if not layers:
        raise ValueError(f"QuantizedCache: argument 'key_bits': its {name!r} is empty")
    return layers


class QuantizedCache(Cache):
    """A KV cache with keys and values quantized to 4, 2 or 8 bits (KIVI), for ``generate()``.

    Keys are quantized per channel over groups of G consecutive tokens (key outliers sit
    in fixed channels, so a channel's range is tight), values per token over groups of
    Gv = min(G, Dv) channels.  Integers are packed (two 4-bit / four 2-bit codes per
    byte) with one fp16 scale and one fp16 zero point (the value of code 0) per group,
    see :mod:`attnkit.cache.quant`.  Keys not yet in a full group, and the newest
    ``residual`` tokens, stay in the model's dtype; values are quantized as soon as they
    are older than the newest ``residual`` (per-token groups need no wait).

    ``update()`` returns :class:`CacheView` handles, which :func:`cache_attention` reads
    one block of ``block`` tokens at a time (dequantized in fp32, merged by online
    softmax): no full-precision copy of the cache is held.  The model must run attnkit's
    attention (:func:`attnkit.cache.enable`, or ``attnkit.patch``); ``materialize=True``
    returns plain dequantized tensors instead, for any model (which then holds one
    layer's full copy at a time).

    Args:
        bits: 4, 2 or 8 bits per code.
        group_size: G, tokens per key group and (at most) channels per value group.
        residual: R >= 0, the newest tokens kept in full precision.
        sinks: the first S tokens kept in full precision for good (attention sinks, Xiao et
            al. 2023): a model puts much of its attention on them, and the first token's key
            is an outlier that would widen its whole key group's range.  S·2·(D+Dv) numbers
            in the model's dtype.
        scale: ``"minmax"`` or ``"search"`` (adaptive: per value group, the clipped range with
            the least squared error; see :func:`attnkit.cache.quant.quantize`).  Keys stay
            min-max under ``"search"`` (the outlier-aware rule): a key channel's extreme
            tokens are the ones that carry large scores, and clipping them by squared error
            wrecks attention -- measured on SmolLM2 at 2-bit, 512 tokens: perplexity +42%
            with searched keys against +5.9% min-max, while searched values give +5.6%.
        block: cached tokens dequantized per step of the attention (rounded to whole groups).
        materialize: return plain dequantized tensors from ``update()``.
        key_bits: None (every key channel at ``bits``) or a plan from
            :func:`attnkit.cache.key_bit_plan`: its ``"key_bits"``,
            ``[layer][kv head][channel]`` in 0, 2, 4, 8, the width of each key channel (0:
            only its group mean is kept), fitted on a few batches so that the channels the
            queries weigh most get the bits, at the key bytes of uniform ``bits``; and, if
            fitted, its ``"value_channels"``, ``[layer][kv head]`` = k channel indices held
            apart from the per-token value groups (4-bit per channel over groups of G
            tokens, :mod:`attnkit.cache.valuechannels`).  A bare ``[layer][kv head][channel]``
            list (a plan from before value channels) gives the key widths alone.  At 2
            bits on SmolLM2 with sinks=4 the key widths take perplexity on Pride & Prejudice
            from +12/+16/+21% (uniform) to +2.7/+3.6/+4.7% at 2048/4096/8192 tokens (at
            8192 on two more books +4.5% and +6.0%); with one value channel per kv head held
            apart as well, +2.5/+2.7/+3.3%, and within +5% on both other books at every size;
            see :mod:`attnkit.cache.keyplan` and benchmarks/results/cache_cpu.md.

    Defaults, and the byte arithmetic behind them (per cached number; an fp16 cache holds
    2 B): codes b/8 B; a group's fp16 scale + fp16 zero point 4 B, i.e. 4/G per key
    number and 4/Gv per value number.  With G = 64 (Gv = 64 for a head dim of 64, as in
    SmolLM2) the overhead is 0.0625 B, so 4-bit costs 0.5625 B (3.56x smaller than fp16)
    and 2-bit 0.3125 B (6.4x).  Groups of 32 would cost 0.125 B of overhead: 2-bit could
    not reach 6x.  The residual is what is left: each full-precision token costs
    2·(D+Dv)·4 B in an fp32 model, so at 2048 tokens 64 of them would add 0.125 B per
    number -- hence ``residual=0`` by default (the new tokens of a step are always
    attended in full precision; keys wait at most G−1 tokens for their group).  G = 128
    would save 0.031 B more but let up to 127 keys wait unquantized.

    Example::

        cache = attnkit.cache.QuantizedCache(bits=4)
        attnkit.cache.enable(model)
        out = model.generate(ids, past_key_values=cache, max_new_tokens=256)
        cache.nbytes()
    """

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 64,
        residual: int = 0,
        scale: str = "minmax",
        *,
        sinks: int = 0,
        block: int = DEFAULT_BLOCK,
        materialize: bool = False,
        key_bits: list | None = None,
    ):
        if bits not in BITS:
            raise ValueError(f"QuantizedCache: argument 'bits' must be one of {BITS}, got {bits!r}")
        for name, value, low in (("group_size", group_size, 1), ("residual", residual, 0), ("sinks", sinks, 0),
                                 ("block", block, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"QuantizedCache: argument {name!r} must be an int >= {low}, got {value!r}")
        if scale not in SCALES:
            raise ValueError(f"QuantizedCache: argument 'scale' must be one of {SCALES}, got {scale!r}")
        self.bits, self.group_size, self.residual, self.scale, self.sinks = bits, group_size, residual, scale, sinks
        self.plan = None if key_bits is None else {
            name: _plan_tensors(entries, name) for name, entries in as_plan(key_bits, "QuantizedCache: argument 'key_bits'").items()}
        layer = functools.partial(QuantizedLayer, bits, group_size, residual, scale, block, bool(materialize), sinks)
        if self.plan is None:
            super().__init__(layer_class_to_replicate=layer)
        else:  # transformers appends layers in order: the next one is layer len(self.layers)
            super().__init__(layer_class_to_replicate=lambda: layer(**self._layer_plan(len(self.layers))))

    def _layer_plan(self, idx: int) -> dict[str, Tensor | None]:
        """Layer ``idx``'s part of the plan, as QuantizedLayer's arguments (a layer with no
        value channel holds none apart)."""
        out = {}
        for name, layers in self.plan.items():
            if idx >= len(layers):
                raise ValueError(f"QuantizedCache: argument 'key_bits': its {name!r} plans {len(layers)} layers, but "
                                 f"the model has more (layer {idx}): fit a plan for this model "
                                 f"(attnkit.cache.key_bit_plan)")
            out[name] = None if name == "value_channels" and not layers[idx].numel() else layers[idx]
        return out

    def nbytes(self) -> int:
        """Bytes held: codes, scales, zero points and the full-precision residual, all layers."""
        return sum(layer.nbytes() for layer in self.layers)

    def __repr__(self) -> str:
        return (f"QuantizedCache(bits={self.bits}, group_size={self.group_size}, residual={self.residual}, "
                f"scale={self.scale!r}, sinks={self.sinks}, key_bits={'plan' if self.plan else None}, layers={len(self.layers)}, tokens={self.get_seq_length()})")
