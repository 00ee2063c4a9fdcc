"""attnkit.patch on Hugging Face transformers models: tiny random-weight Llama (GQA, RoPE, causal) and BERT.

Exact methods must reproduce the unpatched logits within 1e-4 relative in fp32; the
patch must stay on its own model, undo bitwise, and never build an N x S mask.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attnkit
from attnkit import MethodNotSupportedError
from attnkit.core.registry import default_config

transformers = pytest.importorskip("transformers", reason="transformers is in the 'test' extra: pip install -e '.[test]'")
from transformers import AttentionInterface, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

from attnkit import hf  # noqa: E402

REL = 1e-4
VOCAB, N = 101, 37


def llama(config: LlamaConfig | None = None, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = config or llama_config()
    return LlamaForCausalLM(config).eval()


def llama_config() -> LlamaConfig:
    # GQA 6 query / 2 key-value heads, head dim 8, as SmolLM2's 9/3 in miniature
    return LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                       num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256)


def bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=128)
    return BertModel(config, add_pooling_layer=False).eval()


def batch(padding: str | None = None, b: int = 3, n: int = N):
    """ids (B, N), attention_mask (B, N) with 1 = real token, and the bool of real tokens."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    if padding == "right":
        mask[1, 25:] = 0
        mask[2, 6:] = 0
    elif padding == "left":
        mask[1, :12] = 0
        mask[2, :30] = 0
    return ids, mask, mask.bool()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def logits(model, ids, mask=None):
    with torch.no_grad():
        if isinstance(model, BertModel):
            return model(ids, attention_mask=mask).last_hidden_state
        return model(ids, attention_mask=mask).logits


@pytest.mark.parametrize("method", ["auto", "tiled", "math"])
@pytest.mark.parametrize("padding", [None, "right", "left"])
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_exact_methods_match_unpatched(arch, padding, method):
    model = llama() if arch == "llama" else bert()
    ids, mask, real = batch(padding)
    ref = logits(model, ids, mask)
    with attnkit.patch(model, method):
        out = logits(model, ids, mask)
    assert rel_err(out[real], ref[real]) <= REL


def test_cache_prefill_chunk_and_greedy_decode_match():
    # N == 1 decode steps and a chunk of N < S queries after a cache (bottom-right causal)
    model = llama()
    ids, _, _ = batch()
    ids = ids[:1]
    with torch.no_grad():
        full = model(ids).logits
        with attnkit.patch(model, "tiled"):
            first = model(ids[:, :20], use_cache=True)
            rest = model(ids[:, 20:], cache=first.past_key_values).logits
            patched = model.generate(ids[:, :10], max_new_tokens=6, do_sample=False)
        plain = model.generate(ids[:, :10], max_new_tokens=6, do_sample=False)
    assert rel_err(torch.cat([first.logits, rest], dim=1), full) <= REL
    assert torch.equal(patched, plain)


def test_remove_round_trip_and_other_models_unaffected():
    config = llama_config()
    model, other = llama(config), llama(config, seed=3)  # one config object, shared
    assert model.config is other.config
    ids, mask, _ = batch("right")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ref, ref_other = logits(model, ids, mask), logits(other, ids, mask)
    known = set(AttentionInterface._global_mapping)

    handle = attnkit.patch(model, attnkit.Performer(features=16))
    name = model.config._attn_implementation
    assert name.startswith("attnkit_") and name in AttentionMaskInterface._global_mapping
    assert other.config._attn_implementation == "sdpa" and config._attn_implementation == "sdpa"
    assert torch.equal(logits(other, ids, mask), ref_other)
    assert any(k.endswith("attn_state.projection") for k in model.state_dict())
    handle.remove()

    assert model.config is config and model.model.layers[0].self_attn.config is config
    assert set(AttentionInterface._global_mapping) == known and name not in AttentionMaskInterface._global_mapping
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(logits(model, ids, mask), ref)


def test_plan_round_trip_through_json():
    model = llama()
    ids, mask, _ = batch("right")
    ref = logits(model, ids, mask)
    plan = {0: "math", 2: "local:window=8,sinks=2"}
    with attnkit.patch(model, plan) as h:
        saved = json.dumps(h.plan())
        out = logits(model, ids, mask)
        layers = {i: getattr(m, "attnkit_method") for i, m in h.modules()}
    assert json.loads(saved) == {"0": "math", "2": "local:window=8,sinks=2"}
    assert layers == {0: attnkit.Math(), 2: attnkit.Local(window=8, sinks=2)}
    with attnkit.patch(model, json.loads(saved)):
        assert torch.equal(logits(model, ids, mask), out)
    with attnkit.patch(model, {"0": "tiled"}):  # layers 1, 2 run exact "auto": all exact
        assert rel_err(logits(model, ids, mask), ref) <= REL
    with attnkit.patch(model, "performer:features=16", layers=[1]) as h:
        assert sorted(h.methods) == [1]
    with pytest.raises(ValueError, match="argument 'layers'.*no attention layer \\[9\\]"):
        attnkit.patch(model, "tiled", layers=[9])


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_checkpoint_same_gradients(arch):
    ids, mask, real = batch("right")
    grads = []
    for checkpoint in (False, True):
        model = (llama() if arch == "llama" else bert()).train()
        with attnkit.patch(model, "tiled", checkpoint=checkpoint):
            out = model(ids, attention_mask=mask)
            out = out.logits if arch == "llama" else out.last_hidden_state
            out[real].square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, g in grads[0].items():
        assert torch.allclose(grads[1][name], g, rtol=1e-5, atol=1e-7), name


