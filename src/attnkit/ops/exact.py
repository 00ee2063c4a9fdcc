"""Exact attention: "math" (materialised), "sdpa" (torch's fused kernel), "tiled" (ours,
O(N) memory) and "auto" (the fastest of them that serves the call)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import compat
from ..core.capabilities import Capabilities, Method
from ..core.inputs import AttentionInputs
from ..core.reference import math_attention
from ..core.registry import log, register
from .tiled import TileParams, choose_blocks, tiled_attention, tiled_weights

__all__ = ["Math", "SDPA", "Tiled", "Exact"]


@register
@dataclass(frozen=True)
class Math(Method):
    """Plain materialised attention (the reference formula) in fp32, or fp64 for fp64 inputs.

    Builds the full (N, S) score matrix: use it for small inputs, as a readable spec,
    or when gradients must flow through returned weights.
    """

    name: ClassVar[str] = "math"
    capabilities: ClassVar[Capabilities] = Capabilities(
        exact=True, double_backward=True, returns_weights=True
    )

    def forward(self, inp, *, need_weights=False, average_weights=False, state=None):
        compute = torch.float64 if inp.dtype == torch.float64 else torch.float32
        return math_attention(inp, compute, need_weights=need_weights, average_weights=average_weights)


@dataclass(frozen=True)
class _Call:
    """The non-tensor arguments of one SDPA call."""

    dropout_p: float
    is_causal: bool
    scale: float
    gqa: bool

    @classmethod
    def of(cls, inp: AttentionInputs) -> _Call:
        return cls(inp.dropout_p, inp.is_causal, inp.scale, inp.hq != inp.hkv)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, call: _Call) -> Tensor:
    if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)  # SDPA wants a float mask in q's dtype
    kwargs = {"enable_gqa": True} if call.gqa else {}
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=call.dropout_p, is_causal=call.is_causal, scale=call.scale, **kwargs
    )


@register
@dataclass(frozen=True)
class SDPA(Method):
    """``torch.nn.functional.scaled_dot_product_attention``: torch's fused kernels.

    On CPU it is a C++ flash-attention kernel (O(N) memory) unless dropout or a mask
    that needs grad sends it to its materialised math path.
    """

    name: ClassVar[str] = "sdpa"
    capabilities: ClassVar[Capabilities] = Capabilities(
        exact=True,
        causal_with_mask=False,
        gqa=compat.SDPA_HAS_GQA,
        double_backward=False,
    )

    def forward(self, inp, *, need_weights=False, average_weights=False, state=None):
        return _sdpa(inp.q, inp.k, inp.v, inp.attn_mask, _Call.of(inp)), None


@register
@dataclass(frozen=True)
class Tiled(Method):
    """FlashAttention-2-style online-softmax tiling in PyTorch: O(N·D + tile) memory in
    forward and backward, exact up to rounding; see :mod:`attnkit.ops.tiled`.

    Args:
        block_q: query rows per tile (None: the rule in ``choose_blocks``).
        block_k: key columns per tile (None: the rule).
    """

    block_q: int | None = None
    block_k: int | None = None

    name: ClassVar[str] = "tiled"
    capabilities: ClassVar[Capabilities] = Capabilities(
        exact=True, double_backward=True, returns_weights=True
    )

    def __post_init__(self):
        for field in ("block_q", "block_k"):
            self.check_int(field, 1, optional=True)

    def params(self, inp: AttentionInputs) -> TileParams:
        lead = math.prod(inp.batch_shape) * inp.hq
        block_q, block_k = choose_blocks(lead, inp.n, inp.s, self.block_q, self.block_k)
        # The dropout seed comes from the global RNG, like torch's own dropout, so
        # torch.manual_seed makes a run reproducible; backward replays it per tile.
        seed = int(torch.randint(0, 1 << 62, (1,)).item()) if inp.dropout_p > 0 else 0
        return TileParams(inp.scale, inp.is_causal, inp.dropout_p, seed, block_q, block_k)

    def forward(self, inp, *, need_weights=False, average_weights=False, state=None):
        q, k, v, mask = inp.grouped()
        prm = self.params(inp)
        out, lse = tiled_attention(q, k, v, mask, prm)
        weights = None
        if need_weights:
            weights = tiled_weights(q, k, mask, lse, prm, average=average_weights, out_dtype=inp.dtype)
            if not average_weights:
                weights = inp.ungroup(weights)  # (*b, Hq, N, S)
        return inp.ungroup(out), weights


class _SDPAWithTiledDoubleBackward(torch.autograd.Function):
    """SDPA forward and backward, but a tiled recomputation when a double backward asks.

    torch's fused CPU kernel has no derivative for its backward; inside
    ``Function.backward`` grad mode is on exactly when ``create_graph=True``, which is
    when the (twice differentiable) tiled path takes over.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, call: _Call):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(t.requires_grad) if t is not None else None for t in (q, k, v, mask)]
            out = _sdpa(*leaves, call)
        ctx.inner = (leaves, out)
        ctx.call = call
        ctx.save_for_backward(q, k, v, mask)
        return out.detach()

    @staticmethod
    def backward(ctx, dout):
        leaves, out = ctx.inner
        wanted = [i for i, t in enumerate(leaves) if t is not None and t.requires_grad]
        if torch.is_grad_enabled():
            call: _Call = ctx.call
            if call.dropout_p > 0:
                raise RuntimeError(
                    "attnkit: a double backward through method='auto' with dropout_p > 0 cannot "
                    "replay SDPA's dropout; use method='tiled' for gradients of gradients with dropout."
                )
            saved = ctx.saved_tensors
            inp2 = AttentionInputs(*saved, call.dropout_p, call.is_causal, call.scale)
            out2, _ = Tiled().forward(inp2)
            grads = torch.autograd.grad(out2, [saved[i] for i in wanted], dout, create_graph=True, allow_unused=True)
        else:
            # retain_graph: the outer graph may be retained and run again (gradcheck does);
            # the inner graph lives exactly as long as this node does.
            grads = torch.autograd.grad(out, [leaves[i] for i in wanted], dout, retain_graph=True)
        result = [None, None, None, None, None]
        for i, g in zip(wanted, grads):
            result[i] = g
        return tuple(result)


