"""Hugging Face transformers integration: the attention function that reads attnkit caches.

``enable(model)`` registers :func:`attention_forward` under the name ``"attnkit_cache"``
(with attnkit's O(N) mask function, :func:`attnkit.hf.mask_function`) and switches the
model to it; ``handle.remove()`` switches back.  Nothing is registered on import.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import hf as _hf
from .views import CacheView, cache_attention

__all__ = ["NAME", "CacheAttentionHandle", "attention_forward", "enable", "hf_cache_attention", "register"]

NAME = "attnkit_cache"


def hf_cache_attention(
    query: Tensor, key: CacheView, value: CacheView, attention_mask: Tensor | None, *, is_causal: bool,
    scale: float | None,
) -> Tensor:
    """:func:`cache_attention` with the mask forms transformers hands an attention function.

    Args:
        query: (B, Hq, N, D).  key, value: the views ``cache.update()`` returned.
        attention_mask: what attnkit's mask function built: None or a (B, S') bool padding
            mask (True = attend; its last S columns are this call's keys).  4-D masks
            (sliding windows, packed sequences) are refused: they need plain tensors.
        is_causal: the module's causality (the new tokens attend each other causally).
        scale: the softmax scale.

    Returns:
        (B, N, Hq, Dv), the layout transformers' attention functions return.
    """
    mask = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(
                f"attnkit cache attention: got a {attention_mask.dim()}-D attention mask; only padding masks "
                "(B, S) are read from a quantized/compressed cache (sliding windows, packed sequences: build the "
                "cache with materialize=True, or use transformers' DynamicCache)"
            )
        if not bool(attention_mask.all()):
            mask = attention_mask[:, -key.shape[-2] :].to(torch.bool)[:, None, None, :]  # (B, 1, 1, S)
    out = cache_attention(query, key, value, is_causal=is_causal, scale=scale, attn_mask=mask)
    return out.transpose(1, 2)  # (B, N, Hq, Dv)


# The function registered as ``"attnkit_cache"``: attnkit's own Hugging Face attention
# (:func:`attnkit.hf.attention_forward`), which reads cache views block by block with
# exact attention (:func:`hf_cache_attention`) and plain tensors with exact "auto" -- the
# same function a model patched with ``attnkit.patch(model, "auto")`` runs.
attention_forward = _hf.attention_forward


def register() -> str:
    """Register ``"attnkit_cache"`` (attention and mask function) with transformers; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, _hf.mask_function)
    return NAME


class CacheAttentionHandle:
    """Undoes :func:`enable`: ``remove()`` puts the model's previous attention back."""

    def __init__(self, model: nn.Module, previous: str):
        self.model, self.previous = model, previous

    def remove(self) -> None:
        self.model.set_attn_implementation(self.previous)

    def __enter__(self) -> CacheAttentionHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def enable(model: nn.Module) -> CacheAttentionHandle:
    """Run ``model``'s attention through attnkit so that it reads attnkit caches block by block.

    Args:
        model: a transformers ``PreTrainedModel`` using the attention interface (Llama-style).

    Returns:
        A handle; ``handle.remove()`` restores the previous attention implementation.
    """
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(
            f"attnkit.cache.enable: argument 'model' must be a transformers PreTrainedModel, got {type(model).__name__}"
        )
    previous = model.config._attn_implementation
    model.set_attn_implementation(register())
    return CacheAttentionHandle(model, previous)
