"""What a cache's ``update()`` returns, and the attention that reads it block by block.

Hugging Face models call ``key, value = cache.update(k, v, layer_idx)`` and hand the
result straight to the registered attention function.  attnkit's caches return two
:class:`CacheView` objects instead of tensors: light handles on one :class:`Snapshot`
(the packed groups, the full-precision residual and the new tokens, by reference), with
``.shape``, ``.dtype`` and ``.device`` of the tensors they stand for.
:func:`cache_attention` walks the snapshot one block of keys at a time, dequantizes
(or reads) that block in fp32 and merges it into an online softmax (log-sum-exp), so no
full-precision copy of the whole cache is ever held.  Any other use of a view -- a torch
function, indexing, a tensor method -- raises :class:`CacheViewError` saying what to do.

Causal alignment of a chunk of N new tokens after P cached ones (top-left within the
chunk, so every query sees all P cached keys)::

            cached keys (P)     new keys (N)
    q0      x x x x x x x x     x . . .
    q1      x x x x x x x x     x x . .
    q2      x x x x x x x x     x x x .
    q3      x x x x x x x x     x x x x
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.reference import causal_keep

__all__ = ["CacheView", "CacheViewError", "OnlineSoftmax", "Snapshot", "cache_attention"]

NEG_INF = float("-inf")

_HOW = (
    "a CacheView stands for keys/values held quantized or compressed by an attnkit cache and "
    "can only be read by attnkit.cache.cache_attention; run the model with attnkit's attention "
    "(attnkit.cache.enable(model), or attnkit.patch(model, ...)), or build the cache with "
    "materialize=True to get plain dequantized tensors for an unpatched model"
)


class CacheViewError(TypeError):
    """A :class:`CacheView` was used as a tensor."""


class Snapshot:
    """The state one attention call reads: a cache layer's contents before the update,
    plus the new tokens.  Subclasses implement :meth:`attend` and :meth:`materialize`."""

    batch: int
    heads: int
    length: int  # keys the call sees (cached + new; for a compressed memory, as if all kept)
    head_dim: int
    value_dim: int
    dtype: torch.dtype
    device: torch.device

    def attend(self, q: Tensor, *, is_causal: bool, scale: float, keep: Tensor | None) -> Tensor:
        """q grouped (B, Hkv, G·N, D) fp32 (row r is query r % N of group r // N) ->
        (B, Hkv, G·N, Dv) fp32."""
        raise NotImplementedError

    def materialize(self) -> tuple[Tensor, Tensor]:
        """The keys and values this call attends, as plain tensors in the cache dtype:
        (B, Hkv, S, D), (B, Hkv, S, Dv)."""
        raise NotImplementedError


class CacheView:
    """The keys (``which="key"``) or values of a :class:`Snapshot`; not a tensor.

    Attributes:
        snapshot: what :func:`cache_attention` reads.
        shape: (B, Hkv, S, D) for keys, (B, Hkv, S, Dv) for values.
        dtype, device: those of the cache's full-precision tensors.
    """

    __slots__ = ("snapshot", "which")

    def __init__(self, snapshot: Snapshot, which: str):
        object.__setattr__(self, "snapshot", snapshot)
        object.__setattr__(self, "which", which)

    @property
    def shape(self) -> torch.Size:
        s = self.snapshot
        return torch.Size((s.batch, s.heads, s.length, s.head_dim if self.which == "key" else s.value_dim))

    @property
    def dtype(self) -> torch.dtype:
        return self.snapshot.dtype

    @property
    def device(self) -> torch.device:
        return self.snapshot.device

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return 4

    def materialize(self) -> Tensor:
        """The plain dequantized tensor (tests and debugging; holds the whole thing)."""
        return self.snapshot.materialize()[0 if self.which == "key" else 1]

    def __repr__(self) -> str:
        return f"CacheView({self.which}, shape={tuple(self.shape)}, {type(self.snapshot).__name__})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise CacheViewError(f"{getattr(func, '__name__', func)}() got a CacheView: {_HOW}")

    def __getattr__(self, name):
        raise CacheViewError(f"CacheView has no tensor attribute {name!r}: {_HOW}")

    def __getitem__(self, index):
        raise CacheViewError(f"CacheView cannot be indexed: {_HOW}")

    def __setattr__(self, name, value):
        raise CacheViewError(f"CacheView is read-only: {_HOW}")

    def __array__(self, *args, **kwargs):
        raise CacheViewError(f"CacheView cannot be converted to an array: {_HOW}")


class OnlineSoftmax:
    """Running softmax statistics over key blocks (online softmax, FlashAttention-2):
    ``Σ_j exp(s_j) = l·exp(m)`` and ``Σ_j exp(s_j) v_j = acc·exp(m)``.

    Shapes: m, l (..., M); acc (..., M, Dv); fp32.  ``m`` is -inf until a row sees a key.
    """

    def __init__(self, like: Tensor, rows: tuple[int, ...], dv: int):
        self.m = like.new_full(rows, NEG_INF)
        self.l = like.new_zeros(rows)
        self.acc = like.new_zeros((*rows, dv))

    def add(self, scores: Tensor, v: Tensor | None = None, *, pv=None) -> None:
        """Merge one block: scores (..., M, L) (−inf = masked) and values v (..., L, Dv), or
        ``pv(p) -> (..., M, Dv)`` computing p @ v for a block whose values are packed."""
        m_new = torch.maximum(self.m, scores.amax(dim=-1))
        m_safe = torch.where(m_new == NEG_INF, 0.0, m_new)  # a row with no key yet
        p = torch.exp(scores - m_safe[..., None])  # (..., M, L); 0 where masked
        alpha = torch.exp(self.m - m_safe)  # (..., M); 0 while the row was empty
        self.l = self.l * alpha + p.sum(dim=-1)
        self.acc = self.acc * alpha[..., None] + (torch.matmul(p, v) if pv is None else pv(p))
        self.m = m_new

    def result(self) -> Tensor:
        """acc / l; rows without keys give 0."""
        return self.acc / torch.where(self.l > 0, self.l, 1.0)[..., None]


def new_token_keep(n: int, groups: int, device: torch.device) -> Tensor:
    """Causal keep-mask of the grouped rows (G·N) against the chunk's own N keys: (G·N, N)."""
    return causal_keep(0, n, 0, n, device).repeat(groups, 1)


def cache_attention(
    query: Tensor,
    key: CacheView,
    value: CacheView,
    *,
    is_causal: bool = True,
    scale: float | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """Attention of new queries over an attnkit cache, block by block.

    Shape legend: B batch, Hq query heads, Hkv key/value heads (Hq % Hkv == 0; no repeat),
    N new queries, S keys the call sees (cached + new), D head dim, Dv value dim.

    Args:
        query: (B, Hq, N, D), the queries of the N new tokens (after RoPE).
        key, value: the two views one ``cache.update(k, v, layer_idx)`` returned.
        is_causal: the new tokens attend each other causally (top-left aligned within the
            chunk: query i sees every cached key and new keys 0..i); False: all of them.
        scale: softmax scale (default 1/√D).
        attn_mask: None or a bool key-padding mask broadcastable to (B, 1, 1, S), True =
            attend (QuantizedCache only).

    Returns:
        (B, Hq, N, Dv) in query's dtype.  Statistics and accumulation in fp32.

    Raises:
        TypeError: ``key``/``value`` are not views of the same update.
        ValueError: shapes do not match.

    Equivalent to (for a QuantizedCache; a CompressedMemory adds its summary's estimate)::

        k, v = key.materialize(), value.materialize()       # (B, Hkv, S, D): all of it at once
        keep = causal over the last N columns, True elsewhere
        out = attnkit.attention(query, k, v, attn_mask=keep, scale=scale)
    """
    if not (isinstance(key, CacheView) and isinstance(value, CacheView)):
        raise TypeError(
            f"cache_attention: arguments 'key' and 'value' must be the CacheViews returned by an attnkit cache's "
            f"update(), got {type(key).__name__} and {type(value).__name__}; for plain tensors use attnkit.attention"
        )
    snap = key.snapshot
    if value.snapshot is not snap or key.which != "key" or value.which != "value":
        raise TypeError("cache_attention: 'key' and 'value' must be the (key, value) pair of one cache update()")
    if query.dim() != 4:
        raise ValueError(f"cache_attention: argument 'query' must be (B, Hq, N, D), got shape {tuple(query.shape)}")
    b, hq, n, d = query.shape
    if b != snap.batch or d != snap.head_dim or hq % snap.heads:
        raise ValueError(
            f"cache_attention: query (B, Hq, N, D) = {tuple(query.shape)} does not fit the cache's keys "
            f"{tuple(key.shape)}: B and D must match and Hq be a multiple of Hkv"
        )
    keep = None
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool or attn_mask.dim() != 4 or attn_mask.shape[1:3] != (1, 1):
            raise ValueError(
                f"cache_attention: argument 'attn_mask' must be a bool key-padding mask (B, 1, 1, S), got "
                f"{attn_mask.dtype} of shape {tuple(attn_mask.shape)}; other mask patterns need plain tensors "
                f"(build the cache with materialize=True)"
            )
        keep = attn_mask[..., -snap.length :]  # (B|1, 1, 1, S)
    g = hq // snap.heads
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    q = query.float().reshape(b, snap.heads, g * n, d)  # (B, Hkv, G·N, D): heads h·G..h·G+G−1 share kv head h
    out = snap.attend(q, is_causal=is_causal, scale=scale, keep=keep)  # (B, Hkv, G·N, Dv)
    return out.reshape(b, hq, n, -1).to(query.dtype)  # (B, Hq, N, Dv)
