"""What one benchmark case is, and how it is built: shape presets, dtypes, baselines,
inputs, and the picklable factory that builds the call to measure (also in a fresh
process, for the memory probe).

A case is (method, preset, N, dtype, mode).  ``method`` is an attnkit method spec
(``"performer:features=256"``) or one of the baselines, which are *not* attnkit code:

- ``vanilla``: ``softmax(q @ k^T * scale) @ v`` written out below, materialising the
  (B, H, N, S) scores (GQA by repeating k and v), in the input dtype;
- ``torch-sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` called directly;
- ``xformers``: ``xformers.ops.memory_efficient_attention`` when it is importable and
  serves the device (listed as unavailable otherwise, with the reason).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.compat import SDPA_HAS_GQA
from ..core.inputs import Shape, prepare_inputs
from ..core.registry import resolve
from .flops import attention_flops
from .timing import forward_backward_closure, forward_closure

__all__ = [
    "BASELINES", "DTYPES", "PRESETS", "Preset", "Case", "attention_callable", "baseline_unavailable",
    "case_flops", "default_dtypes", "local_global_qkv", "make_call", "make_qkv", "parse_preset", "structured_qkv",
    "unsupported_reason",
]

BASELINES = ("vanilla", "torch-sdpa", "xformers")
MODES = ("fwd", "fwd_bwd")


@dataclass(frozen=True)
class Preset:
    """Attention shape of a real model: query heads, key/value heads, head dim (B=1 unless set)."""

    name: str
    hq: int
    hkv: int
    d: int
    batch: int = 1

    def shape(self, n: int, causal: bool = False) -> Shape:
        return Shape(self.batch, self.hq, self.hkv, n, n, self.d, self.d, causal)

    def describe(self) -> str:
        heads = f"H={self.hq}" if self.hq == self.hkv else f"Hq={self.hq}, Hkv={self.hkv}"
        return f"{self.name} (B={self.batch}, {heads}, D={self.d})"


PRESETS = {
    "bert-base": Preset("bert-base", 12, 12, 64),
    "smollm2": Preset("smollm2", 9, 3, 64),
    "llama-7b": Preset("llama-7b", 32, 32, 128),
}


def parse_preset(text: str, batch: int = 1) -> Preset:
    """A preset name from :data:`PRESETS`, or ``HQxHKVxD`` (e.g. ``8x8x64``) for any other shape.

    Raises:
        ValueError: neither form (the message lists the presets).
    """
    if text in PRESETS:
        p = PRESETS[text]
        return Preset(p.name, p.hq, p.hkv, p.d, batch)
    parts = text.lower().split("x")
    if len(parts) == 3 and all(p.isdigit() and int(p) > 0 for p in parts):
        hq, hkv, d = map(int, parts)
        if hq % hkv == 0:
            return Preset(text, hq, hkv, d, batch)
    raise ValueError(f"--preset {text!r}: use one of {sorted(PRESETS)} or HQxHKVxD such as 8x8x64 (HQ % HKV == 0)")


# dtype name -> (input dtype, autocast dtype or None)
DTYPES = {
    "fp32": (torch.float32, None),
    "bf16": (torch.bfloat16, None),
    "fp16": (torch.float16, None),
    "amp-fp16": (torch.float32, torch.float16),
    "amp-bf16": (torch.float32, torch.bfloat16),
}


def default_dtypes(device: str) -> list[str]:
    """fp32 and bf16 on CPU; fp32, fp16 autocast (AMP) and bf16 on CUDA."""
    return ["fp32", "amp-fp16", "bf16"] if torch.device(device).type == "cuda" else ["fp32", "bf16"]


@dataclass(frozen=True)
class Case:
    """One measured configuration (picklable: it travels to the memory probe's process)."""

    method: str
    preset: Preset
    n: int
    dtype: str
    mode: str
    device: str = "cpu"
    compiled: bool = False

    @property
    def label(self) -> str:
        return self.method + (" [compiled]" if self.compiled else "")

    def key(self) -> tuple:
        return (self.label, self.preset.name, self.n, self.dtype, self.mode)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["preset"] = self.preset.name
        return d


# -- the baselines ------------------------------------------------------------------------


def vanilla_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Plain materialised attention in the input dtype: the (B, Hq, N, S) scores and probabilities."""
    groups = q.shape[-3] // k.shape[-3]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)  # (B, Hq, S, D)
    scale = q.shape[-1] ** -0.5
    return torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1) @ v


def torch_sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``F.scaled_dot_product_attention`` as a user would call it (GQA by enable_gqa or by repeating)."""
    if q.shape[-3] == k.shape[-3]:
        return F.scaled_dot_product_attention(q, k, v)
    if SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    groups = q.shape[-3] // k.shape[-3]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(groups, -3), v.repeat_interleave(groups, -3))


def _xformers_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    import xformers.ops as xops

    groups = q.shape[-3] // k.shape[-3]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)
    # xformers takes (B, N, H, D)
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)  # (B, H, N, D)


