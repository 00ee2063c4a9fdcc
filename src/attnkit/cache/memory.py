"""CompressedMemory: a KV cache of fixed size -- attention sinks, a recent window kept
exactly, and a FAVOR+ random-feature summary of every key/value evicted from the window.

Per layer and kv head it holds the first ``sinks`` tokens, the newest ``window`` tokens,
and ``Σ_{j evicted} φ(k_j) [v_j, 1]^T`` ((Dv+1) × F, at one running shift, see
:class:`attnkit.ops.performer.KeyState`): however long the sequence grows, its size
stays ``(sinks + window)·(D + Dv)`` numbers plus ``(Dv+1)·F + 1``.

A query attends the sinks, the window and the new tokens exactly and the summary through
its features, under one normaliser (as attnkit's Hybrid, :func:`attnkit.ops.hybrid._combine`):

    out = (Σ_{j exact} e^{s_j} v_j + e^{shift} φ(q)·S_v) / (Σ_{j exact} e^{s_j} + e^{shift} φ(q)·S_1)

References:
    Choromanski et al., "Rethinking Attention with Performers", ICLR 2021 (FAVOR+).
    Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from transformers.cache_utils import Cache

from ..ops.hybrid import _combine  # one normaliser for exact + feature mass, as Hybrid
from ..ops.local import BandStats
from ..ops.performer import KeyState, feature_logits, positive_features, projection_matrix
from .layer import HeldTensorsLayer
from .views import NEG_INF, CacheView, OnlineSoftmax, Snapshot, new_token_keep

__all__ = ["CompressedMemory", "MemoryLayer", "MemorySnapshot"]


class MemorySnapshot(Snapshot):
    """A :class:`MemoryLayer` before one update, plus the new tokens: exact keys
    (sinks, window, new) and the summary of the evicted ones."""

    def __init__(self, layer: MemoryLayer, k_new: Tensor, v_new: Tensor):
        self.exact_k = torch.cat([layer.sink_keys, layer.window_keys, k_new], dim=-2)  # (B, H, L, D)
        self.exact_v = torch.cat([layer.sink_values, layer.window_values, v_new], dim=-2)  # (B, H, L, Dv)
        summary = layer.summary
        self.state_t = summary.state_t if summary is not None else None  # (B, H, Dv+1, F)
        self.shift = summary.m if summary is not None else None  # (B, H, 1, 1)
        self.projection, self.scale, self.evicted = layer.projection, layer.scale, layer.evicted
        self.batch, self.heads, self.length, self.head_dim = self.exact_k.shape
        self.value_dim = v_new.shape[-1]
        self.new = k_new.shape[-2]
        self.dtype, self.device = k_new.dtype, k_new.device

    def attend(self, q: Tensor, *, is_causal: bool, scale: float, keep: Tensor | None) -> Tensor:
        if keep is not None:
            raise ValueError(
                "CompressedMemory: padded batches are not supported (evicted keys are summed into one state); "
                "run unpadded sequences, one length per batch"
            )
        if not math.isclose(scale, self.scale, rel_tol=1e-6):
            raise ValueError(
                f"CompressedMemory: the attention's scale {scale} differs from the cache's scale {self.scale}, which "
                f"its summary was built with; build the cache with scale={scale}"
            )
        n = self.new
        band = OnlineSoftmax(q, q.shape[:-1], self.value_dim)
        scores = torch.matmul(q * scale, self.exact_k.float().transpose(-1, -2))  # (B, H, G·N, L)
        if is_causal and n > 1:
            scores[..., -n:].masked_fill_(~new_token_keep(n, q.shape[-2] // n, q.device), NEG_INF)
        band.add(scores, self.exact_v.float())
        if self.evicted == 0 or self.projection is None:
            return band.result()
        phi_q, shift_q = positive_features(q, self.projection, scale, is_query=True)  # (B, H, G·N, F), (…, 1)
        far = torch.matmul(phi_q, self.state_t.transpose(-1, -2))  # (B, H, G·N, Dv+1)
        m = torch.where(band.m == NEG_INF, 0.0, band.m)
        return _combine(BandStats(m, band.l, band.acc), far, shift_q + self.shift)

    def materialize(self) -> tuple[Tensor, Tensor]:
        """The exactly kept keys and values only (the summary has no per-token form)."""
        return self.exact_k, self.exact_v


class MemoryLayer(HeldTensorsLayer):
    """One layer of a :class:`CompressedMemory`.

    Held tensors: ``sink_keys``/``sink_values`` (B, H, <= sinks, D|Dv) and
    ``window_keys``/``window_values`` (B, H, <= window, D|Dv) in the model's dtype;
    ``summary.state_t`` (B, H, Dv+1, F) and ``summary.m`` (B, H, 1, 1) fp32.  The (F, D)
    projection is shared by all layers and counted once, by the cache.
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, sinks: int, window: int, projection: Tensor | None, scale: float | None):
        super().__init__()
        self.sinks, self.window, self.projection, self.scale = sinks, window, projection, scale
        self.seen = self.evicted = 0
        self.sink_keys = self.sink_values = self.window_keys = self.window_values = None
        self.summary = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        b, h, _, d = key_states.shape
        dv = value_states.shape[-1]
        self.scale = 1.0 / math.sqrt(d) if self.scale is None else self.scale
        self.sink_keys = self.window_keys = key_states.new_empty(b, h, 0, d)
        self.sink_values = self.window_values = value_states.new_empty(b, h, 0, dv)
        features = 0 if self.projection is None else self.projection.shape[0]
        if self.projection is not None:
            if self.projection.shape[1] != d:
                raise ValueError(f"CompressedMemory: the projection is for head dim {self.projection.shape[1]}, got {d}")
            self.projection = self.projection.to(key_states.device)
        if features:
            self.summary = KeyState(key_states.new_empty(0, dtype=torch.float32), (b, h), features, dv + 1)
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        """Add N new tokens; returns two :class:`CacheView` over (sinks, window, new) and the summary."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        snap = MemorySnapshot(self, key_states, value_states)
        take = min(self.sinks - self.sink_keys.shape[-2], key_states.shape[-2])
        if take > 0:
            self.sink_keys = torch.cat([self.sink_keys, key_states[:, :, :take]], dim=-2)
            self.sink_values = torch.cat([self.sink_values, value_states[:, :, :take]], dim=-2)
        k = torch.cat([self.window_keys, key_states[:, :, take:]], dim=-2)
        v = torch.cat([self.window_values, value_states[:, :, take:]], dim=-2)
        excess = k.shape[-2] - self.window
        if excess > 0:
            if self.projection is not None:
                logits = feature_logits(k[:, :, :excess].float(), self.projection, self.scale)  # (B, H, E, F)
                phi = self.summary.features(logits, inplace=True)
                v1 = torch.cat([v[:, :, :excess].float(), v.new_ones(*v.shape[:2], excess, 1, dtype=torch.float32)], -1)
                self.summary.absorb(phi, v1)  # (B, H, Dv+1, F)
            self.evicted += excess
            k, v = k[:, :, excess:].clone(), v[:, :, excess:].clone()  # clone: free the evicted storage
        self.window_keys, self.window_values = k, v
        self.seen += key_states.shape[-2]
        return CacheView(snap, "key"), CacheView(snap, "value")

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor the layer holds, by name (the shared projection excluded)."""
        if not self.is_initialized:
            return {}
        out = {name: getattr(self, name) for name in ("sink_keys", "sink_values", "window_keys", "window_values")}
        if self.projection is not None:
            out.update(state=self.summary.state_t, shift=self.summary.m)
        return out

    def reset(self) -> None:
        self.__init__(self.sinks, self.window, self.projection, self.scale)

    def _select(self, fn) -> None:
        if self.is_initialized:
            for name in ("sink_keys", "sink_values", "window_keys", "window_values"):
                setattr(self, name, fn(getattr(self, name)))
            if self.summary is not None:
                self.summary.state_t, self.summary.m = fn(self.summary.state_t), fn(self.summary.m)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("CompressedMemory cannot crop: evicted tokens are summed into its state")


