"""What a method supports, declared as data, and the base class every method derives from.

In the manner of xformers' ``ops/fmha``: each method states its capabilities at class
level and explains a refusal with :meth:`Method.not_supported_reasons`; dispatch never
guesses and a forced method never falls back silently.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from torch import Tensor

from .inputs import AttentionInputs, Shape

__all__ = ["Capabilities", "Method", "MethodNotSupportedError"]


class MethodNotSupportedError(ValueError):
    """A method was asked to serve inputs it cannot; the message says why and what to use."""


@dataclass(frozen=True)
class Capabilities:
    """Class-level declaration of what a method can serve.

    Attributes:
        exact: computes softmax attention exactly (up to rounding), not an approximation.
        devices: device types served, e.g. ("cpu", "cuda").
        dtypes: input dtypes served.
        causal: supports ``is_causal=True``.
        mask_kinds: attn_mask kinds served: "bool" (True = attend) and/or "float" (added).
        full_masks: serves masks that vary along queries, e.g. (N, S); when False only
            key-padding masks, whose query dim is 1 such as (B, 1, 1, S), are served
            (float ones only with values 0 or -inf).
        causal_with_mask: supports ``is_causal`` and ``attn_mask`` together.
        dropout: supports ``dropout_p > 0``.
        gqa: supports Hq != Hkv (grouped-query attention).
        differentiable: gradients flow to q, k, v (and a float mask).
        double_backward: gradients of gradients are available.
        deterministic: same inputs (and seed) give bitwise-same output on CPU.
        returns_weights: can return the attention probabilities (for need_weights).
        available: usable in this environment; when False, ``unavailable_reason`` says why.
        causal_note: why causal is not supported (for the refusal message), if it is not.
    """

    exact: bool
    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    causal: bool = True
    mask_kinds: tuple[str, ...] = ("bool", "float")
    full_masks: bool = True
    causal_with_mask: bool = True
    dropout: bool = True
    gqa: bool = True
    differentiable: bool = True
    double_backward: bool = False
    deterministic: bool = True
    returns_weights: bool = False
    available: bool = True
    unavailable_reason: str = ""
    causal_note: str = ""

    def as_dict(self) -> dict[str, object]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "dtypes":
                value = [str(d).removeprefix("torch.") for d in value]
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


@dataclass(frozen=True)
class Method:
    """Base of every method's config dataclass.

    A subclass is at once the user-facing config (frozen, validated in
    ``__post_init__``) and the implementation: ``name`` and ``capabilities`` are class
    data, :meth:`forward` computes attention.  Register it with
    :func:`attnkit.core.registry.register`.
    """

    name: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities]

    def check_int(self, field: str, low: int | None, *, optional: bool = False, hint: str = "") -> None:
        """For ``__post_init__``: raise a ValueError that names the field unless it is an
        int (a bool is not) >= ``low`` (None: any int), or None when ``optional`` (None =
        automatic)."""
        value = getattr(self, field)
        if optional and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
            bound = "" if low is None else f" >= {low}"
            either = " or None (automatic)" if optional else ""
            raise ValueError(f"{type(self).__name__}({field}={value!r}): {field} must be an int{bound}{either}{hint}")

    def check_choice(self, field: str, choices: tuple) -> None:
        """For ``__post_init__``: raise a ValueError that names the field unless it is one of ``choices``."""
        value = getattr(self, field)
        if not any(value is c or (type(value) is type(c) and value == c) for c in choices):
            raise ValueError(f"{type(self).__name__}({field}={value!r}): {field} must be one of {list(choices)}")

    def not_supported_reasons(self, inp: AttentionInputs, *, need_weights: bool = False) -> list[str]:
        """Reasons this method cannot serve ``inp`` (empty when it can)."""
        caps = self.capabilities
        reasons = []
        if not caps.available:
            reasons.append(f"unavailable: {caps.unavailable_reason}")
        if inp.device.type not in caps.devices:
            reasons.append(f"device {inp.device.type!r} not in {list(caps.devices)}")
        if inp.dtype not in caps.dtypes:
            reasons.append(f"dtype {inp.dtype} not in {[str(d) for d in caps.dtypes]}")
        if inp.is_causal and not caps.causal:
            from .registry import methods  # the registry imports this module

            causal = sorted(name for name, c in methods().items() if c.causal)
            note = f": {caps.causal_note}" if caps.causal_note else ""
            reasons.append(f"is_causal=True is not supported{note}; methods that support causal attention: {causal}")
        if inp.mask_kind is not None and inp.mask_kind not in caps.mask_kinds:
            reasons.append(f"a {inp.mask_kind} attn_mask is not supported (supports {list(caps.mask_kinds)})")
        if inp.attn_mask is not None and not caps.full_masks:
            if not inp.mask_is_key_padding:
                reasons.append(
                    f"attn_mask of shape {tuple(inp.attn_mask.shape)} varies along queries; only key-padding "
                    f"masks (query dim 1, e.g. (B, 1, 1, S)) are supported"
                )
            elif inp.mask_kind == "float" and not bool(((inp.attn_mask == 0) | (inp.attn_mask == float("-inf"))).all()):
                reasons.append("a float key-padding mask must hold only 0 and -inf (a per-key bias is not supported)")
        if inp.is_causal and inp.attn_mask is not None and not caps.causal_with_mask:
            reasons.append("attn_mask together with is_causal=True is not supported")
        if inp.dropout_p > 0 and not caps.dropout:
            reasons.append(f"dropout_p={inp.dropout_p} is not supported (only 0)")
        if inp.hq != inp.hkv and not caps.gqa:
            reasons.append(f"grouped-query attention (Hq={inp.hq}, Hkv={inp.hkv}) is not supported")
        if need_weights and not caps.returns_weights:
            reasons.append("cannot return attention weights (need_weights=True)")
        return reasons

    def forward(
        self,
        inp: AttentionInputs,
        *,
        need_weights: bool = False,
        average_weights: bool = False,
        state: torch.nn.Module | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Compute attention.

        Args:
            inp: a validated call.
            need_weights / average_weights: also return the attention probabilities
                (only for methods whose capabilities say ``returns_weights``).
            state: the module made by :meth:`make_state` (learned projections, random
                features), when the method runs inside a module; None in functional use.

        Returns:
            out: (*batch, Hq, N, Dv) in the dtype of q.
            weights: None unless ``need_weights``; then (*batch, Hq, N, S), or
                (*batch, N, S) averaged over heads when ``average_weights``.
        """
        raise NotImplementedError

    def flops(self, shape: Shape) -> float:
        """Forward floating-point operations for a call of this shape (2 per multiply-add).

        Counts the matrix products that dominate; elementwise work is left out, as in
        the FlashAttention papers.  Exact attention: 2·B·Hq·pairs·(D + Dv).
        """
        return 2.0 * shape.batch * shape.hq * shape.visible_pairs() * (shape.d + shape.dv)

    def implied_weights(self, inp: AttentionInputs, state: torch.nn.Module | None = None) -> Tensor:
        """The (*batch, Hq, N, S) attention matrix this method effectively applies.

        Materialised: for analysis and error metrics on small N only.  Exact methods
        return the reference probabilities (fp64); approximate families override this
        with their own naive formula.
        """
        from .reference import math_attention

        _, weights = math_attention(
            AttentionInputs(inp.q.double(), inp.k.double(), inp.v.double(), inp.attn_mask, 0.0, inp.is_causal, inp.scale),
            torch.float64,
            need_weights=True,
        )
        return weights

    def make_state(self, num_heads: int, head_dim: int) -> torch.nn.Module | None:
        """Parameters or buffers this method needs inside a module (None: stateless).

        :class:`attnkit.MultiheadAttention` registers the result as a submodule, so it
        round-trips through ``state_dict``, and passes it back as ``forward(state=...)``.
        """
        return None

    def spec(self) -> str:
        """The command-line form of this config, e.g. ``tiled:block_q=128``."""
        args = [f"{f.name}={getattr(self, f.name)}" for f in fields(self) if getattr(self, f.name) != f.default]
        return self.name + (":" + ",".join(args) if args else "")
