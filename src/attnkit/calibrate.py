"""``attnkit.calibrate``: fit an approximate method's own parameters to a pretrained model.

Distillation, layer by layer, without touching the model: each patched attention's
output is pulled towards the exact attention output of the same layer on the same
inputs.  What is fitted is only what the method keeps in its ``attn_state`` (made by
``Method.make_state``):

* :class:`~attnkit.LowRank` ``projection="learned"``: the projections E, F (R, max_len);
* :class:`~attnkit.Performer` and :class:`~attnkit.Hybrid`: the (F, D) feature
  projection, a buffer that calibration turns from random directions into directions
  fitted to the layer's queries and keys (a learned feature map).

Every model weight stays frozen (``requires_grad`` is never turned on for them; the
model is only run forward, under ``no_grad``, to record each layer's q, k, v and exact
output).  Per layer the loss is the squared relative Frobenius error

    loss = ||A~(q, k, v; θ) - A(q, k, v)||_F² / ||A(q, k, v)||_F²

over the recorded batches, minimised with Adam.  The inputs of every layer are those of
the exact model (teacher forcing), so layers are fitted independently.

Methods with nothing to fit (Local, BlockTopK, Nystrom, pool/random LowRank) are left
as they are; :func:`calibrate` says so in its report rather than failing.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
from torch import Tensor, nn

from .core.capabilities import Method
from .core.inputs import AttentionInputs
from .core.registry import run
from .ops import Exact
from .patch import PatchHandle, PlanSpec, patch

__all__ = ["Calibration", "Capture", "calibrate", "capture_layers", "relative_error", "trainable_state"]

_EXACT = Exact()


# -- recording each layer's attention call ---------------------------------------------


@dataclass
class Capture:
    """One layer's attention call as the exact model made it, and its exact output.

    Attributes:
        q: (B, Hq, N, D).  k: (B, Hkv, S, D).  v: (B, Hkv, S, Dv).
        mask: None or a mask broadcastable to (B, Hq, N, S) (a key-padding (B, 1, 1, S) in
            patched transformers models).
        is_causal, scale: as in the call.
        out: (B, Hq, N, Dv), exact attention.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    mask: Tensor | None
    is_causal: bool
    scale: float
    out: Tensor

    def run(self, method: Method, state: nn.Module | None = None) -> Tensor:
        """``method``'s output on this call: (B, Hq, N, Dv)."""
        out, _ = run(self.q, self.k, self.v, self.mask, 0.0, self.is_causal, self.scale, method=method, state=state)
        return out


@dataclass(frozen=True)
class _Probe(Method):
    """Exact attention that hands every call to ``sink(layer, inputs, out)``: the recorder
    :func:`capture_layers` patches in.  Not registered; never in a saved plan."""

    layer: int = 0
    sink: Callable = field(default=None, compare=False, repr=False)

    name: ClassVar[str] = "probe"
    capabilities: ClassVar = Exact.capabilities

    def forward(self, inp: AttentionInputs, *, need_weights=False, average_weights=False, state=None):
        out, weights = _EXACT.forward(inp, need_weights=need_weights, average_weights=average_weights)
        self.sink(self.layer, inp, out)
        return out, weights

    def spec(self) -> str:
        return f"probe(layer={self.layer})"


def _layers_of(model: nn.Module) -> list[int]:
    """The attention layer indices :func:`attnkit.patch` finds in ``model``."""
    with patch(model, "auto") as h:
        return sorted(layer for layer, _ in h.modules())