def baseline_unavailable(method: str, device: str) -> str | None:
    """Why a baseline cannot run here (None when it can)."""
    if method != "xformers":
        return None
    if torch.device(device).type != "cuda":
        return f"xformers memory_efficient_attention: not available on {torch.device(device).type.upper()}"
    try:
        import xformers.ops  # noqa: F401
    except ImportError as e:
        return f"xformers is not importable ({e}); `pip install xformers` for the CUDA baseline"
    return None


def attention_callable(method: str) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """The (q, k, v) -> out callable for a baseline name or an attnkit method spec."""
    if method == "vanilla":
        return vanilla_attention
    if method == "torch-sdpa":
        return torch_sdpa
    if method == "xformers":
        return _xformers_attention
    import attnkit

    m = resolve(method)
    return lambda q, k, v: attnkit.attention(q, k, v, method=m)


def unsupported_reason(method: str, preset: Preset, n: int, dtype: str, device: str) -> str | None:
    """Why ``method`` cannot serve this case, from its declared capabilities (no tensor is made)."""
    if method in BASELINES:
        return baseline_unavailable(method, device)
    m = resolve(method)
    q = torch.empty(preset.batch, preset.hq, n, preset.d, device="meta", dtype=DTYPES[dtype][0])  # (B, Hq, N, D)
    kv = torch.empty(preset.batch, preset.hkv, n, preset.d, device="meta", dtype=DTYPES[dtype][0])
    inp = prepare_inputs(q, kv, kv, None, 0.0, False, None)
    reasons = [r for r in m.not_supported_reasons(inp) if not r.startswith("device ")]
    if torch.device(device).type not in m.capabilities.devices:
        reasons.append(f"device {torch.device(device).type!r} not in {list(m.capabilities.devices)}")
    return "; ".join(reasons) or None


def case_flops(method: str, shape: Shape, mode: str) -> float:
    """FLOPs by formula: the method's ``flops()`` for the forward (exact attention's for the
    baselines); forward+backward is 3.5x forward for exact attention (the backward's five
    matmuls to the forward's two, FlashAttention-2's convention) and 3x for the
    approximations (autograd: two matmuls back for each one forward)."""
    if method in BASELINES:
        fwd, exact = attention_flops(shape.batch, shape.hq, shape.n, shape.s, shape.d, shape.dv,
                                     causal=shape.is_causal), True
    else:
        m = resolve(method)
        fwd, exact = m.flops(shape), m.capabilities.exact
    return fwd if mode == "fwd" else fwd * (3.5 if exact else 3.0)


# -- inputs --------------------------------------------------------------------------------


