"""attnkit.patch on torch modules: every nn.MultiheadAttention swapped, weights shared, undone by remove()."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import attnkit
from attnkit.patch import read_plan

E, H, FF = 32, 4, 64
REL = 1e-4  # the contract: exact methods within 1e-4 relative in fp32


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def encoder(layers: int = 3, batch_first: bool = True, seed: int = 0) -> nn.TransformerEncoder:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=True).eval()


def inputs(b: int = 3, n: int = 23, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, E, generator=g)
    pad = torch.zeros(b, n, dtype=torch.bool)
    pad[1, 17:] = True  # True = ignore (torch's meaning); left aligned, as the nested path wants
    pad[2, 9:] = True
    return x, pad


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


class Spy:
    """Counts attnkit.MultiheadAttention forward calls (to prove torch's fast path did not run)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = attnkit.MultiheadAttention.forward

        def forward(mod, *args, **kwargs):
            self.calls += 1
            return original(mod, *args, **kwargs)

        monkeypatch.setattr(attnkit.MultiheadAttention, "forward", forward)


@pytest.mark.parametrize("method", ["auto", "tiled", "math"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_encoder_exact_matches_with_padding(method, mode, monkeypatch):
    model = encoder()
    model.train(mode == "train")
    x, pad = inputs()
    with torch.no_grad():
        ref = model(x, src_key_padding_mask=pad)  # eval: torch's nested-tensor fast path
    spy = Spy(monkeypatch)
    with attnkit.patch(model, method), torch.no_grad():
        out = model(x, src_key_padding_mask=pad)
    assert spy.calls == 3, "torch's fast path bypassed the patched attention"
    keep = ~pad  # torch's nested path returns zeros at padded positions; compare the real tokens
    assert rel_err(out[keep], ref[keep]) <= REL


def test_encoder_layer_fast_path_is_skipped(monkeypatch):
    # The layer's own fast path (eval, batch_first, even heads) calls a fused kernel with
    # self_attn's weights; a patched layer must run the patched attention instead.
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=True).eval()
    x, _ = inputs()
    with torch.no_grad():
        ref = layer(x)
        spy = Spy(monkeypatch)
        with attnkit.patch(layer, "math"):
            out = layer(x)
        with attnkit.patch(layer, attnkit.Performer(features=8)):
            approx = layer(x)
    assert spy.calls == 2
    assert rel_err(out, ref) <= REL
    assert rel_err(approx, ref) > 1e-3  # the approximation really ran


def test_causal_mask_and_seq_first():
    model = encoder(batch_first=False)
    x, _ = inputs()
    x = x.transpose(0, 1)  # (N, B, E)
    mask = nn.Transformer.generate_square_subsequent_mask(x.shape[0])
    with torch.no_grad():
        ref = model(x, mask=mask, is_causal=True)
        with attnkit.patch(model, "tiled"):
            out = model(x, mask=mask, is_causal=True)
    assert rel_err(out, ref) <= REL


def test_full_transformer_and_layer_indices():
    torch.manual_seed(0)
    model = nn.Transformer(E, H, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=FF, dropout=0.0,
                           batch_first=True).eval()
    src, tgt = torch.randn(2, 11, E), torch.randn(2, 7, E)
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(7)
    with torch.no_grad():
        ref = model(src, tgt, tgt_mask=tgt_mask)
        with attnkit.patch(model, "math") as h:
            out = model(src, tgt, tgt_mask=tgt_mask)
    # encoder self-attention 0, 1; decoder (self, cross) 2, 3 and 4, 5
    assert sorted(h.methods) == [0, 1, 2, 3, 4, 5]
    assert rel_err(out, ref) <= REL


def test_parameters_are_shared_not_copied():
    model = encoder()
    before = {id(p) for p in model.parameters()}
    with attnkit.patch(model, "tiled") as h:
        attn = [m for _, m in h.modules()]
        assert all(type(m) is attnkit.MultiheadAttention for m in attn)
        assert {id(p) for p in model.parameters()} == before
        with torch.no_grad():
            model.layers[0].self_attn.in_proj_weight.mul_(2.0)  # visible through the original too
    assert {id(p) for p in model.parameters()} == before


def test_remove_round_trip_is_bitwise():
    model, other = encoder(), encoder(seed=5)
    x, pad = inputs()
    state, originals = snapshot(model), [layer.self_attn for layer in model.layers]
    with torch.no_grad():
        ref, ref_other = model(x, src_key_padding_mask=pad), other(x, src_key_padding_mask=pad)
        handle = attnkit.patch(model, attnkit.Performer(features=16))  # a stateful method: adds attn_state
        assert any("attn_state" in k for k in model.state_dict())
        other_during = other(x, src_key_padding_mask=pad)
        handle.remove()
        handle.remove()  # idempotent
        out = model(x, src_key_padding_mask=pad)
    assert [layer.self_attn for layer in model.layers] == originals
    assert all(type(m) is nn.MultiheadAttention for m in originals)
    assert model.use_nested_tensor
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(out, ref)
    assert torch.equal(other_during, ref_other)


def test_layers_and_plan_round_trip():
    model = encoder(layers=4)
    x, pad = inputs()
    plan = {0: "math", 2: "performer:features=16", 3: attnkit.Local(window=4)}
    with torch.no_grad(), attnkit.patch(model, plan) as h:
        assert sorted(h.methods) == [0, 2, 3]
        assert type(model.layers[1].self_attn) is nn.MultiheadAttention  # not in the plan: untouched
        saved = json.dumps(h.plan())
        out = model(x, src_key_padding_mask=pad)
    assert json.loads(saved) == {"0": "math", "2": "performer:features=16", "3": "local:window=4"}
    with torch.no_grad(), attnkit.patch(model, json.loads(saved)) as h2:
        assert h2.plan() == json.loads(saved)
        again = model(x, src_key_padding_mask=pad)
    assert torch.equal(again, out)
    with attnkit.patch(model, "tiled", layers=[1, 3]) as h3:
        assert sorted(h3.methods) == [1, 3]
        assert type(model.layers[0].self_attn) is nn.MultiheadAttention
    assert read_plan({"layers": {"1": "math"}, "max_error": 0.1})[1] == {1: attnkit.Math()}


def test_checkpoint_same_gradients():
    x, pad = inputs()
    grads = []
    for checkpoint in (False, True):
        model = encoder().train()
        with attnkit.patch(model, "tiled", checkpoint=checkpoint):
            model(x, src_key_padding_mask=pad)[~pad].square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert torch.allclose(grads[1][name], g, rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("method", ["performer:features=16", "lowrank:rank=8", "local:window=4,sinks=1",
                                    "nystrom:landmarks=4", "blocktopk:window=4,block=4,topk=1", "hybrid:window=4"])
def test_approximate_methods_run(method):
    model = encoder()
    x, pad = inputs()
    with torch.no_grad():
        ref = model(x, src_key_padding_mask=pad)
        with attnkit.patch(model, method):
            out = model(x, src_key_padding_mask=pad)
    assert out.shape == ref.shape and torch.isfinite(out).all()


def test_errors_name_the_argument():
    model = encoder()
    with pytest.raises(ValueError, match="argument 'layers'.*no attention layer \\[7\\]"):
        attnkit.patch(model, "tiled", layers=[7])
    with pytest.raises(ValueError, match="argument 'method'.*key 'first'"):
        attnkit.patch(model, {"first": "tiled"})
    with pytest.raises(ValueError, match="unknown attention method 'nope'"):
        attnkit.patch(model, "nope")
    with pytest.raises(ValueError, match="found no attention"):
        attnkit.patch(nn.Linear(3, 3), "tiled")
    assert type(model.layers[0].self_attn) is nn.MultiheadAttention  # a failed patch leaves nothing behind
    with attnkit.patch(model, "tiled"):
        with pytest.raises(ValueError, match="already patched"):
            attnkit.patch(model, "math")


def test_context_parallel_needs_an_exact_method():
    model = torch.nn.TransformerEncoderLayer(16, 2, dim_feedforward=8, batch_first=True)
    for method in ("local:window=4", {0: "auto"}):
        with pytest.raises(ValueError, match="argument 'method': context_parallel runs exact ring attention"):
            attnkit.patch(model, method, context_parallel="world")
    assert not isinstance(model.self_attn, attnkit.MultiheadAttention)  # nothing left behind
