"""attnkit.calibrate on tiny random-weight models: the layer error falls, model weights stay frozen,
stateless methods are left alone, and a fitted state round-trips."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.calibrate import (
    Calibration,
    capture_layers,
    load_calibration,
    relative_error,
)

transformers = pytest.importorskip("transformers", reason="transformers is in the 'test' extra: pip install -e '.[test]'")
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

VOCAB = 101


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return sharpen(LlamaForCausalLM(config).eval())


def bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    return sharpen(BertModel(config, add_pooling_layer=False).eval())


def sharpen(model, factor: float = 4.0):
    """Scale the query and key projections: random weights give near-uniform attention, which
    a segment mean already matches; pretrained attention is peaked."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("q_proj.weight", "k_proj.weight", "query.weight", "key.weight")):
                p.mul_(factor)
    return model


def ids(b: int = 2, n: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


def frozen_copy(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch, method", [
    ("bert", "lowrank:rank=4,projection=learned,max_len=48"),
    ("llama", "performer:features=8"),
])
def test_calibration_lowers_every_layer_error_and_keeps_model_weights(arch, method):
    model = bert() if arch == "bert" else llama()
    weights = frozen_copy(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    cal = attnkit.calibrate(model, [ids()], method, budget=25)
    state = {layer: m.attn_state for layer, m in cal.handle.modules()}
    cal.handle.remove()
    assert isinstance(cal, Calibration) and set(cal.after) == {0, 1} and not cal.skipped
    for layer in cal.after:
        assert cal.after[layer] < 0.9 * cal.before[layer], (layer, cal.before, cal.after)
    assert all(s == 25 for s in cal.steps.values())
    # the reported error is the fitted method's actual error against exact attention
    errs = {}
    capture_layers(model, [ids()], lambda layer, inp, out: errs.setdefault(layer, (inp, out)))
    for layer, (inp, out) in errs.items():
        method_cfg = attnkit.core.registry.resolve(method)
        with torch.no_grad():
            got, _ = attnkit.core.registry.run(inp.q, inp.k, inp.v, inp.attn_mask, 0.0, inp.is_causal, inp.scale,
                                               method=method_cfg, state=state[layer])
        assert float(relative_error(got, out)) == pytest.approx(cal.after[layer], rel=1e-4)
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_stateless_method_is_reported_not_fitted():
    model = llama()
    cal = attnkit.calibrate(model, [ids()], "local:window=8", budget=5)
    cal.handle.remove()
    assert cal.after == {} and set(cal.skipped) == {0, 1} and "no parameters" in cal.skipped[0]
    assert all(e > 0 for e in cal.before.values())


def test_fitted_state_round_trips_through_state_dict():
    model = bert()
    spec = "lowrank:rank=4,projection=learned,max_len=48"
    cal = attnkit.calibrate(model, [ids()], spec, budget=10)
    tensors = cal.state_dict()
    with torch.no_grad():
        want = model(ids(seed=2)).last_hidden_state
    cal.handle.remove()
    with pytest.raises(ValueError, match="before handle.remove"):
        cal.state_dict()
    assert set(tensors) == {"0.e", "0.f", "1.e", "1.f"}
    with attnkit.patch(model, spec) as h, torch.no_grad():
        fresh = model(ids(seed=2)).last_hidden_state
        load_calibration(h, tensors)
        got = model(ids(seed=2)).last_hidden_state
    assert torch.equal(got, want) and not torch.equal(fresh, want)
    with attnkit.patch(model, "lowrank:rank=2,projection=learned,max_len=48") as h, \
            pytest.raises(ValueError, match="tensors"):
        load_calibration(h, tensors)


def test_time_budget_and_layers():
    model = llama()
    cal = attnkit.calibrate(model, [ids(n=32)], "performer:features=8", budget="1s", layers=[1])
    cal.handle.remove()
    assert set(cal.after) == {1} and cal.seconds < 10
    assert cal.after[1] <= cal.before[1]


@pytest.mark.parametrize("budget", [-1, "fast", 2.5, True])
def test_bad_budget_names_the_argument(budget):
    with pytest.raises(ValueError, match="budget"):
        attnkit.calibrate(llama(), [ids()], "performer:features=8", budget=budget)


def test_no_batches_is_an_error_and_leaves_the_model_unpatched():
    model = llama()
    with pytest.raises(ValueError, match="batches"):
        attnkit.calibrate(model, [], "performer:features=8")
    assert getattr(model, "_attnkit_patch", None) is None
