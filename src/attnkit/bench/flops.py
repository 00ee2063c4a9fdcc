"""FLOP counts of attention, by the conventions the FlashAttention papers use.

Exact attention does two matmuls, ``Q K^T`` (N x S x D multiply-adds) and ``P V``
(N x S x Dv), so a forward pass costs ``2·B·H·N·S·(D + Dv)`` FLOPs, i.e.
``4·B·H·N·S·D`` when Dv = D.  Softmax, scaling and masking are not counted (they are
O(N·S), not O(N·S·D)).  A causal mask keeps about half the pairs, counted as exactly
half.  The backward pass does five matmuls to the forward's two, so it costs 2.5x the
forward (Dao, "FlashAttention-2", 2023, section 4.1); recomputing ``P`` in backward is
not counted, so a kernel that recomputes is not credited for it.
"""

from __future__ import annotations

from typing import Callable

__all__ = ["MODES", "attention_flops", "counted_flops"]

MODES = ("fwd", "bwd", "fwd_bwd")

_BACKWARD_OVER_FORWARD = 2.5


def attention_flops(
    b: int, h: int, n: int, s: int, d: int, dv: int | None = None, *, causal: bool = False, mode: str = "fwd"
) -> float:
    """FLOPs of one exact-attention call.

    Args:
        b: batch size (product of all leading dims).
        h: query heads.
        n: queries.
        s: keys.
        d: head dim of q and k.
        dv: head dim of v (default ``d``).
        causal: count half the (query, key) pairs.
        mode: "fwd", "bwd" (2.5x forward) or "fwd_bwd" (3.5x forward).

    Returns:
        The FLOP count (a float: the causal half and the 2.5 factor need not be integral).

    Raises:
        ValueError: an unknown ``mode`` or a negative size.

    Equivalent to::

        fwd = 4 * b * h * n * s * d            # Dv = D, not causal
    """
    if mode not in MODES:
        raise ValueError(f"attention_flops(mode={mode!r}): mode must be one of {MODES}")
    dv = d if dv is None else dv
    if min(b, h, n, s, d, dv) < 0:
        raise ValueError(f"attention_flops: sizes must be >= 0, got b={b} h={h} n={n} s={s} d={d} dv={dv}")
    fwd = 2.0 * b * h * n * s * (d + dv)
    if causal:
        fwd /= 2
    if mode == "fwd":
        return fwd
    if mode == "bwd":
        return _BACKWARD_OVER_FORWARD * fwd
    return (1 + _BACKWARD_OVER_FORWARD) * fwd


def counted_flops(fn: Callable[[], object]) -> int | None:
    """FLOPs of one ``fn()`` as ``torch.utils.flop_counter.FlopCounterMode`` counts them.

    The counter knows matmuls, convolutions and the unfused attention ops; it counts 0
    for torch's fused CPU SDPA kernel and for anything it has no formula for.  Returns
    None when it counts nothing, so that a report never prints 0 FLOPs for a fused
    kernel: the caller falls back to the formula and says so.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    total = int(counter.get_total_flops())
    return total or None
