"""KV caches for generation with Hugging Face models: quantized (KIVI) and compressed (fixed size).

* :class:`QuantizedCache` -- keys per channel, values per token, 8/4/2-bit codes packed
  with fp16 scales and zero points; attention dequantizes block by block.  With
  ``key_bits=key_bit_plan(model, batches)``, key channels get 0/b/2b bits by query energy
  (and, with ``value_channels=k``, each kv head's k largest value channels are held apart).
* :class:`CompressedMemory` -- attention sinks + a recent window + a FAVOR+ summary of
  everything evicted: constant size however long the sequence.
* :func:`cache_attention` reads the :class:`CacheView` pairs their ``update()`` returns;
  :func:`enable` makes a model use it (registered as ``"attnkit_cache"``).

Needs transformers (``pip install -e '.[eval]'``).
"""

from __future__ import annotations

try:
    import transformers.cache_utils  # noqa: F401
except ImportError:  # pragma: no cover
    raise ImportError("attnkit.cache needs transformers: pip install -e '.[eval]' (transformers 5.x)") from None

from .hf import NAME, attention_forward, enable, hf_cache_attention, register
from .keyplan import key_bit_plan, load_plan, save_plan
from .memory import CompressedMemory
from .quant import dequantize, pack, quantize, unpack
from .quantized import QuantizedCache
from .views import CacheView, CacheViewError, cache_attention

__all__ = [
    "NAME",
    "CacheView",
    "CacheViewError",
    "CompressedMemory",
    "QuantizedCache",
    "attention_forward",
    "cache_attention",
    "dequantize",
    "enable",
    "hf_cache_attention",
    "key_bit_plan",
    "load_plan",
    "pack",
    "quantize",
    "register",
    "save_plan",
    "unpack",
]
