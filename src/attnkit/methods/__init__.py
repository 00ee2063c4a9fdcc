"""Attention methods; importing this package registers each of them."""

from .exact import SDPA, Exact, Math, Tiled

__all__ = ["Exact", "Math", "SDPA", "Tiled"]