@register
@dataclass(frozen=True)
class Exact(Method):
    """The fastest exact method that serves the call ("auto").

    torch SDPA where it serves the inputs at O(N) memory; the tiled kernel where SDPA
    cannot: returning weights, a mask together with is_causal, a float mask that needs
    its gradient or dropout (both send SDPA to its materialised path on CPU), dtypes or
    devices SDPA lacks.  Double backward through the SDPA choice recomputes with tiled.
    ``attnkit.explain(...)`` says which ran and why.
    """

    name: ClassVar[str] = "auto"
    capabilities: ClassVar[Capabilities] = Capabilities(
        exact=True, double_backward=True, returns_weights=True
    )

    def choose(self, inp: AttentionInputs, *, need_weights: bool = False) -> tuple[Method, str]:
        if need_weights:
            return Tiled(), "attention weights requested; SDPA cannot return them"
        if inp.attn_mask is not None and inp.attn_mask.requires_grad and inp.requires_grad:
            return Tiled(), "the float attn_mask needs a gradient; SDPA would materialise N x S for it"
        if inp.dropout_p > 0 and inp.device.type == "cpu":
            return Tiled(), "dropout on CPU sends SDPA to its materialised math path"
        reasons = SDPA().not_supported_reasons(inp)
        if reasons:
            return Tiled(), "SDPA cannot serve: " + "; ".join(reasons)
        return SDPA(), "SDPA serves these inputs"

    def forward(self, inp, *, need_weights=False, average_weights=False, state=None):
        chosen, why = self.choose(inp, need_weights=need_weights)
        if log.isEnabledFor(10):  # logging.DEBUG
            log.debug("attnkit auto -> %s (%s)", chosen.spec(), why)
        if isinstance(chosen, SDPA) and inp.requires_grad:
            out = _SDPAWithTiledDoubleBackward.apply(inp.q, inp.k, inp.v, inp.attn_mask, _Call.of(inp))
            return out, None
        return chosen.forward(inp, need_weights=need_weights, average_weights=average_weights)
