"""Attention methods, one module per family (named ops, not methods, so that the
package never shadows the public function attnkit.methods()); importing it registers them."""

from .exact import SDPA, Exact, Math, Tiled

__all__ = ["Exact", "Math", "SDPA", "Tiled"]