def _forward(model: nn.Module, batch) -> None:
    """Run ``model`` on one batch: a tensor of token ids, a tuple/list of positional
    arguments, or a dict of keyword arguments (``input_ids``, ``attention_mask``, ...)."""
    if isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def capture_layers(
    model: nn.Module,
    batches: Iterable,
    sink: Callable[..., None],
    *,
    layers: Iterable[int] | None = None,
    loss: Callable[[nn.Module, object], Tensor] | None = None,
) -> None:
    """Run the model with exact attention and call ``sink(layer, inputs, exact_out)`` for
    every attention call of every layer (inputs: :class:`AttentionInputs`, out (B, Hq, N, Dv)).

    Runs under ``torch.no_grad()`` (unless ``loss`` is given); the model is patched for
    the duration only.

    Args:
        model: a model :func:`attnkit.patch` can patch, not patched already.
        batches: an iterable of model inputs: token-id tensors (B, N), tuples of
            positional arguments, or dicts of keyword arguments.
        sink: called once per layer per batch, in layer order.
        layers: only these layer indices (default: every layer).
        loss: ``loss(model, batch)`` -> a scalar.  When given, each batch is run through
            it with gradients and back-propagated, and ``sink`` gets a fourth argument:
            d loss / d exact_out (B, Hq, N, Dv), the sensitivity of the loss to that
            layer's attention output (zeros where the loss does not depend on it).  The
            model's weights get no gradients (their ``requires_grad`` is turned off for
            the pass and restored); ``inputs`` and ``exact_out`` are detached.
    """
    wanted = _layers_of(model) if layers is None else sorted({int(i) for i in layers})
    if loss is None:
        plan = {layer: _Probe(layer=layer, sink=sink) for layer in wanted}
        with torch.no_grad(), patch(model, plan):
            for batch in batches:
                _forward(model, batch)
        return
    for batch in batches:
        calls: list[list] = []

        def keep(layer: int, inp: AttentionInputs, out: Tensor) -> None:
            if not out.requires_grad:  # the first probed layer: nothing before it carries a gradient
                out.requires_grad_()
            call = [layer, inp, out, None]
            out.register_hook(lambda g, call=call: call.__setitem__(3, g))
            calls.append(call)

        plan = {layer: _Probe(layer=layer, sink=keep) for layer in wanted}
        weights = [p for p in model.parameters() if p.requires_grad]
        try:
            for p in weights:
                p.requires_grad_(False)
            with torch.enable_grad(), patch(model, plan):
                loss(model, batch).backward()
        finally:
            for p in weights:
                p.requires_grad_(True)
        with torch.no_grad():
            for layer, inp, out, grad in calls:
                inp = replace(inp, q=inp.q.detach(), k=inp.k.detach(), v=inp.v.detach())
                sink(layer, inp, out.detach(), torch.zeros_like(out) if grad is None else grad)


def relative_error(out: Tensor, ref: Tensor, dims: tuple[int, ...] | None = None) -> Tensor:
    """||out - ref||_F / ||ref||_F in fp64 (over ``dims``, default all)."""
    diff = (out.double() - ref.double()).pow(2)
    norm = ref.double().pow(2)
    if dims is None:
        return (diff.sum() / norm.sum().clamp(min=1e-300)).sqrt()
    return (diff.sum(dims) / norm.sum(dims).clamp(min=1e-300)).sqrt()


# -- what can be fitted ----------------------------------------------------------------


def trainable_state(state: nn.Module | None) -> dict[str, Tensor]:
    """The tensors of a method's state that calibration fits: every floating-point
    Parameter, and the floating-point buffers other than counters (Performer's and
    Hybrid's ``projection``).  ``{}`` for a stateless method."""
    if state is None:
        return {}
    found = {name: p for name, p in state.named_parameters() if p.is_floating_point()}
    found.update({name: b for name, b in state.named_buffers() if b.is_floating_point() and name not in found})
    return found


@dataclass
class Calibration:
    """What :func:`calibrate` did.

    Attributes:
        handle: the patch (the model stays patched with the fitted state; ``handle.remove()``
            undoes it).
        before / after: ``{layer: relative Frobenius error}`` against exact attention on the
            calibration batches, before and after fitting (layers with nothing to fit
            appear in ``before`` only).
        steps: ``{layer: optimizer steps taken}``.
        seconds: wall-clock time of the fitting.
        skipped: ``{layer: why}`` for layers left as they were.
    """

    handle: PatchHandle
    before: dict[int, float]
    after: dict[int, float]
    steps: dict[int, int]
    seconds: float
    skipped: dict[int, str]

    def state_dict(self) -> dict[str, Tensor]:
        """The fitted tensors as ``{"<layer>.<name>": tensor}`` (for ``safetensors.torch.save_file``).

        Raises:
            ValueError: the handle was removed already (call this first).
        """
        if self.handle.removed:
            raise ValueError("Calibration.state_dict(): the patch was removed; take the state_dict before handle.remove()")
        out = {}
        for layer, module in self.handle.modules():
            for name, t in trainable_state(getattr(module, "attn_state", None)).items():
                if layer in self.after:
                    out[f"{layer}.{name}"] = t.detach().contiguous().clone()
        return out

    def summary(self) -> dict:
        """A JSON-serialisable report."""
        return {
            "plan": self.handle.plan(),
            "before": {str(k): v for k, v in self.before.items()},
            "after": {str(k): v for k, v in self.after.items()},
            "steps": {str(k): v for k, v in self.steps.items()},
            "seconds": self.seconds,
            "skipped": {str(k): v for k, v in self.skipped.items()},
        }


