"""Sentiment accuracy of a frozen encoder (MiniLM) with each attention method swapped in.

The classification head is a linear probe on the mean-pooled last hidden state (real
tokens only), fitted once with exact attention on the training split of
:func:`attnkit.data.sentiment_split` (L2-regularised logistic regression, full-batch
L-BFGS) and cached as safetensors together with the training features.  Every method
is then evaluated on the held-out split through the same head, without retraining:
what changes is only the encoder's attention.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from ..patch import patch
from .store import cached_tensors, text_digest

__all__ = ["SENTIMENT_METHODS", "encode", "fit_probe", "sentiment_rows"]

SENTIMENT_METHODS = [
    "local:window=32",
    "local:window=16,global_tokens=1",
    "blocktopk:window=16,block=8,topk=2",
    "hybrid:window=16,features=64",
    "performer:features=256",
    "lowrank:rank=32",
    "lowrank:rank=16",
    "nystrom:landmarks=32",
    "nystrom:landmarks=16",
]
"""Sized for sentences (MiniLM sees 10-60 tokens here): windows and ranks well below the length."""


def encode(model: nn.Module, tokenizer, texts: list[str], *, batch_size: int = 64) -> Tensor:
    """Mean-pooled last hidden states of real tokens: (len(texts), hidden)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=128,
                            return_tensors="pt")
            h = model(**enc).last_hidden_state  # (B, N, hidden)
            m = enc["attention_mask"][..., None].to(h.dtype)  # (B, N, 1)
            out.append((h * m).sum(1) / m.sum(1).clamp(min=1))
    return torch.cat(out)


def fit_probe(x: Tensor, y: Tensor, *, l2: float = 1e-3, iters: int = 200) -> dict[str, Tensor]:
    """Logistic regression on standardised features: {"mean", "std", "weight", "bias"}."""
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")
    target = y.float()

    def closure():
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(z @ w + b, target) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return {"mean": mean, "std": std, "weight": w.detach(), "bias": b.detach()}


def predict(probe: Mapping[str, Tensor], x: Tensor) -> Tensor:
    return (((x - probe["mean"]) / probe["std"]) @ probe["weight"] + probe["bias"] > 0).long()


def probe_for(model: nn.Module, tokenizer, train: list[tuple[str, int]], model_name: str) -> tuple[dict, bool]:
    """The cached probe for this model and training split (fitted with exact attention when absent)."""
    texts = [t for t, _ in train]
    key = {"model": model_name, "texts_sha256": text_digest(texts), "labels": sum(y for _, y in train),
           "pool": "mean", "head": "logreg-l2=1e-3"}

    def build():
        x = encode(model, tokenizer, texts)
        y = torch.tensor([label for _, label in train])
        return fit_probe(x, y)

    return cached_tensors(f"probe-{model_name}-{key['texts_sha256'][:12]}", key, build)


def sentiment_rows(
    model: nn.Module,
    tokenizer,
    train: list[tuple[str, int]],
    test: list[tuple[str, int]],
    methods: Mapping[str, object],
    *,
    model_name: str = "minilm",
    calibrate: Callable | None = None,
) -> tuple[list[dict], bool]:
    """Accuracy on ``test`` with exact attention and with each ``{label: method}``.

    Args:
        calibrate: ``calibrate(label, method) -> handle or None``: for labels it returns a
            handle for, the model is already patched (and calibrated) by it.

    Returns:
        (rows, probe_from_cache): rows with label, method, accuracy, % of exact, seconds.
    """
    probe, hit = probe_for(model, tokenizer, train, model_name)
    texts = [t for t, _ in test]
    y = torch.tensor([label for _, label in test])

    def accuracy() -> tuple[float, float]:
        t0 = time.perf_counter()
        acc = float((predict(probe, encode(model, tokenizer, texts)) == y).float().mean())
        return acc, time.perf_counter() - t0

    base, secs = accuracy()
    rows = [{"label": "exact (unpatched)", "method": "none", "accuracy": base, "of_exact": 1.0, "seconds": secs}]
    for label, method in methods.items():
        try:
            handle = calibrate(label, method) if calibrate is not None else None
            with handle if handle is not None else patch(model, method):
                acc, secs = accuracy()
        except ValueError as e:
            rows.append({"label": label, "method": str(method), "skipped": str(e).split(". Methods")[0]})
            continue
        rows.append({"label": label, "method": str(method), "accuracy": acc, "of_exact": acc / base, "seconds": secs})
    return rows, hit
