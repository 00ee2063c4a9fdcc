"""Shared test helpers: the tolerance table, input makers and the naive low-precision baseline."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# One tolerance table.  fp32/fp64: absolute error relative to max|reference|.
# fp16/bf16: judged against plain PyTorch math in the same dtype (flash-attention's
# rule): error <= LOWP_FACTOR * naive error + LOWP_FLOOR * max|reference|.
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
GRAD_REL_TOL = {torch.float64: 1e-9, torch.float32: 2e-5}
LOWP_FACTOR = 2.0
LOWP_FLOOR = 1e-4


@dataclass(frozen=True)
class Case:
    """One generated attention case; ``id`` reads like B2-H4x2-N97-S130-D40-bool-causal."""

    batch: tuple[int, ...] = (2,)
    hq: int = 4
    hkv: int = 4
    n: int = 97
    s: int = 130
    d: int = 40
    dv: int | None = None
    mask: str | None = None  # None, "bool", "float", "keypad" (bool (B,1,1,S)), "keypad-float"
    causal: bool = False

    @property
    def id(self) -> str:
        b = "x".join(map(str, self.batch)) or "none"
        h = f"{self.hq}x{self.hkv}" if self.hq != self.hkv else str(self.hq)
        dv = f"-Dv{self.dv}" if self.dv else ""
        parts = [f"B{b}-H{h}-N{self.n}-S{self.s}-D{self.d}{dv}", self.mask or "nomask"]
        if self.causal:
            parts.append("causal")
        return "-".join(parts)


def make_inputs(case: Case, dtype=torch.float32, *, seed: int = 0, requires_grad: bool = False, scale_q: float = 1.0):
    """q, k, v and the mask for ``case``; the mask leaves a few rows fully masked."""
    g = torch.Generator().manual_seed(seed)
    dv = case.dv or case.d

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32)

    q = (rnd(*case.batch, case.hq, case.n, case.d) * scale_q).to(dtype)
    k = rnd(*case.batch, case.hkv, case.s, case.d).to(dtype)
    v = rnd(*case.batch, case.hkv, case.s, dv).to(dtype)
    mask = None
    if case.mask in ("bool", "float"):
        keep = torch.rand(case.n, case.s, generator=g) > 0.3
        keep[min(3, case.n - 1)] = False  # a fully masked query row
        mask = keep if case.mask == "bool" else torch.where(keep, rnd(case.n, case.s) * 0.5, -math.inf).to(dtype)
    elif case.mask in ("keypad", "keypad-float"):
        keep = torch.ones(*case.batch, 1, 1, case.s, dtype=torch.bool)
        keep[..., case.s - case.s // 3 :] = False  # right padding
        mask = keep if case.mask == "keypad" else torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, -math.inf)
    if requires_grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v, mask


def naive_attention(q, k, v, mask=None, is_causal=False, scale=None):
    """Plain PyTorch math entirely in the inputs' dtype: the low-precision baseline."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    groups = q.shape[-3] // k.shape[-3]
    k = k.repeat_interleave(groups, dim=-3)
    v = v.repeat_interleave(groups, dim=-3)
    s = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask
    if is_causal:
        n, sk = s.shape[-2:]
        s = s.masked_fill(torch.ones(n, sk, dtype=torch.bool).tril().logical_not(), -math.inf)
    return torch.softmax(s, dim=-1) @ v


def max_err(x, ref) -> float:
    return (x.double() - ref.double()).abs().max().item()
