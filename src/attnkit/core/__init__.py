"""Inputs and validation, capabilities, the registry and the reference."""

from .capabilities import Capabilities, Method, MethodNotSupportedError
from .inputs import AttentionInputError, AttentionInputs, prepare_inputs
from .reference import reference_attention
from .registry import explain, methods, register, resolve, run

__all__ = [
    "AttentionInputError",
    "AttentionInputs",
    "Capabilities",
    "Method",
    "MethodNotSupportedError",
    "explain",
    "methods",
    "prepare_inputs",
    "reference_attention",
    "register",
    "resolve",
    "run",
]
