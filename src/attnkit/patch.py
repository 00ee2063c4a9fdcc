"""``attnkit.patch``: swap the attention of a model you already have, keeping its weights.

Two kinds of attention are found and swapped in place:

* every :class:`torch.nn.MultiheadAttention` (so ``nn.Transformer*`` and anything built
  on them) is replaced by an :class:`attnkit.MultiheadAttention` that shares the
  original's Parameters (nothing is copied);
* every attention module of a Hugging Face transformers model (Llama-, BERT-style:
  the modules that call transformers' ``AttentionInterface``) runs attnkit through an
  attention function registered under a name of this patch's own, see
  :mod:`attnkit.hf`.

The returned :class:`PatchHandle` undoes all of it.  Layer indices (for ``layers=`` and
plans) are the transformers ``layer_idx`` of each attention module, and for torch modules
the position of each ``nn.MultiheadAttention`` in ``model.modules()`` order.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from .core.capabilities import Method
from .core.registry import MethodSpec, resolve
from .nn import MultiheadAttention

__all__ = ["PatchHandle", "patch", "plan_entry", "read_plan"]

PlanSpec = Union[MethodSpec, Mapping]


def read_plan(method: PlanSpec) -> tuple[Method | None, dict[int, Method]]:
    """Normalise ``method=`` of :func:`patch` into ``(one method | None, {layer: method})``.

    Accepts one method (a name, a ``"name:key=value"`` spec, a config object), a plan
    ``{layer index: method}`` (keys may be ints or digit strings, as after a JSON round
    trip), or a plan wrapped as ``{"layers": {...}, ...}`` with other keys (metadata such
    as autotune's) ignored.  Exactly one of the two results is non-empty.

    Raises:
        ValueError: a malformed plan key or an unknown method name / spec.
        TypeError: a value that is neither a string nor a config object.
    """
    if isinstance(method, str) and method.lstrip().startswith("{"):
        method = json.loads(method)
    if not isinstance(method, Mapping):
        return resolve(method), {}
    if "layers" in method and isinstance(method["layers"], Mapping):
        method = method["layers"]
    plan: dict[int, Method] = {}
    for key, spec in method.items():
        try:
            layer = int(key)
        except (TypeError, ValueError):
            raise ValueError(
                f"argument 'method': a plan maps layer indices to methods, e.g. {{0: 'tiled', 3: "
                f"'performer:features=256'}}; got the key {key!r}"
            ) from None
        if layer in plan:
            raise ValueError(f"argument 'method': layer {layer} appears twice in the plan")
        plan[layer] = resolve(spec)
    if not plan:
        raise ValueError("argument 'method': the plan is empty; give at least one layer, or one method for all")
    return None, plan


def plan_entry(method: Method) -> str | list[str]:
    """How a plan file writes one layer's method: its spec, or a per-head list of specs."""
    spec = method.spec()
    return json.loads(spec) if spec.startswith("[") else spec


class PatchHandle:
    """What :func:`patch` did, and how to undo it.

    ``remove()`` restores the original modules and configuration (idempotent); the handle
    is also a context manager that removes on exit.

    Attributes:
        methods: ``{layer index: method config}`` of every patched layer.
    """

    def __init__(self, model: nn.Module, methods: dict[int, Method]):
        self.model = model
        self.methods = methods
        self._undo: list = []  # callables, run in reverse order
        self._modules: list[tuple[int, nn.Module]] = []
        self.removed = False

    def plan(self) -> dict[str, str | list[str]]:
        """The patched layers as a JSON-serialisable plan ``{"3": "performer:features=256"}``
        (a per-head layer as its list of per-head specs); ``patch(model, handle.plan())``
        patches the same way."""
        return {str(layer): plan_entry(m) for layer, m in sorted(self.methods.items())}

    def modules(self) -> Iterator[tuple[int, nn.Module]]:
        """``(layer index, module)`` of every patched attention: an
        :class:`attnkit.MultiheadAttention`, or a transformers attention module (whose
        method is ``module.attnkit_method`` and state ``module.attn_state``)."""
        return iter(self._modules)

    def remove(self) -> None:
        """Put the original modules and configuration back (a second call does nothing)."""
        if self.removed:
            return
        while self._undo:
            self._undo.pop()()
        self._modules.clear()
        if getattr(self.model, "_attnkit_patch", None) is self:
            del self.model._attnkit_patch
        self.removed = True

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else f"{len(self._modules)} attention modules"
        return f"PatchHandle({type(self.model).__name__}, {state}, plan={self.plan()})"


def patch(
    model: nn.Module,
    method: PlanSpec,
    *,
    layers: Iterable[int] | None = None,
    checkpoint: bool = False,
    context_parallel: object = None,
) -> PatchHandle:
    """Make a model's attention run through attnkit, in place, keeping its weights.

    Every ``torch.nn.MultiheadAttention`` in ``model`` is replaced by an
    :class:`attnkit.MultiheadAttention` sharing its Parameters, and every attention of a
    Hugging Face transformers model calls attnkit (see :mod:`attnkit.hf`).  With an exact
    method (``"auto"``, ``"tiled"``, ``"math"``) the model computes what it computed
    before, up to rounding.

    Args:
        model: any ``nn.Module``; a transformers ``PreTrainedModel`` or a model containing
            ``nn.MultiheadAttention`` modules.
        method: one method for every layer -- a name (``"tiled"``), a spec string
            (``"performer:features=256"``) or a config object (``attnkit.Local(window=512)``)
            -- or a per-layer plan ``{layer index: method}`` (also its JSON form, with
            string keys, as :meth:`PatchHandle.plan` and autotune return).  A plan's
            method may be a list with one method per query head (a per-head plan,
            :class:`attnkit.ops.heads.PerHead`).  Layers a plan does not name are left alone.
        layers: patch only these layer indices (default: all; with a plan, the plan's).
        checkpoint: wrap each patched attention in ``torch.utils.checkpoint``
            (``use_reentrant=False``): its intermediates are recomputed in backward
            instead of kept, for training memory.  Gradients are unchanged.
        context_parallel: a ``torch.distributed`` process group (or ``"world"`` for the
            default group): run the patched layers as exact ring attention over it
            (:func:`attnkit.distributed.ring_attention`, zig-zag layout), each rank
            holding its :func:`attnkit.distributed.shard` of the sequence.  ``method``
            must then be an exact method (``"auto"``); see
            :func:`attnkit.distributed.context_parallel` for the contiguous layout.

    Returns:
        A :class:`PatchHandle`; ``handle.remove()`` (or leaving ``with patch(...)``)
        restores the original modules and configuration.

    Raises:
        ValueError: ``method`` or ``layers`` names an unknown method or a layer the model
            does not have, the model has no attention that attnkit can patch, or it is
            already patched (remove that patch first).
        TypeError: ``method`` is not a name, spec, config object or plan.

    Notes:
        Layer indices are transformers' ``layer_idx`` of each attention module; for torch
        modules, each ``nn.MultiheadAttention``'s position in ``model.modules()`` order
        (nn.Transformer: encoder self-attention first, then per decoder layer its
        self-attention and cross-attention).  In a transformers model the layers that
        ``layers=`` or a plan leave out run attnkit's exact ``"auto"``: the model's
        attention setting is one per model.  Parameters a method needs (LowRank
        projections, Performer features) are added to each patched module as
        ``attn_state`` and leave with ``remove()``.

    Example::

        handle = attnkit.patch(model, "local:window=1024,sinks=4")
        ppl = evaluate(model)
        handle.remove()

        with attnkit.patch(model, {0: "auto", 1: "performer:features=128"}) as h:
            json.dump(h.plan(), f)
    """
    if context_parallel is not None:
        from .distributed import RingAttention

        if isinstance(method, Mapping) or not resolve(method).capabilities.exact:
            raise ValueError(
                f"argument 'method': context_parallel runs exact ring attention; pass an exact method such as "
                f"'auto' (got {method!r})"
            )
        method = RingAttention(group=None if context_parallel == "world" else context_parallel)
    one, plan = read_plan(method)
    wanted = None if layers is None else _read_layers(layers)
    if getattr(model, "_attnkit_patch", None) is not None:
        raise ValueError(
            f"argument 'model': this {type(model).__name__} is already patched by attnkit "
            f"({model._attnkit_patch!r}); call its handle's remove() first"
        )

    def method_for(layer: int) -> Method | None:
        if wanted is not None and layer not in wanted:
            return None
        return one if one is not None else plan.get(layer)

    handle = PatchHandle(model, {})
    found: set[int] = set()
    try:
        found |= _patch_torch_mha(model, method_for, checkpoint, handle)
        if "transformers" in sys.modules:
            from .hf import patch_transformers

            found |= patch_transformers(model, method_for, checkpoint, handle)
        if not found:
            raise ValueError(
                f"argument 'model': found no attention that attnkit can patch in this {type(model).__name__} "
                f"(looked for torch.nn.MultiheadAttention and Hugging Face transformers attention modules)"
            )
        for name, asked in (("layers", wanted), ("method", set(plan) or None)):
            missing = sorted((asked or set()) - found)
            if missing:
                raise ValueError(
                    f"argument '{name}': the model has no attention layer {missing}; its layers are "
                    f"{sorted(found)}"
                )
    except BaseException:
        handle.remove()
        raise
    model._attnkit_patch = handle
    return handle


def _read_layers(layers: Iterable[int]) -> set[int]:
    if isinstance(layers, (int, str)):
        layers = [layers]
    try:
        out = {int(i) for i in layers}
    except (TypeError, ValueError):
        raise ValueError(f"argument 'layers': expected layer indices such as [0, 2, 5], got {layers!r}") from None
    return out


# -- torch.nn.MultiheadAttention --------------------------------------------------------


class _CheckpointedMultiheadAttention(MultiheadAttention):
    """attnkit.MultiheadAttention whose forward runs under ``torch.utils.checkpoint``."""

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return super().forward(*args, **kwargs)
        return _checkpoint(super().forward, *args, use_reentrant=False, **kwargs)


def _no_fast_path(module: nn.Module, args: tuple) -> None:
    """A forward pre-hook that does nothing.

    nn.TransformerEncoderLayer's eval fast path (torch._transformer_encoder_layer_fwd)
    reads ``self_attn``'s weights and never calls ``self_attn.forward``; torch skips that
    path when any submodule of the layer has a forward hook, so this hook keeps the
    patched attention in the loop.
    """
    return None


def _swap_class(old: nn.MultiheadAttention, cls: type, method: Method, state_dtype) -> MultiheadAttention:
    """A new ``cls`` module sharing ``old``'s Parameters, buffers and submodules."""
    new = copy.copy(old)  # shallow: the same Parameter objects
    for attr, value in list(vars(new).items()):
        if isinstance(value, (dict, set)):  # _parameters, _modules, hook dicts, ...
            setattr(new, attr, copy.copy(value))  # own containers, same contents
    new.__class__ = cls
    new.method = method
    state = method.make_state(old.num_heads, old.head_dim)
    if state is not None:
        new.attn_state = state.to(device=old.out_proj.weight.device, dtype=state_dtype)
    new.register_forward_pre_hook(_no_fast_path)
    return new


def _patch_torch_mha(model: nn.Module, method_for, checkpoint: bool, handle: PatchHandle) -> set[int]:
    """Replace every nn.MultiheadAttention (in ``modules()`` order = layer index); returns the indices found."""
    mhas: dict[int, int] = {}  # id(module) -> layer index
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention) and id(m) not in mhas:
            mhas[id(m)] = len(mhas)
    if not mhas:
        return set()
    cls = _CheckpointedMultiheadAttention if checkpoint else MultiheadAttention
    replaced: dict[int, nn.Module] = {}
    for layer_old in [m for m in model.modules() if id(m) in mhas]:
        layer = mhas[id(layer_old)]
        method = method_for(layer)
        if method is None or id(layer_old) in replaced:
            continue
        dtype = layer_old.out_proj.weight.dtype
        replaced[id(layer_old)] = _swap_class(layer_old, cls, method, dtype if dtype.is_floating_point else None)
        handle.methods[layer] = method
        handle._modules.append((layer, replaced[id(layer_old)]))
    # Every place a replaced module sits (a module may be shared), and its undo.
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in replaced:
                parent._modules[name] = replaced[id(child)]
                handle._undo.append(lambda p=parent, n=name, c=child: p._modules.__setitem__(n, c))
    # nn.TransformerEncoder turns padded batches into NestedTensors in eval (its own fast
    # path), which attnkit.MultiheadAttention does not take: off while patched.
    for enc in model.modules():
        if isinstance(enc, nn.TransformerEncoder) and getattr(enc, "use_nested_tensor", False):
            if any(id(m) in {id(r) for r in replaced.values()} for m in enc.modules()):
                enc.use_nested_tensor = False
                handle._undo.append(lambda e=enc: setattr(e, "use_nested_tensor", True))
    return set(mhas.values())
