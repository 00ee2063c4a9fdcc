"""Input validation and the one canonical view of an attention call.

Every method receives an :class:`AttentionInputs`.  It keeps the caller's tensors
untouched (SDPA takes them as they are) and offers *grouped* views for kernels that
want GQA spelled out: queries as ``(*batch, Hkv, G, N, D)``, keys and values as
``(*batch, Hkv, 1, S, D)`` and the mask as ``(*batch', Hkv|1, G|1, N|1, S|1)``, all
views -- nothing is expanded or copied, so a ``(1, 1, 1, S)`` key-padding mask stays
``S`` elements however large B, H and N are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["AttentionInputError", "AttentionInputs", "Shape", "prepare_inputs"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class AttentionInputError(ValueError):
    """Raised when the arguments of an attention call are inconsistent.

    Subclasses ValueError so that callers catching the torch convention keep working;
    the message always names the argument, what it got, and what it needs.
    """


def _fail(msg: str) -> None:
    raise AttentionInputError(msg)


@dataclass(frozen=True)
class Shape:
    """The sizes of an attention call, without tensors (for FLOP formulas and planning).

    ``batch`` is the product of the leading dims.
    """

    batch: int
    hq: int
    hkv: int
    n: int
    s: int
    d: int
    dv: int
    is_causal: bool = False

    def visible_pairs(self) -> int:
        """(query, key) pairs exact attention scores: N·S, or sum_i min(i+1, S) if causal."""
        if not self.is_causal:
            return self.n * self.s
        full = max(0, self.n - self.s)  # rows i >= S see all S keys
        tri = min(self.n, self.s)
        return tri * (tri + 1) // 2 + full * self.s


@dataclass(frozen=True)
class AttentionInputs:
    """A validated attention call.

    Attributes:
        q: (*batch, Hq, N, D) queries, exactly as passed.
        k: (*batch, Hkv, S, D) keys.
        v: (*batch, Hkv, S, Dv) values.
        attn_mask: None, or a bool (True = attend) / float (added) tensor that
            broadcasts to (*batch, Hq, N, S); never expanded.
        dropout_p: probability of dropping an attention weight.
        is_causal: query i sees keys j <= i (top-left aligned, SDPA's rule).
        scale: the softmax scale actually used (1/sqrt(D) when the caller gave None).
    """

    q: Tensor
    k: Tensor
    v: Tensor
    attn_mask: Tensor | None
    dropout_p: float
    is_causal: bool
    scale: float

    # -- sizes -------------------------------------------------------------------
    @property
    def batch_shape(self) -> torch.Size:
        return self.q.shape[:-3]

    @property
    def hq(self) -> int:
        return self.q.shape[-3]

    @property
    def hkv(self) -> int:
        return self.k.shape[-3]

    @property
    def groups(self) -> int:
        return self.hq // self.hkv

    @property
    def n(self) -> int:
        return self.q.shape[-2]

    @property
    def s(self) -> int:
        return self.k.shape[-2]

    @property
    def d(self) -> int:
        return self.q.shape[-1]

    @property
    def dv(self) -> int:
        return self.v.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def shape(self) -> Shape:
        return Shape(math.prod(self.batch_shape), self.hq, self.hkv, self.n, self.s, self.d, self.dv, self.is_causal)

    @property
    def mask_kind(self) -> str | None:
        """None, "bool" or "float"."""
        if self.attn_mask is None:
            return None
        return "bool" if self.attn_mask.dtype == torch.bool else "float"

    @property
    def mask_is_key_padding(self) -> bool:
        """The mask varies along keys only (its query dim is 1), e.g. (B, 1, 1, S)."""
        return self.attn_mask is not None and (self.attn_mask.dim() < 2 or self.attn_mask.shape[-2] == 1)

    def key_keep(self) -> Tensor | None:
        """A bool key-padding mask as a grouped view (*b', Hkv|1, G|1, 1, S), True = attend.

        For methods that take only key-padding masks; None when there is no mask.  A
        float key-padding mask counts -inf as padding; finite values must be 0 (a
        per-key bias is not a padding mask: those methods refuse it in validation).
        """
        if self.attn_mask is None:
            return None
        keep = self.attn_mask if self.attn_mask.dtype == torch.bool else self.attn_mask != float("-inf")
        return group_mask(keep, self.q.dim(), self.hkv, self.groups)

    @property
    def requires_grad(self) -> bool:
        tensors = (self.q, self.k, self.v, self.attn_mask)
        return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)

    # -- grouped views (GQA spelled out) -------------------------------------------
    def grouped(self) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Views for kernels: q (*b, Hkv, G, N, D), k (*b, Hkv, 1, S, D),
        v (*b, Hkv, 1, S, Dv), mask (*b', Hkv|1, G|1, N|1, S|1) or None."""
        hkv, g = self.hkv, self.groups
        q = self.q.unflatten(-3, (hkv, g))  # (*b, Hkv, G, N, D): splitting a dim is always a view
        k = self.k.unsqueeze(-3)  # (*b, Hkv, 1, S, D)
        v = self.v.unsqueeze(-3)  # (*b, Hkv, 1, S, Dv)
        return q, k, v, group_mask(self.attn_mask, self.q.dim(), hkv, g)

    def ungroup(self, out: Tensor) -> Tensor:
        """(*b, Hkv, G, N, Dv) -> (*b, Hq, N, Dv)."""
        return out.flatten(-4, -3)


def group_mask(mask: Tensor | None, q_dim: int, hkv: int, g: int) -> Tensor | None:
    """View a mask broadcastable to (*b, Hq, N, S) as (*b', Hkv|1, G|1, N|1, S|1).

    Left-pads with size-1 dims to q's rank and splits the head dim; never copies.
    """
    if mask is None:
        return None
    mask = mask.reshape((1,) * (q_dim - mask.dim()) + tuple(mask.shape)) if mask.dim() < q_dim else mask
    if mask.shape[-3] == 1:
        return mask.unsqueeze(-3)  # (*b', 1, 1, N|1, S|1)
    return mask.unflatten(-3, (hkv, g))  # (*b', Hkv, G, N|1, S|1)


def _check_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        _fail(f"argument '{name}' must be a torch.Tensor, got {type(t).__name__}.")
    if t.dim() < 3:
        _fail(
            f"argument '{name}' must have shape (B..., H, L, E) with at least 3 dims "
            f"(heads, length, head dim), got shape {tuple(t.shape)}. "
            f"For a single head add one with {name}.unsqueeze(-3)."
        )
    if t.dtype not in _FLOAT_DTYPES:
        _fail(
            f"argument '{name}' has dtype {t.dtype}; attention needs a floating dtype "
            f"(float16, bfloat16, float32 or float64). Convert it with {name}.float()."
        )
    return t


def _broadcastable(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    if len(shape) > len(target):
        return False
    return all(a == 1 or a == b for a, b in zip(reversed(shape), reversed(target)))


def prepare_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
) -> AttentionInputs:
    """Validate an attention call and return its canonical form.

    Raises:
        AttentionInputError: naming the offending argument, what it got and what it needs.
    """
    q, k, v = _check_tensor("q", q), _check_tensor("k", k), _check_tensor("v", v)
    if not (q.dtype == k.dtype == v.dtype):
        _fail(
            f"q, k and v must share one dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}. "
            f"Cast them to one dtype (e.g. k.to(q.dtype)), or use torch.autocast."
        )
    if not (q.device == k.device == v.device):
        _fail(
            f"q, k and v must be on one device, got q={q.device}, k={k.device}, v={v.device}. "
            f"Move them with .to(q.device)."
        )
    if not (q.dim() == k.dim() == v.dim()):
        _fail(
            f"q, k and v must have the same number of dims, got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}."
        )
    if q.shape[:-3] != k.shape[:-3] or k.shape[:-3] != v.shape[:-3]:
        _fail(
            f"q, k and v must share their batch dims (all but the last 3), got q "
            f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}."
        )
    if k.shape[-1] != q.shape[-1]:
        _fail(
            f"argument 'k' has head dim {k.shape[-1]} but 'q' has {q.shape[-1]}; "
            f"queries and keys must share their last dim D."
        )
    if k.shape[-2] != v.shape[-2] or k.shape[-3] != v.shape[-3]:
        _fail(
            f"arguments 'k' {tuple(k.shape)} and 'v' {tuple(v.shape)} must have the same "
            f"number of heads and keys (dims -3 and -2)."
        )
    hq, hkv = q.shape[-3], k.shape[-3]
    if hkv == 0 or hq % hkv != 0:
        _fail(
            f"the number of query heads ({hq}, q.shape[-3]) must be a multiple of the "
            f"number of key/value heads ({hkv}, k.shape[-3]) for grouped-query attention."
        )
    if q.shape[-1] == 0:
        _fail("argument 'q' has head dim 0; attention needs D >= 1.")

    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            _fail(f"argument 'attn_mask' must be a torch.Tensor or None, got {type(attn_mask).__name__}.")
        if attn_mask.dtype != torch.bool and attn_mask.dtype not in _FLOAT_DTYPES:
            _fail(
                f"argument 'attn_mask' has dtype {attn_mask.dtype}; it must be bool "
                f"(True = attend) or floating (added to the scores). Convert an integer "
                f"mask with attn_mask.bool()."
            )
        if attn_mask.device != q.device:
            _fail(f"argument 'attn_mask' is on {attn_mask.device} but q is on {q.device}.")
        target = (*q.shape[:-2], q.shape[-2], k.shape[-2])
        if not _broadcastable(tuple(attn_mask.shape), target):
            _fail(
                f"argument 'attn_mask' has shape {tuple(attn_mask.shape)}, which does not "
                f"broadcast to (*batch, Hq, N, S) = {target}. Use shape (N, S), "
                f"(B, 1, 1, S) for key padding, or (B, Hq, N, S)."
            )
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= float(dropout_p) < 1.0:
        _fail(f"argument 'dropout_p' must be a number in [0, 1), got {dropout_p!r}.")
    if not isinstance(is_causal, bool):
        _fail(f"argument 'is_causal' must be a bool, got {is_causal!r}.")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    elif not isinstance(scale, (int, float)) or not math.isfinite(scale):
        _fail(f"argument 'scale' must be a finite number or None, got {scale!r}.")
    return AttentionInputs(q, k, v, attn_mask, float(dropout_p), is_causal, float(scale))