def _approximate(causal: bool) -> list[str]:
    return sorted(n for n, c in attnkit.methods().items()  # "heads" needs its per-head list: tests/test_heads.py
                  if not c.exact and c.available and c.gqa and (c.causal or not causal) and default_config(n) is not None)


SMALL = {"performer": "performer:features=16", "lowrank": "lowrank:rank=8", "local": "local:window=8,sinks=1",
         "nystrom": "nystrom:landmarks=4", "blocktopk": "blocktopk:window=8,block=4,topk=1",
         "hybrid": "hybrid:window=8"}


@pytest.mark.parametrize(
    "name, make_model",
    [(n, llama) for n in _approximate(causal=True)] + [(n, bert) for n in _approximate(causal=False)],
    ids=[f"{n}-causal-gqa" for n in _approximate(causal=True)] + [f"{n}-bidirectional" for n in _approximate(causal=False)],
)
def test_approximate_methods_run(name, make_model):
    model = make_model()
    ids, mask, real = batch("right")
    ref = logits(model, ids, mask)
    with attnkit.patch(model, SMALL.get(name, name)):
        out = logits(model, ids, mask)
    assert torch.isfinite(out[real]).all()
    assert rel_err(out[real], ref[real]) > 1e-6  # the approximation really ran


class ShapeLog(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_no_n_by_s_mask_is_built(arch, monkeypatch):
    n = 40  # no other dimension of these models is 40
    model = llama() if arch == "llama" else bert()
    ids, mask, _ = batch("right", n=n)
    with ShapeLog() as plain:
        logits(model, ids, mask)
    assert any(s[-2:] == (n, n) for s in plain.shapes)  # transformers' own sdpa builds one: the probe works

    seen = []
    original = hf.run

    def spy(q, k, v, attn_mask, dropout_p, is_causal, scale, **kw):
        seen.append((None if attn_mask is None else tuple(attn_mask.shape), is_causal))
        return original(q, k, v, attn_mask, dropout_p, is_causal, scale, **kw)

    monkeypatch.setattr(hf, "run", spy)
    with attnkit.patch(model, "tiled:block_q=16,block_k=16"), ShapeLog() as patched:
        logits(model, ids, mask)
    assert not [s for s in patched.shapes if s[-2:] == (n, n)]
    assert set(seen) == {((3, 1, 1, n), arch == "llama")}  # key padding + is_causal, per layer
    seen.clear()
    with attnkit.patch(model, "tiled"):
        logits(model, ids)  # no padding: no mask at all
    assert set(seen) == {(None, arch == "llama")}


def test_output_attentions():
    model = bert()
    ids, mask, _ = batch("right")
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, output_attentions=True).attentions
    model.config._attn_implementation = "sdpa"
    with attnkit.patch(model, "math"), torch.no_grad():
        out = model(ids, attention_mask=mask, output_attentions=True).attentions
    assert len(out) == len(ref) and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(out, ref))
    with attnkit.patch(model, "performer:features=16"), pytest.raises(MethodNotSupportedError, match="weights"):
        model(ids, attention_mask=mask, output_attentions=True)


def test_mask_function_plain_patterns_and_dense_fallback(monkeypatch):
    from transformers.masking_utils import and_masks, causal_mask_function, sliding_window_overlay

    keep = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    args = dict(batch_size=2, q_length=4, kv_length=4, dtype=torch.float32, device="cpu")
    assert hf.mask_function(**args, mask_function=causal_mask_function, attention_mask=None) is None
    full = torch.ones(2, 4, dtype=torch.bool)
    assert hf.mask_function(**args, mask_function=causal_mask_function, attention_mask=full) is None
    assert torch.equal(hf.mask_function(**args, mask_function=causal_mask_function, attention_mask=keep), keep)
    # a pattern is_causal + key padding cannot say: transformers' own dense mask, with a warning
    window = and_masks(causal_mask_function, sliding_window_overlay(2))
    monkeypatch.setattr(hf, "_warned_dense", False)
    with pytest.warns(UserWarning, match="O\\(N\\*S\\)"):
        dense = hf.mask_function(**args, mask_function=window, attention_mask=keep)
    assert dense.shape == (2, 1, 4, 4) and not dense[1, 0, 3, 0] and dense[1, 0, 3, 2]