def structured_qkv(n: int, d: int = 64, heads: int = 4, *, kv_heads: int | None = None, peak: float = 1.0,
                   seed: int = 0, batch: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """q (B, Hq, N, D), k and v (B, Hkv, N, D) with text-like structure, fp32.

    A smooth random walk of states (near tokens alike) plus recurring "topics" (far
    tokens sometimes alike), through random per-head projections; ``peak`` scales q
    (2-3 gives peaked attention).  iid Gaussian q and k give near-uniform attention,
    where every approximation looks good; these do not.
    """
    g = torch.Generator().manual_seed(seed)
    kv_heads = heads if kv_heads is None else kv_heads
    x = torch.randn(batch, n, d, generator=g).cumsum(1) / torch.arange(1, n + 1)[:, None].sqrt()  # (B, N, D)
    x = x + 2 * torch.randn(8, d, generator=g)[torch.randint(0, 8, (batch, n), generator=g)]
    wq = torch.randn(heads, d, d, generator=g) / math.sqrt(d)
    wk, wv = (torch.randn(kv_heads, d, d, generator=g) / math.sqrt(d) for _ in range(2))
    x = x[:, None]  # (B, 1, N, D)
    return x @ wq * peak, x @ wk, x @ wv  # (B, H, N, D)


def local_global_qkv(n: int, d: int = 64, heads: int = 2, beta: float = 5.0, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v (1, H, N, D) fp32 with local structure and long-range mass, at the moderate
    norms where random features work (unlike :func:`structured_qkv`, whose |q'|, |k'|
    ~ 6 make FAVOR+'s estimate collapse).

    Each position holds ``z_t = (x_t + 0.6·T_{c(t)}) / √1.36``: ``x`` an AR(1) process over
    positions (ρ = 0.98, unit variance: neighbours within ~50 tokens look alike) and ``T``
    one of 8 random "topics", constant over segments of 64 tokens and recurring anywhere
    in the sequence.  Per head, q and k are a random rotation of z plus 30% independent
    noise, scaled so that a token scores ``beta`` against itself (|q·k|·scale up to ~5
    for beta=5: peaked, as trained attention often is).  v is a random projection of z
    plus noise.
    """
    g = torch.Generator().manual_seed(seed)
    rho, gamma, topics, seg = 0.98, 0.6, 8, 64
    e = torch.randn(n, d, generator=g)
    x = torch.empty(n, d)
    x[0] = e[0]
    for t in range(1, n):
        x[t] = rho * x[t - 1] + math.sqrt(1 - rho**2) * e[t]
    ids = torch.randint(0, topics, (n // seg + 1,), generator=g).repeat_interleave(seg)[:n]
    z = (x + gamma * torch.randn(topics, d, generator=g)[ids]) / math.sqrt(1 + gamma**2)  # (N, D)
    zh = z @ torch.linalg.qr(torch.randn(heads, d, d, generator=g))[0]  # (H, N, D)
    c = math.sqrt(beta / math.sqrt(d))
    q = c * (zh + 0.3 * torch.randn(heads, n, d, generator=g))
    k = c * (zh + 0.3 * torch.randn(heads, n, d, generator=g))
    v = zh @ (torch.randn(heads, d, d, generator=g) / math.sqrt(d)) + 0.5 * torch.randn(heads, n, d, generator=g)
    return q[None], k[None], v[None]


def make_qkv(preset: Preset, n: int, dtype: str, device: str = "cpu", *, seed: int = 0, structured: bool = False):
    """q (B, Hq, N, D), k and v (B, Hkv, N, D) in the case's input dtype on ``device``."""
    if structured:
        q, k, v = structured_qkv(n, preset.d, preset.hq, kv_heads=preset.hkv, seed=seed, batch=preset.batch)
    else:
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(preset.batch, preset.hq, n, preset.d, generator=g)  # (B, Hq, N, D)
        k, v = (torch.randn(preset.batch, preset.hkv, n, preset.d, generator=g) for _ in range(2))  # (B, Hkv, N, D)
    return tuple(t.to(device=device, dtype=DTYPES[dtype][0]) for t in (q, k, v))


def autocast_for(dtype: str, device: str):
    amp = DTYPES[dtype][1]
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=amp)


def make_call(case: Case, seed: int = 0) -> Callable[[], None]:
    """Allocate the case's inputs (and output gradient) and return the call to measure.

    Module level and driven by a picklable :class:`Case`, so the memory probe can run it
    in a fresh process.  ``compiled`` cases compile here (the first call compiles).
    """
    q, k, v = make_qkv(case.preset, case.n, case.dtype, case.device, seed=seed)
    fn = attention_callable(case.method)
    if case.compiled:
        fn = torch.compile(fn, dynamic=False)
    amp = DTYPES[case.dtype][1]
    if amp is not None:
        inner = fn

        def fn(q, k, v):
            with autocast_for(case.dtype, case.device):
                return inner(q, k, v)

    if case.mode == "fwd":
        return forward_closure(fn, q, k, v)
    grad_out = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=torch.Generator().manual_seed(seed + 1))
    grad_out = grad_out.to(device=case.device, dtype=DTYPES[case.dtype][0] if amp is None else torch.float32)
    for t in (q, k, v):
        t.requires_grad_()
    return forward_backward_closure(fn, q, k, v, grad_out)