class CompressedMemory(Cache):
    """A fixed-size KV cache: ``sinks`` first tokens + the newest ``window`` exactly + a
    FAVOR+ summary of everything evicted (see :mod:`attnkit.cache.memory`).

    Args:
        sinks: first tokens kept for good (attention sinks).
        window: newest tokens kept exactly.  Within one forward of N new tokens, they also
            see each other and the whole window exactly (the cache holds window + N during
            the call, window after it).
        features: F random features of the summary; 0 = no summary (a sink + window cache
            that drops evicted tokens).
        scale: the softmax scale the model uses (default 1/√D, as Llama-style models);
            the summary's features depend on it.
        seed: seed of the (F, D) orthogonal random projection, shared by all layers.

    Size per layer: ``(sinks + window)·Hkv·(D + Dv)`` numbers in the model's dtype, plus
    ``Hkv·((Dv+1)·F + 1)`` fp32 numbers of summary; plus one (F, D) fp32 projection.

    Example::

        cache = attnkit.cache.CompressedMemory(sinks=4, window=1024, features=64)
        attnkit.cache.enable(model)
        model.generate(ids, past_key_values=cache, max_new_tokens=256)
    """

    def __init__(self, sinks: int = 4, window: int = 1024, features: int = 64, *, scale: float | None = None,
                 seed: int = 0):
        for name, value, low in (("sinks", sinks, 0), ("window", window, 1), ("features", features, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"CompressedMemory: argument {name!r} must be an int >= {low}, got {value!r}")
        self.sinks, self.window, self.features, self.seed = sinks, window, features, seed
        self.scale = scale
        self.projection = None  # drawn on the first update, when the head dim is known
        super().__init__(layer_class_to_replicate=self._new_layer)

    def _new_layer(self) -> MemoryLayer:
        return MemoryLayer(self.sinks, self.window, None, self.scale)

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        if self.features and self.projection is None:
            self.projection = projection_matrix(self.features, key_states.shape[-1], True, self.seed).to(key_states.device)
        while len(self.layers) <= layer_idx:
            self.layers.append(self._new_layer())
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            layer.projection = self.projection
        return layer.update(key_states, value_states)

    def nbytes(self) -> int:
        """Bytes held: sinks, windows and summaries of all layers, plus the shared projection."""
        shared = self.projection.nbytes if self.projection is not None else 0
        return shared + sum(layer.nbytes() for layer in self.layers)

    def __repr__(self) -> str:
        return (f"CompressedMemory(sinks={self.sinks}, window={self.window}, features={self.features}, "
                f"layers={len(self.layers)}, tokens={self.get_seq_length()})")
