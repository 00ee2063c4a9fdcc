"""Version checks, in one place."""

from __future__ import annotations

import torch

TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])

# F.scaled_dot_product_attention(enable_gqa=...) arrived in torch 2.5.
SDPA_HAS_GQA = TORCH_VERSION >= (2, 5)
