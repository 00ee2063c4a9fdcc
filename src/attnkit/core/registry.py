"""The one registry of attention methods, and dispatch.

``register`` adds a method class under its ``name``; ``resolve`` turns what a user
passes as ``method=`` (a name, a ``name:key=value,...`` string, or a config object)
into a config object; ``run`` validates the call, asks the method whether it can serve
it and runs it -- or raises one error quoting the method's reasons and naming the
methods that could serve instead.  Nothing falls back silently.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import typing
from typing import Union

from torch import Tensor
from torch.nn import Module

from .capabilities import Capabilities, Method, MethodNotSupportedError
from .inputs import AttentionInputs, prepare_inputs

__all__ = ["register", "methods", "resolve", "run", "explain", "get_method_class", "default_config"]

log = logging.getLogger("attnkit")

_REGISTRY: dict[str, type[Method]] = {}

MethodSpec = Union[str, Method, list, tuple]


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method to the registry under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} must set a class attribute 'name' to be registered")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered ({_REGISTRY[cls.name].__name__})")
    _REGISTRY[cls.name] = cls
    return cls


def methods() -> dict[str, Capabilities]:
    """Every registered method's name mapped to its :class:`Capabilities`."""
    _load_builtin_methods()
    return {name: cls.capabilities for name, cls in _REGISTRY.items()}


def get_method_class(name: str) -> type[Method]:
    _load_builtin_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown attention method {name!r}; known methods: {sorted(_REGISTRY)}. "
            f"See `attnkit methods`."
        ) from None


def _convert(value: str, hint: object, key: str, name: str) -> object:
    """Parse one ``key=value`` of a spec string according to the field's type hint."""
    kinds = typing.get_args(hint) or (hint,)
    if value.lower() == "none" and type(None) in kinds:
        return None
    for kind in kinds:
        if kind is bool:
            if value.lower() in ("true", "1", "yes", "false", "0", "no"):
                return value.lower() in ("true", "1", "yes")
        elif kind in (int, float, str):
            try:
                return kind(value)
            except ValueError:
                continue
    names = " or ".join(getattr(k, "__name__", str(k)) for k in kinds)
    raise ValueError(f"method {name!r}: cannot read {key}={value!r} as {names}")


def resolve(method: MethodSpec) -> Method:
    """Turn ``"tiled"``, ``"tiled:block_q=128,block_k=256"`` or a config object into a config.

    A list (or its JSON text) with one of those per query head is a per-head method,
    :class:`attnkit.ops.heads.PerHead`.
    """
    if isinstance(method, Method):
        return method
    if isinstance(method, str) and method.lstrip().startswith("["):
        try:
            method = json.loads(method)
        except json.JSONDecodeError as e:
            raise ValueError(f"argument 'method': {method[:60]!r} looks like a per-head list but is not JSON ({e})") from None
    if isinstance(method, (list, tuple)):
        return get_method_class("heads")(tuple(method))
    if not isinstance(method, str):
        raise TypeError(
            f"argument 'method' must be a method name (str), a config object such as attnkit.Tiled(), "
            f"or a list of those (one per query head), got {type(method).__name__}"
        )
    name, _, arg_text = method.partition(":")
    cls = get_method_class(name.strip())
    kwargs: dict[str, object] = {}
    if arg_text.strip():
        hints = typing.get_type_hints(cls)
        field_types = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
        for item in arg_text.split(","):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or key not in field_types:
                raise ValueError(
                    f"method {name!r}: cannot read {item.strip()!r}; expected key=value with key in "
                    f"{sorted(field_types)}"
                )
            kwargs[key] = _convert(value.strip(), field_types[key], key, name)
    return cls(**kwargs)


def _load_builtin_methods() -> None:
    # Importing the method modules registers them; done lazily so that the registry
    # module itself has no import cycle with the methods.
    from .. import ops as _  # noqa: F401


def _refusal(method: Method, reasons: list[str], inp: AttentionInputs, need_weights: bool) -> str:
    defaults = {name: default_config(name) for name in _REGISTRY if name != method.name}
    others = [
        name
        for name, m in defaults.items()
        if m is not None and not m.not_supported_reasons(inp, need_weights=need_weights)
    ]
    hint = f" Methods that can serve these inputs: {others}." if others else ""
    return f"method {method.spec()!r} cannot serve these inputs: " + "; ".join(reasons) + "." + hint


def default_config(name: str) -> Method | None:
    """The method's default configuration, or None for one that needs arguments (e.g.
    the per-head composite ``"heads"``)."""
    try:
        return get_method_class(name)()
    except TypeError:
        return None


def run(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    method: MethodSpec = "auto",
    need_weights: bool = False,
    average_weights: bool = False,
    state: Module | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Validate, dispatch and run one attention call; returns ``(out, weights | None)``.

    The public :func:`attnkit.attention` and :class:`attnkit.MultiheadAttention` both
    go through here.
    """
    inp = prepare_inputs(q, k, v, attn_mask, dropout_p, is_causal, scale)
    m = resolve(method)
    reasons = m.not_supported_reasons(inp, need_weights=need_weights)
    if reasons:
        raise MethodNotSupportedError(_refusal(m, reasons, inp, need_weights))
    return m.forward(inp, need_weights=need_weights, average_weights=average_weights, state=state)


def explain(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    method: MethodSpec = "auto",
    need_weights: bool = False,
) -> str:
    """Say which kernel ``method`` would run for these inputs, and why the others would not."""
    inp = prepare_inputs(q, k, v, attn_mask, dropout_p, is_causal, scale)
    m = resolve(method)
    reasons = m.not_supported_reasons(inp, need_weights=need_weights)
    if reasons:
        return _refusal(m, reasons, inp, need_weights)
    choose = getattr(m, "choose", None)
    if choose is None:
        return f"{m.spec()} runs."
    chosen, why = choose(inp, need_weights=need_weights)
    return f"{m.spec()} runs {chosen.spec()}: {why}"
