"""Attention methods, one module per family (named ops, not methods, so that the
package never shadows the public function attnkit.methods()).

Importing this package imports every module in it, and each registers its methods.
"""

import importlib
import pkgutil

from .exact import SDPA, Exact, Math, Tiled

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Exact", "Math", "SDPA", "Tiled"]
