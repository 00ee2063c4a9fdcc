"""What attnkit's cache layers share: every held tensor named, so that ``nbytes()`` counts
them all and beam search / batch edits apply to each (transformers' layer interface)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from transformers.cache_utils import CacheLayerMixin

__all__ = ["HeldTensorsLayer"]


class HeldTensorsLayer(CacheLayerMixin):
    """Base of :class:`~attnkit.cache.quantized.QuantizedLayer` and
    :class:`~attnkit.cache.memory.MemoryLayer`: subclasses name what they hold in
    :meth:`tensors` (and may override :meth:`_select` when some of it is not an
    attribute) and count the tokens seen in ``self.seen``."""

    seen: int = 0

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor the layer holds, by name."""
        raise NotImplementedError

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors().values())

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def _select(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Apply ``fn`` to every held tensor along the batch dim (beam search, batch edits)."""
        if self.is_initialized:
            for name, t in self.tensors().items():
                setattr(self, name, fn(t))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._select(lambda t: t[indices])
