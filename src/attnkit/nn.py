"""``attnkit.MultiheadAttention``: ``torch.nn.MultiheadAttention`` with attnkit's attention.

The module subclasses torch's, so construction, parameters, initialisation and
``state_dict`` keys are torch's own; only ``forward`` is replaced.  It does the
projections exactly as torch does, translates torch's mask conventions into SDPA's
(bool True = attend, float = added) without expanding any mask, and hands the
attention to :func:`attnkit.core.registry.run`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core.registry import MethodSpec, resolve, run

__all__ = ["MultiheadAttention"]


class MultiheadAttention(nn.MultiheadAttention):
    r"""A drop-in for :class:`torch.nn.MultiheadAttention` whose attention runs through attnkit.

    Same constructor, parameters, initialisation, ``state_dict`` keys, forward
    signature, return values and mask meanings as torch's module (a state_dict saved
    from either loads into the other), plus one keyword, ``method``.

    Shape legend: B batch, L target (query) length, S source (key) length, E
    ``embed_dim``, H ``num_heads``, Dh = E / H.

    Args:
        embed_dim: E, the model dimension (query size and output size).
        num_heads: H; ``embed_dim`` must be divisible by it.
        dropout: dropout probability on the attention weights, applied only in
            training mode.
        bias: add biases to the input and output projections.
        add_bias_kv: append one learned key and value (``bias_k``, ``bias_v``) to the
            sequence; every query may attend it.
        add_zero_attn: append one all-zero key and value after projection; every query
            may attend it.
        kdim: size of the key features (default E).
        vdim: size of the value features (default E).
        batch_first: inputs and output are (B, L, E) instead of (L, B, E).
        device: device of the parameters.
        dtype: dtype of the parameters.
        method: which attention runs: ``"auto"`` (the fastest exact method that serves
            the call: torch's SDPA where it can, else attnkit's tiled kernel), a name from
            :func:`attnkit.methods` (``"math"``, ``"sdpa"``, ``"tiled"``, ...;
            optionally ``"name:key=value,..."``), or a config object such as
            ``attnkit.Tiled(block_q=128)``.  A named method runs or raises
            :class:`attnkit.MethodNotSupportedError`; nothing falls back silently.  The
            attribute ``self.method`` may be reassigned later.

    Note:
        Returned attention weights are computed tile by tile from the softmax
        statistics and are **not differentiable** with the tiled method -- which is what
        ``"auto"`` uses when ``need_weights=True`` (the output itself is always
        differentiable).  If gradients must flow through the weights, use
        ``method="math"``.  Pass ``need_weights=False`` when the weights are not needed:
        then no L x S tensor is built (beyond converting a mask you pass).

    Differences from torch, all where torch raises, returns NaN or disagrees with itself:

    * A query whose keys are all masked gives zero attention (the output is
      ``out_proj.bias``) and zero weights, where torch returns NaN (with
      ``need_weights=True``; its SDPA path gives zeros too).
    * ``is_causal=True`` without ``attn_mask`` is accepted and means the top-left
      aligned causal mask (query i sees keys j <= i); torch raises.  Combined with
      ``add_bias_kv`` or ``add_zero_attn`` it still raises, because whether queries may
      see the appended keys is then ambiguous: pass the mask.
    * With ``attn_mask`` and ``is_causal=True``, the mask is trusted over the hint when
      ``add_bias_kv``/``add_zero_attn`` append keys (every query sees them, as torch
      does with ``need_weights=True``); torch's ``need_weights=False`` path hides them
      from most queries there.

    Raises:
        ValueError: ``method`` is not a known method name or spec (at construction).
        TypeError: ``method`` is neither a string nor a config object.

    Example::

        mha = attnkit.MultiheadAttention(512, 8, batch_first=True, method="tiled")
        mha.load_state_dict(torch_mha.state_dict())
        out, weights = mha(x, x, x, key_padding_mask=pad)   # pad: (B, S), True = ignore
    """

    # A class-level default, so an nn.MultiheadAttention whose class is swapped to this
    # one in place (keeping its weights) runs with "auto".
    method: MethodSpec = "auto"

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        method: MethodSpec = "auto",
    ) -> None:
        config = resolve(method)  # an unknown name or a malformed spec fails here, not at the first call
        super().__init__(
            embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first, device, dtype
        )
        self.method = method
        # The method's own learnable parts (e.g. LowRank projections), if any: a
        # submodule, so they live in state_dict under "attn_state.".
        state = config.make_state(num_heads, self.head_dim)
        if state is not None:
            self.attn_state = state.to(device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"method={self.method!r}"

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        r"""Attention of ``query`` over ``key``/``value``, as :meth:`torch.nn.MultiheadAttention.forward`.

        Args:
            query: (L, B, E), or (B, L, E) when ``batch_first``, or (L, E) unbatched.
            key: (S, B, kdim), (B, S, kdim) or (S, kdim).
            value: (S, B, vdim), (B, S, vdim) or (S, vdim).
            key_padding_mask: (B, S), or (S,) unbatched.  bool: True = **ignore** that
                key (torch's meaning); float: added to the scores.
            need_weights: also return the attention weights (after dropout, as torch).
            attn_mask: (L, S) or (B·H, L, S) ((H, L, S) unbatched).  bool: True = **not
                allowed** (torch's meaning, the opposite of SDPA's); float: added.
            average_attn_weights: average the returned weights over heads.
            is_causal: a hint that ``attn_mask`` is the causal mask (see the class
                docstring for the case without ``attn_mask``).

        Returns:
            attn_output: (L, B, E), (B, L, E) or (L, E), laid out in memory as torch's.
            attn_weights: None unless ``need_weights``; (B, L, S) averaged or
                (B, H, L, S) per head, without B when unbatched.  S counts the keys
                appended by ``add_bias_kv`` / ``add_zero_attn``.

        Raises:
            AssertionError, RuntimeError: malformed shapes or masks, with the exception
                types torch raises for them.
            attnkit.MethodNotSupportedError: ``self.method`` cannot serve the call (e.g.
                ``"sdpa"`` with ``need_weights=True``).
        """
        is_batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        self_attention = query is key and key is value  # decided before any reshape
        if not is_batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)  # (L, 1, E)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)  # (1, S)
        elif self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))  # (L, B, E)
        L, B, E = query.shape
        S = key.shape[0]
        H, Dh = self.num_heads, self.head_dim
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, S):
            raise AssertionError(
                f"expecting key_padding_mask shape of {(B, S)} (batch, source length), but got "
                f"{tuple(key_padding_mask.shape)}"
            )
        if attn_mask is not None and attn_mask.dim() == 3 and tuple(attn_mask.shape) != (B * H, L, S):
            raise RuntimeError(
                f"The shape of the 3D attn_mask is {tuple(attn_mask.shape)}, but should be {(B * H, L, S)} "
                f"(batch * num_heads, target length, source length)."
            )

        extra = int(self.bias_k is not None) + int(self.add_zero_attn)  # keys appended after the caller's S
        causal = False
        if is_causal:
            if attn_mask is None:
                if extra:
                    raise RuntimeError(
                        "is_causal=True without attn_mask is ambiguous with add_bias_kv or add_zero_attn "
                        "(may every query see the appended keys?). Pass the causal attn_mask as well, e.g. "
                        "nn.Transformer.generate_square_subsequent_mask(L), as torch requires."
                    )
                causal = True
            elif key_padding_mask is None and not need_weights and not extra:
                # torch's rule: the hint replaces the mask when nothing else needs it.
                attn_mask, causal = None, True

        q, k, v = self._in_projection(query, key, value, self_attention)  # (L, B, E), (S, B, E), (S, B, E)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(1, B, E)])  # (S+1, B, E)
            v = torch.cat([v, self.bias_v.expand(1, B, E)])  # (S+1, B, E)
        q = q.unflatten(-1, (H, Dh)).permute(1, 2, 0, 3)  # (B, H, L, Dh)
        k = k.unflatten(-1, (H, Dh)).permute(1, 2, 0, 3)  # (B, H, S', Dh)
        v = v.unflatten(-1, (H, Dh)).permute(1, 2, 0, 3)  # (B, H, S', Dh)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(B, H, 1, Dh)], dim=2)  # (B, H, S'+1, Dh)
            v = torch.cat([v, v.new_zeros(B, H, 1, Dh)], dim=2)  # (B, H, S'+1, Dh)

        mask = _sdpa_mask(key_padding_mask, attn_mask, B, H, extra, q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        out, weights = run(
            q, k, v, mask, dropout_p, causal,
            method=self.method, need_weights=need_weights, average_weights=average_attn_weights,
            state=getattr(self, "attn_state", None),
        )  # out (B, H, L, Dh); weights (B, H, L, S') or (B, L, S')

        out = out.permute(2, 0, 1, 3).reshape(L * B, E)  # (L·B, E)
        # F.linear, as torch: out_proj's own forward (and its hooks) is not called.
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias).view(L, B, E)  # (L, B, E)
        if not is_batched:
            out = out.squeeze(1)  # (L, E)
            weights = weights.squeeze(0) if weights is not None else None
        elif self.batch_first:
            out = out.transpose(0, 1)  # (B, L, E), a view, as torch returns it
        return out, weights

    def _in_projection(self, query: Tensor, key: Tensor, value: Tensor, self_attention: bool):
        """q, k, v projections of (len, B, features) inputs, each (len, B, E)."""
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        else:
            b_q = b_k = b_v = None
        if self._qkv_same_embed_dim:
            if self_attention:  # one GEMM for all three, as torch
                return F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def _check_inputs(
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None
    ) -> bool:
        """torch's checks, with torch's exception types; returns whether the call is batched."""
        if query.is_nested or key.is_nested or value.is_nested:
            raise AssertionError(
                "attnkit.MultiheadAttention does not support NestedTensor inputs; pad the batch and pass "
                "key_padding_mask instead."
            )
        if query.dim() not in (2, 3):
            raise AssertionError(
                f"query should be unbatched 2D or batched 3D tensor but received {query.dim()}-D query tensor"
            )
        batched = query.dim() == 3
        kind = "batched (3-D)" if batched else "unbatched (2-D)"
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise AssertionError(
                f"For {kind} `query`, expected `key` and `value` to be {query.dim()}-D but found "
                f"{key.dim()}-D and {value.dim()}-D tensors respectively"
            )
        for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if mask is not None and mask.dtype != torch.bool and not torch.is_floating_point(mask):
                raise AssertionError(
                    f"only bool and floating types of {name} are supported, got {mask.dtype}; "
                    f"convert it with {name}.bool()"
                )
        if key_padding_mask is not None and key_padding_mask.dim() != query.dim() - 1:
            raise AssertionError(
                f"For {kind} `query`, expected `key_padding_mask` to be `None` or {query.dim() - 1}-D "
                f"(batch, source length) but found {key_padding_mask.dim()}-D tensor instead"
            )
        if attn_mask is not None:
            if attn_mask.dim() not in (2, 3):
                raise AssertionError(
                    f"For {kind} `query`, expected `attn_mask` to be `None`, 2-D or 3-D but found "
                    f"{attn_mask.dim()}-D tensor instead"
                )
            seq_dim = 1 if batched and self.batch_first else 0
            L, S = query.shape[seq_dim], key.shape[seq_dim]
            if attn_mask.dim() == 2 and tuple(attn_mask.shape) != (L, S):
                raise RuntimeError(
                    f"The shape of the 2D attn_mask is {tuple(attn_mask.shape)}, but should be {(L, S)} "
                    f"(target length, source length)."
                )
        if query.shape[-1] != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {query.shape[-1]}")
        same_shape = key.shape == value.shape if self._qkv_same_embed_dim else key.shape[:-1] == value.shape[:-1]
        if not same_shape:
            raise AssertionError(
                f"key shape {tuple(key.shape)} does not match value shape {tuple(value.shape)}"
                + ("" if self._qkv_same_embed_dim else " in its sequence and batch dims")
            )
        batch_dim = 1 if batched and not self.batch_first else 0
        if batched and key.shape[batch_dim] != query.shape[batch_dim]:
            raise AssertionError(
                f"query has batch size {query.shape[batch_dim]} but key has {key.shape[batch_dim]} "
                f"(batch_first={self.batch_first})"
            )
        return batched


def _sdpa_mask(
    key_padding_mask: Tensor | None, attn_mask: Tensor | None, B: int, H: int, extra: int, dtype: torch.dtype
) -> Tensor | None:
    """torch's masks -> one SDPA-convention mask (bool True = attend, float = added).

    key_padding_mask (B, S) becomes a (B, 1, 1, S') view, a 2-D attn_mask an (L, S')
    tensor, a 3-D one a (B, H, L, S') view, where S' = S + ``extra`` appended keys that
    every query may attend.  Only when both are given is one (B, H|1, L, S') mask built.
    """
    kpm = None
    if key_padding_mask is not None:
        kpm = _pad_keys(_to_sdpa(key_padding_mask), extra)
        kpm = kpm.view(B, 1, 1, kpm.shape[-1])  # (B, 1, 1, S')
    am = None
    if attn_mask is not None:
        am = _pad_keys(_to_sdpa(attn_mask), extra)  # (L, S') or (B·H, L, S')
        if am.dim() == 3:
            am = am.unflatten(0, (B, H))  # (B, H, L, S')
    if kpm is None or am is None:
        return kpm if kpm is not None else am
    if kpm.dtype == torch.bool and am.dtype == torch.bool:
        return kpm & am  # (B, H|1, L, S')
    return _to_float(kpm, dtype) + _to_float(am, dtype)  # (B, H|1, L, S')


def _to_sdpa(mask: Tensor) -> Tensor:
    """torch MHA's bool convention (True = masked out) -> SDPA's (True = attend); float unchanged."""
    return ~mask if mask.dtype == torch.bool else mask


def _to_float(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """An SDPA-convention mask as float: 0 where attended, -inf where not."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _pad_keys(mask: Tensor, extra: int) -> Tensor:
    """Append ``extra`` key columns that every query attends (True, or 0.0)."""
    if extra == 0:
        return mask
    fill = mask.new_ones if mask.dtype == torch.bool else mask.new_zeros
    return torch.cat([mask, fill((*mask.shape[:-1], extra))], dim=-1)