def load_calibration(handle: PatchHandle, tensors: Mapping[str, Tensor]) -> None:
    """Copy tensors saved by :meth:`Calibration.state_dict` into a patch made with the same plan.

    Raises:
        ValueError: a key names a layer or tensor the patch does not have, or a shape differs.
    """
    states = {layer: trainable_state(getattr(m, "attn_state", None)) for layer, m in handle.modules()}
    for key, value in tensors.items():
        layer_text, _, name = key.partition(".")
        target = states.get(int(layer_text), {}).get(name) if layer_text.isdigit() else None
        if target is None or tuple(target.shape) != tuple(value.shape):
            raise ValueError(
                f"argument 'tensors': {key!r} {tuple(value.shape)} has no matching state in this patch "
                f"({handle.plan()}); patch with the plan the calibration was made with"
            )
        with torch.no_grad():
            target.copy_(value)


def _read_budget(budget: int | str) -> tuple[int | None, float | None]:
    """``(steps per layer, None)`` or ``(None, seconds in all)``."""
    if isinstance(budget, bool):
        raise ValueError(f"argument 'budget': expected steps per layer (int) or a time such as '90s', got {budget!r}")
    if isinstance(budget, int):
        if budget < 0:
            raise ValueError(f"argument 'budget': steps per layer must be >= 0, got {budget}")
        return budget, None
    if isinstance(budget, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|min)\s*", budget)
        if m:
            return None, float(m.group(1)) * (60.0 if m.group(2) != "s" else 1.0)
    raise ValueError(
        f"argument 'budget': expected steps per layer (an int such as 100) or wall-clock time for all "
        f"layers (a string such as '90s' or '5m'), got {budget!r}"
    )


def calibrate(
    model: nn.Module,
    batches: Iterable,
    method: PlanSpec,
    *,
    budget: int | str = 100,
    lr: float = 3e-2,
    layers: Iterable[int] | None = None,
) -> Calibration:
    """Patch ``model`` with ``method`` and fit the method's own parameters, layer by layer,
    to the model's exact attention outputs (distillation; every model weight frozen).

    Args:
        model: a model :func:`attnkit.patch` can patch, not patched already.
        batches: calibration inputs, as :func:`capture_layers` takes them (token ids
            (B, N), argument tuples or keyword dicts).  They are run once with exact
            attention and each layer's q, k, v and output are kept in memory: about
            (2·Hq·D + 2·Hkv·D)·N·4 bytes per token per layer in fp32.
        method: one method for every layer or a per-layer plan, as :func:`attnkit.patch`
            takes it.  Only methods with trainable state are fitted (LowRank
            ``projection="learned"``, Performer, Hybrid); others are left as they are.
        budget: an int: Adam steps per layer (each step sees every batch); a string such
            as ``"90s"`` or ``"5m"``: wall-clock time for all layers, shared evenly by the
            layers still to fit.
        lr: Adam learning rate, relative to each fitted tensor's RMS (0.01: steps of about
            1% of the tensor's typical entry).
        layers: fit only these layer indices (default: every patched layer).

    Returns:
        A :class:`Calibration`: ``.handle`` (the model stays patched with the fitted
        state), the per-layer errors before and after, steps and time.  A layer whose
        error did not fall keeps its initial state.

    Raises:
        ValueError: a bad ``budget``, or what :func:`attnkit.patch` raises.

    Example::

        cal = attnkit.calibrate(model, [ids[:, :2048]], "hybrid:window=256,features=64", budget="2m")
        print(cal.before, cal.after)
        cal.handle.remove()
    """
    steps_per_layer, seconds = _read_budget(budget)
    wanted = None if layers is None else {int(i) for i in layers}
    captures: dict[int, list[Capture]] = {}

    def keep(layer: int, inp: AttentionInputs, out: Tensor) -> None:
        captures.setdefault(layer, []).append(
            Capture(inp.q.detach(), inp.k.detach(), inp.v.detach(),
                    None if inp.attn_mask is None else inp.attn_mask.detach(), inp.is_causal, inp.scale, out.detach())
        )

    capture_layers(model, batches, keep, layers=wanted)
    if not captures:
        raise ValueError("argument 'batches': no batch was given; pass at least one model input")
    handle = patch(model, method)
    try:
        report = _fit_all(handle, captures, wanted, steps_per_layer, seconds, lr)
    except BaseException:
        handle.remove()
        raise
    return report


