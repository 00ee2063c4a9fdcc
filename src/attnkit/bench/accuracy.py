"""Error of a method against exact attention: the figures every error table reports."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.inputs import prepare_inputs
from ..core.reference import reference_attention
from ..core.registry import MethodSpec, resolve

__all__ = ["approximation_errors"]


def approximation_errors(
    method: MethodSpec,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    *,
    state: torch.nn.Module | None = None,
    probabilities: bool = True,
) -> dict[str, float]:
    """Relative Frobenius error of the output against float64 exact attention and,
    when ``probabilities``, the MSE and max-abs error of the implied attention matrix
    (materialised: small N only).

    Returns:
        {"out_rel_fro": ..., "prob_mse": ..., "prob_max_abs": ...}
    """
    m = resolve(method)
    inp = prepare_inputs(q, k, v, attn_mask, 0.0, is_causal)
    with torch.no_grad():
        out, _ = m.forward(inp, state=state)
        ref_out, ref_p = reference_attention(q, k, v, attn_mask, is_causal=is_causal, return_weights=True)
        result = {"out_rel_fro": (torch.linalg.vector_norm(out.double() - ref_out) / torch.linalg.vector_norm(ref_out)).item()}
        if probabilities:
            p = m.implied_weights(inp, state).double()
            result["prob_mse"] = (p - ref_p).pow(2).mean().item()
            result["prob_max_abs"] = (p - ref_p).abs().max().item()
    return result
