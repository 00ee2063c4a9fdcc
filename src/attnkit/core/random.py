"""Seeded random streams for methods: explicit generators, never the global RNG."""

from __future__ import annotations

import torch

__all__ = ["seeded_generator"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def seeded_generator(seed: int, *stream: int, device: torch.device | str | None = None) -> torch.Generator:
    """A generator for config seed ``seed`` and sub-stream ``stream`` (e.g. draw, tile).

    The seed is hashed (splitmix64), never used as is: with ``manual_seed(seed)`` the
    numbers for seed 0 would be those of ``torch.manual_seed(0); torch.randn(...)``, and
    data drawn that way would align with them (measured on Performer: a 20x biased
    kernel estimate).  Each stream index is mixed in by one more hash.
    """
    h = _splitmix64(seed & _MASK64)
    for s in stream:
        h = _splitmix64(h ^ (s & _MASK64))
    return torch.Generator(device=device or "cpu").manual_seed(h & ((1 << 63) - 1))
