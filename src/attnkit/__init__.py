"""attnkit: attention for long sequences.

Importing attnkit changes nothing in torch or transformers; every method runs only
when asked for.
"""

from __future__ import annotations

from torch import Tensor

from .core import (
    AttentionInputError,
    Capabilities,
    MethodNotSupportedError,
    explain,
    methods,
    reference_attention,
    register,
)
from .core.registry import MethodSpec, run
from .ops import SDPA, Exact, Math, Tiled
from .ops.blocktopk import BlockTopK
from .ops.hybrid import Hybrid
from .ops.local import Local
from .ops.lowrank import LowRank
from .ops.nystrom import Nystrom
from .ops.performer import Performer
from .nn import MultiheadAttention
from .patch import PatchHandle, patch
from .calibrate import Calibration, calibrate
from .autotune import autotune
from . import distributed

__version__ = "0.1.0"

__all__ = [
    "AttentionInputError",
    "BlockTopK",
    "Calibration",
    "Capabilities",
    "Exact",
    "Hybrid",
    "Local",
    "LowRank",
    "Math",
    "MethodNotSupportedError",
    "MultiheadAttention",
    "Nystrom",
    "PatchHandle",
    "Performer",
    "SDPA",
    "Tiled",
    "attention",
    "autotune",
    "calibrate",
    "distributed",
    "explain",
    "methods",
    "patch",
    "reference_attention",
    "register",
]


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    method: MethodSpec = "auto",
) -> Tensor:
    """Attention with the signature of ``torch.nn.functional.scaled_dot_product_attention``.

    Shape legend: B... any leading batch dims, Hq query heads, Hkv key/value heads
    (Hq % Hkv == 0: grouped-query attention needs no flag), N queries, S keys, D head
    dim, Dv value head dim.

    Args:
        q: (B..., Hq, N, D) queries.
        k: (B..., Hkv, S, D) keys.
        v: (B..., Hkv, S, Dv) values.
        attn_mask: None, bool (True = attend) or float (added to the scores), any shape
            that broadcasts to (B..., Hq, N, S); it is never expanded.
        dropout_p: probability of dropping an attention weight (applied whenever > 0,
            as in SDPA; pass 0.0 in eval).
        is_causal: query i attends key j only if j <= i (top-left aligned when N != S,
            as SDPA).  May be combined with ``attn_mask``.
        scale: softmax scale; default 1/sqrt(D).
        method: "auto" (fastest exact method that serves the call), a name from
            :func:`attnkit.methods` (optionally ``"name:key=value,..."``), or a config
            object such as ``attnkit.Tiled(block_q=128)``.  A named method runs or raises;
            nothing falls back silently.

    Returns:
        (B..., Hq, N, Dv) in q's dtype.  A query row whose keys are all masked gives
        zeros (and zero gradients), never NaN.

    Raises:
        AttentionInputError: inconsistent arguments (the message names which and how to fix).
        MethodNotSupportedError: ``method`` cannot serve these inputs (says why, and
            which methods can).

    Equivalent to::

        s = q @ k.transpose(-1, -2) * scale        # GQA: each k head serves Hq/Hkv q heads
        s = s.masked_fill(~mask, -inf) if mask is bool else s + mask
        p = dropout(softmax(s, dim=-1), dropout_p) # all-masked rows: p = 0
        return p @ v
    """
    out, _ = run(q, k, v, attn_mask, dropout_p, is_causal, scale, method=method)
    return out
