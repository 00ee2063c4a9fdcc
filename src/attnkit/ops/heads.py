"""Per-head plans: a different attention method for each query head of one layer.

Heads of one layer do different jobs: some attend to their neighbours only, others
spread their mass over the whole context.  A single method per layer gives them all
the same budget; :class:`PerHead` gives each query head its own method, so that a
narrow window serves the local heads and the FLOPs saved go to the far-reaching ones.
:func:`attnkit.autotune` plans it (``per_head=True``) and :func:`attnkit.patch` takes
it as a plan entry: a list of one method per query head.

Heads that share a method run together in one call of that method.  With
grouped-query attention, query heads whose whole key/value group shares a method keep
the grouped form (their K/V are not copied); a group split between methods gives each
part its K/V heads gathered (``index_select``: a copy of those heads only).  The output
is the concatenation of the parts, permuted back into head order.

Written out (``spec()``, plan files), a PerHead is the JSON list of its per-head specs,
e.g. ``["local:window=256,sinks=64", "auto", ...]``; :func:`attnkit.resolve` reads a
list or that JSON text back.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core.capabilities import Capabilities, Method
from ..core.inputs import AttentionInputs, Shape, prepare_inputs
from ..core.registry import register, resolve

__all__ = ["PerHead"]


@register
@dataclass(frozen=True)
class PerHead(Method):
    """One attention method per query head.

    Args:
        methods: one method (name, spec string or config) per query head, in head order;
            its length must equal the layer's number of query heads Hq.

    What the composite can serve is what every one of its methods can serve: each call
    asks each distinct method (with its heads' share of the inputs) and refuses with
    their reasons.  It never returns attention weights, and it counts as approximate
    (``capabilities.exact`` is False) even when every head runs an exact method.  It has
    no default configuration (``PerHead()`` is a TypeError), so sweeps over every
    registered method (``attnkit bench``) leave it out.
    """

    methods: tuple

    name: ClassVar[str] = "heads"
    capabilities: ClassVar[Capabilities] = Capabilities(exact=False, returns_weights=False)

    def __post_init__(self) -> None:
        if isinstance(self.methods, (str, bytes)) or not hasattr(self.methods, "__iter__"):
            raise ValueError(
                f"PerHead(methods={self.methods!r}): methods must be a list with one method per query head, "
                "e.g. ['local:window=256', 'auto', ...]"
            )
        resolved = tuple(resolve(m) for m in self.methods)
        if not resolved:
            raise ValueError("PerHead(methods=()): give one method per query head (at least one)")
        if any(isinstance(m, PerHead) for m in resolved):
            raise ValueError("PerHead(methods=...): a per-head method cannot contain another per-head method")
        object.__setattr__(self, "methods", resolved)

    # -- grouping --------------------------------------------------------------------
    def groups(self) -> list[tuple[Method, list[int]]]:
        """The distinct methods, each with the query heads it serves (first-use order)."""
        out: dict[Method, list[int]] = {}
        for head, m in enumerate(self.methods):
            out.setdefault(m, []).append(head)
        return list(out.items())

    def _parts(self, inp: AttentionInputs, *, check_only: bool = False) -> list[tuple[Method, list[int], AttentionInputs]]:
        """Each distinct method with its heads and their share of the inputs.

        ``check_only``: q, k, v are narrowed views of the right sizes (no copies), enough
        for a method's :meth:`not_supported_reasons`; the mask is always the heads' own.
        """
        g = inp.groups
        parts = []
        for m, heads in self.groups():
            index = torch.tensor(heads, device=inp.device)
            kv_heads = sorted({h // g for h in heads})
            whole_groups = heads == [kv * g + j for kv in kv_heads for j in range(g)]
            kv_index = kv_heads if whole_groups else [h // g for h in heads]
            if check_only:
                q = inp.q.narrow(-3, 0, len(heads))
                k, v = (t.narrow(-3, 0, 1).expand(*t.shape[:-3], len(kv_index), *t.shape[-2:]) for t in (inp.k, inp.v))
            else:
                q = inp.q.index_select(-3, index)
                kv_index_t = torch.tensor(kv_index, device=inp.device)
                k, v = inp.k.index_select(-3, kv_index_t), inp.v.index_select(-3, kv_index_t)
            mask = inp.attn_mask
            if mask is not None and mask.dim() >= 3 and mask.shape[-3] != 1:
                mask = mask.index_select(-3, index)
            parts.append((m, heads, prepare_inputs(q, k, v, mask, inp.dropout_p, inp.is_causal, inp.scale)))
        return parts

    def _check_heads(self, hq: int) -> str | None:
        if len(self.methods) != hq:
            return (f"the per-head plan has {len(self.methods)} methods but the inputs have Hq={hq} query heads; "
                    "give one method per query head")
        return None

    # -- the Method interface ----------------------------------------------------------
    def not_supported_reasons(self, inp: AttentionInputs, *, need_weights: bool = False) -> list[str]:
        wrong = self._check_heads(inp.hq)
        if wrong:
            return [wrong]
        reasons = super().not_supported_reasons(inp, need_weights=need_weights)
        for m, heads, part in self._parts(inp, check_only=True):
            reasons += [f"heads {heads} ({m.spec()}): {r}" for r in m.not_supported_reasons(part)]
        return reasons

    def forward(
        self,
        inp: AttentionInputs,
        *,
        need_weights: bool = False,
        average_weights: bool = False,
        state: nn.Module | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        wrong = self._check_heads(inp.hq)
        if wrong:
            raise ValueError(f"method 'heads': {wrong}")
        outs, order = [], []
        for i, (m, heads, part) in enumerate(self._parts(inp)):
            sub = state[str(i)] if state is not None and str(i) in state else None
            out, _ = m.forward(part, state=sub)
            outs.append(out)
            order += heads
        out = torch.cat(outs, dim=-3) if len(outs) > 1 else outs[0]  # (*b, Hq, N, Dv), heads in `order`
        if order != sorted(order):
            out = out.index_select(-3, torch.tensor(order, device=out.device).argsort())
        return out, None

    def flops(self, shape: Shape) -> float:
        """The sum of each method's FLOPs over its heads."""
        return sum(m.flops(dataclasses.replace(shape, hq=len(heads), hkv=len(heads))) for m, heads in self.groups())

    def implied_weights(self, inp: AttentionInputs, state: nn.Module | None = None) -> Tensor:
        parts, order = [], []
        for i, (m, heads, part) in enumerate(self._parts(inp)):
            sub = state[str(i)] if state is not None and str(i) in state else None
            parts.append(m.implied_weights(part, sub))
            order += heads
        w = torch.cat(parts, dim=-3)
        return w.index_select(-3, torch.tensor(order, device=w.device).argsort())

    def make_state(self, num_heads: int, head_dim: int) -> nn.Module | None:
        """Each stateful method's state for its own heads, in a ModuleDict keyed by group."""
        wrong = self._check_heads(num_heads)
        if wrong:
            raise ValueError(f"method 'heads': {wrong}")
        states = {str(i): s for i, (m, heads) in enumerate(self.groups())
                  if (s := m.make_state(len(heads), head_dim)) is not None}
        return nn.ModuleDict(states) if states else None

    def spec(self) -> str:
        """The JSON list of the per-head specs (what :func:`attnkit.resolve` reads back)."""
        return json.dumps([m.spec() for m in self.methods])