def _fit_all(handle, captures, wanted, steps_per_layer, seconds, lr) -> Calibration:
    modules = [(layer, m) for layer, m in handle.modules() if wanted is None or layer in wanted]
    before, after, steps, skipped = {}, {}, {}, {}
    fit = []
    for layer, module in modules:
        method = getattr(module, "attnkit_method", None) or getattr(module, "method", None)
        state = getattr(module, "attn_state", None)
        with torch.no_grad():
            before[layer] = _layer_error(captures[layer], method, state)
        params = trainable_state(state)
        if not params:
            skipped[layer] = f"{method.spec()} has no parameters to fit"
        else:
            fit.append((layer, method, state, params))
    start = time.perf_counter()
    for i, (layer, method, state, params) in enumerate(fit):
        if seconds is not None:
            left = seconds - (time.perf_counter() - start)
            limit = max(0.0, left) / (len(fit) - i)
        else:
            limit = None
        steps[layer], after[layer] = _fit_layer(captures[layer], method, state, params, steps_per_layer, limit, lr,
                                                before[layer])
    return Calibration(handle, before, after, steps, time.perf_counter() - start, skipped)


def _layer_error(caps: list[Capture], method: Method, state: nn.Module | None) -> float:
    num = den = 0.0
    for c in caps:
        out = c.run(method, state)
        num += float((out.double() - c.out.double()).pow(2).sum())
        den += float(c.out.double().pow(2).sum())
    return math.sqrt(num / max(den, 1e-300))


def _fit_layer(caps, method, state, params, max_steps, limit, lr, initial) -> tuple[int, float]:
    """Adam on the relative squared error over ``caps``; keeps the best state seen."""
    was_training = state.training
    state.eval()  # Performer's training mode would redraw (and overwrite) the projection
    flags = {name: p.requires_grad for name, p in params.items()}
    best = {name: p.detach().clone() for name, p in params.items()}
    best_err, steps = initial, 0
    # lr is relative to each tensor's size: LowRank's E (entries ~1/segment) and a feature
    # projection (entries ~1) move by the same fraction of themselves per step.
    groups = [{"params": [p], "lr": lr * max(float(p.detach().float().pow(2).mean().sqrt()), 1e-8)} for p in params.values()]
    opt = torch.optim.Adam(groups)
    den = sum(float(c.out.double().pow(2).sum()) for c in caps)
    deadline = None if limit is None else time.perf_counter() + limit
    try:
        for p in params.values():
            p.requires_grad_(True)
        while (max_steps is None or steps < max_steps) and (deadline is None or time.perf_counter() < deadline):
            opt.zero_grad(set_to_none=True)
            num = 0.0
            for c in caps:
                # q needs a gradient too: some fast paths pick in-place kernels when none of q, k, v does.
                q = c.q.detach().requires_grad_(True)
                cap = Capture(q, c.k, c.v, c.mask, c.is_causal, c.scale, c.out)
                loss = (cap.run(method, state).float() - c.out.float()).pow(2).sum() / den
                loss.backward()
                num += loss.item() * den
            err = math.sqrt(num / max(den, 1e-300))  # of the parameters before this step
            if err < best_err:
                best_err = err
                best = {name: p.detach().clone() for name, p in params.items()}
            opt.step()
            steps += 1
        with torch.no_grad():
            final = _layer_error(caps, method, state)
            if final < best_err:
                best_err = final
            else:
                for name, p in params.items():
                    p.copy_(best[name])
    finally:
        for name, p in params.items():
            p.requires_grad_(flags[name])
            p.grad = None
        state.train(was_training)
    return steps, best_err
