"""``attnkit eval``: perplexity, sentiment accuracy, autotuned plans and train-step memory
with attention swapped in pretrained models, offline and cached.  See :mod:`.main`."""

from .main import main

__all__ = ["main"]
