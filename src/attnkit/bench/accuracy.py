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


# Above this many score elements (B·Hq·N·S) the float64 reference runs through torch's
# SDPA in float64 (O(N) memory) instead of materialising the matrix; both are exact
# attention in float64 and agree to ~1e-15 (tests/test_bench_runner.py checks).
MATERIALISE_LIMIT = 2**26


def reference_with_grads(q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor) -> dict[str, Tensor]:
    """Float64 exact attention of (q, k, v) and its gradients for ``grad_out``.

    Args:
        q: (B, Hq, N, D); k: (B, Hkv, S, D); v: (B, Hkv, S, Dv), any float dtype (upcast).
        grad_out: (B, Hq, N, Dv).

    Returns:
        {"out", "dq", "dk", "dv"} in float64.
    """
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    if q.shape[0] * q.shape[-3] * q.shape[-2] * k.shape[-2] <= MATERIALISE_LIMIT:
        out = reference_attention(q64, k64, v64)
    else:
        from .cases import torch_sdpa

        out = torch_sdpa(q64, k64, v64)
    out.backward(grad_out.double())
    return {"out": out.detach(), "dq": q64.grad, "dk": k64.grad, "dv": v64.grad}


def _rel(a: Tensor, ref: Tensor) -> float:
    den = torch.linalg.vector_norm(ref)
    return (torch.linalg.vector_norm(a.double() - ref) / den).item() if den > 0 else float("nan")


def method_errors(
    fn, q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor, ref: dict[str, Tensor], *,
    implied: Tensor | None = None, ref_probs: Tensor | None = None,
) -> dict[str, float]:
    """Errors of one attention callable against :func:`reference_with_grads`' result.

    Args:
        fn: (q, k, v) -> out, run once forward and backward.
        q, k, v, grad_out: the inputs the reference was computed from (any dtype).
        ref: the reference output and gradients.
        implied, ref_probs: the method's implied (B, Hq, N, S) attention matrix and the
            exact one, both float64, to compare (small N only), or None.

    Returns:
        out_rel_fro, grad_rel_fro (largest of q, k, v), grad_rel_fro_q/k/v, and
        prob_mse / prob_max_abs when ``implied`` is given.  Non-finite results stay
        NaN/inf (a method that overflows shows it).
    """
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    res = {"out_rel_fro": _rel(out.detach(), ref["out"])}
    for name, leaf in zip("qkv", leaves):
        res[f"grad_rel_fro_{name}"] = _rel(leaf.grad, ref[f"d{name}"]) if leaf.grad is not None else float("nan")
    res["grad_rel_fro"] = max(res[f"grad_rel_fro_{c}"] for c in "qkv")
    if implied is not None and ref_probs is not None:
        res["prob_mse"] = (implied - ref_probs).pow(2).mean().item()
        res["prob_max_abs"] = (implied - ref_probs).abs().max().item()
    return res
