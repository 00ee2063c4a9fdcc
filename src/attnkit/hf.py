"""Hugging Face transformers models through their attention interface (used by :func:`attnkit.patch`).

transformers (5.x) looks up each layer's attention function by name,
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``, and the function that builds
the model's attention mask by the same name, ``ALL_MASK_ATTENTION_FUNCTIONS[...]``.  A
patch registers both under a name of its own (``attnkit_<n>``), gives the patched model
its own copy of the config (models built from one config object share it) set to that
name, and undoes all three on ``remove()``: no other model sees a change.

The mask function is what keeps memory O(N).  transformers' SDPA and eager mask
functions materialise a (B, 1, N, S) mask whenever there is padding (eager: always).
Ours, like the flash-attention one, returns None when the mask is plain causal or plain
bidirectional, and the (B, S) padding mask when there is padding; the attention function
turns that into ``is_causal`` (from the module, as transformers' own backends do) and a
(B, 1, 1, S) key-padding mask.  Mask patterns attnkit cannot express that way (packed
sequences, sliding windows, custom overlays) fall back to transformers' materialised
boolean mask, with a warning.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import warnings

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from .core.capabilities import Method
from .core.registry import run
from .ops import Exact

__all__ = ["attention_forward", "is_transformers_attention", "mask_function", "patch_transformers"]

_names = itertools.count()
_EXACT = Exact()


def is_transformers_attention(module: nn.Module) -> bool:
    """True for a transformers attention module: one whose forward dispatches through
    ``ALL_ATTENTION_FUNCTIONS`` (LlamaAttention, BertSelfAttention, ...)."""
    forward = inspect.unwrap(type(module).forward)
    code = getattr(forward, "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names and hasattr(module, "config")


def attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[Tensor, Tensor | None]:
    """The attention function registered with transformers' ``AttentionInterface``.

    Shape legend: B batch, Hq query heads, Hkv key/value heads, N queries, S keys, D head dim.

    Args:
        module: the calling attention module; its ``attnkit_method`` (default exact
            ``"auto"``), ``attn_state`` and ``attnkit_checkpoint`` say what runs.
        query: (B, Hq, N, D), after RoPE.
        key: (B, Hkv, S, D).
        value: (B, Hkv, S, Dv).
        attention_mask: what :func:`mask_function` built: None, a (B, S') bool padding mask
            (True = attend; its last S columns are these keys), or a 4-D mask (a
            materialised pattern, or one the caller passed) used as is.
        dropout: attention dropout probability (transformers passes 0.0 in eval).
        scaling: softmax scale.
        is_causal: overrides ``module.is_causal`` when given.
        kwargs: ``output_attentions=True`` returns the weights (exact methods that can).

    Returns:
        (B, N, Hq, Dv) output and the (B, Hq, N, S) weights or None (weights only when
        ``output_attentions``; a method that cannot return them raises).
    """
    method: Method = getattr(module, "attnkit_method", None) or _EXACT
    if is_causal is None:
        # transformers' own rule: the module decides, a config may turn causality off.
        is_causal = bool(getattr(module, "is_causal", False)) and getattr(module.config, "is_causal", True)
    if not isinstance(key, Tensor):  # an attnkit cache's views (QuantizedCache, CompressedMemory)
        from .cache.hf import hf_cache_attention
        from .cache.views import CacheView

        if isinstance(key, CacheView):
            if not method.capabilities.exact:
                raise ValueError(
                    f"attnkit: layer {getattr(module, 'layer_idx', '?')} runs {method.spec()}, which cannot read an "
                    "attnkit cache; caches are read block by block by exact attention: patch this model with an "
                    "exact method (\"auto\") to generate with QuantizedCache/CompressedMemory"
                )
            return hf_cache_attention(query, key, value, attention_mask, is_causal=is_causal, scale=scaling), None
    n, s = query.shape[-2], key.shape[-2]
    mask = None
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            mask = attention_mask[:, -s:].to(torch.bool)[:, None, None, :]  # (B, 1, 1, S)
        else:
            mask, is_causal = attention_mask, False  # the 4-D mask carries the whole pattern
    if is_causal and n != s:
        if n == 1:
            is_causal = False  # one new query after a cache sees every key
        else:
            # Queries are the last N of S positions (a cache prefix): bottom-right
            # alignment, which is_causal (top-left) cannot say.  N x S, but only here.
            keep = torch.ones(n, s, dtype=torch.bool, device=query.device).tril(s - n)  # (N, S)
            mask = keep if mask is None else mask & keep  # (B, 1, N, S)
            is_causal = False
    need_weights = bool(kwargs.get("output_attentions", False))
    state = getattr(module, "attn_state", None)

    def attend(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor | None]:
        return run(
            q, k, v, mask, dropout, is_causal, scaling,
            method=method, need_weights=need_weights, state=state,
        )  # (B, Hq, N, Dv), weights (B, Hq, N, S) | None

    if getattr(module, "attnkit_checkpoint", False) and torch.is_grad_enabled():
        out, weights = _checkpoint(attend, query, key, value, use_reentrant=False)
    else:
        out, weights = attend(query, key, value)
    return out.transpose(1, 2), weights  # (B, N, Hq, Dv)


_warned_dense = False


def mask_function(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: Tensor | None = None,
    **kwargs,
) -> Tensor | None:
    """The mask function registered with transformers' ``AttentionMaskInterface``.

    Called by ``create_causal_mask`` / ``create_bidirectional_mask`` once per forward.

    Returns:
        None when no key is padded (causality is the module's ``is_causal``), a (B, S)
        bool padding mask (True = attend) when some are, or -- for mask patterns other
        than plain causal / bidirectional -- transformers' materialised (B, 1, N, S)
        bool mask.
    """
    from transformers import masking_utils as mu

    plain = (mu.causal_mask_function, mu.bidirectional_mask_function)
    if mask_function is None or mask_function in plain:
        if attention_mask is None:
            return None
        padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)  # (B, >= offset + S)
        padding = padding[:, kv_offset : kv_offset + kv_length]  # (B, S)
        return None if bool(padding.all()) else padding
    global _warned_dense
    if not _warned_dense:
        _warned_dense = True
        warnings.warn(
            "attnkit.patch: this model's attention mask is not plain causal or bidirectional (packed "
            "sequences, a sliding window or an overlay); transformers' materialised (B, 1, N, S) mask is "
            "used, so mask memory is O(N*S)",
            stacklevel=2,
        )
    kwargs.pop("allow_is_causal_skip", None)
    return mu.sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
        allow_is_causal_skip=False, **kwargs,
    )


def _head_shape(module: nn.Module) -> tuple[int, int]:
    """(Hq, D) of a transformers attention module."""
    config = module.config
    heads = getattr(module, "num_heads", None) or getattr(module, "num_attention_heads", None)
    heads = heads or getattr(config, "num_attention_heads")
    head_dim = getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None)
    head_dim = head_dim or getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(heads), int(head_dim)


def patch_transformers(model: nn.Module, method_for, checkpoint: bool, handle) -> set[int]:
    """Route every transformers attention module of ``model`` through attnkit.

    ``method_for(layer) -> Method | None`` says what each layer runs (None: exact
    "auto").  Undo steps are appended to ``handle._undo``.  Returns the layer indices found.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    attn = [m for m in model.modules() if is_transformers_attention(m)]
    if not attn:
        return set()
    name = f"attnkit_{next(_names)}"
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, mask_function)
    handle._undo.append(lambda: AttentionInterface._global_mapping.pop(name, None))
    handle._undo.append(lambda: AttentionMaskInterface._global_mapping.pop(name, None))

    # The patched model gets its own config copy: models made from one config object
    # share it, and the name must reach this model only.
    configs = {id(m.config): m.config for m in model.modules() if _is_config(getattr(m, "config", None))}
    copies = {key: _own_copy(c) for key, c in configs.items()}
    for m in model.modules():
        old = getattr(m, "config", None)
        if _is_config(old) and id(old) in copies:
            m.config = copies[id(old)]
            handle._undo.append(lambda m=m, old=old: setattr(m, "config", old))
    for config in copies.values():
        config._attn_implementation = name

    found = set()
    for order, m in enumerate(attn):
        layer = getattr(m, "layer_idx", None)
        layer = order if layer is None else int(layer)
        found.add(layer)
        method = method_for(layer)
        if method is None:
            continue
        m.attnkit_method = method
        m.attnkit_checkpoint = checkpoint
        handle._undo.append(lambda m=m: _clear(m))
        heads, head_dim = _head_shape(m)
        state = method.make_state(heads, head_dim)
        if state is not None:
            weight = next(m.parameters(), None)
            if weight is not None:
                state = state.to(device=weight.device, dtype=weight.dtype)
            m.attn_state = state
        handle.methods[layer] = method
        handle._modules.append((layer, m))
    return found


def _is_config(obj) -> bool:
    return obj is not None and hasattr(type(obj), "_attn_implementation")


def _own_copy(config):
    return copy.deepcopy(config)  # deep: the name setter also writes the sub-configs


def _clear(m: nn.Module) -> None:
    for attr in ("attnkit_method", "attnkit_checkpoint"):
        m.__dict__.pop(attr, None)
    if "attn_state" in m._modules:
        del m._modules["attn_state"]
