"""Per-head methods (attnkit.ops.heads.PerHead): each query head runs its own method, and
the result equals running each head's method on that head alone."""

from __future__ import annotations

import json

import pytest
import torch

import attnkit
from attnkit.core.inputs import prepare_inputs
from attnkit.core.registry import resolve
from attnkit.ops.heads import PerHead

from .helpers import Case, make_inputs

LOCAL, TOPK, EXACT = "local:window=8,sinks=2", "blocktopk:window=8,block=8,topk=2", "auto"


def _one_head_at_a_time(methods, q, k, v, mask, causal):
    """The oracle: head h alone (its K/V head repeated for GQA) through its own method."""
    g = q.shape[-3] // k.shape[-3]
    outs = []
    for h, m in enumerate(methods):
        hm = mask[..., h:h + 1, :, :] if mask is not None and mask.dim() >= 3 and mask.shape[-3] > 1 else mask
        outs.append(attnkit.attention(q[..., h:h + 1, :, :], k[..., h // g:h // g + 1, :, :],
                                      v[..., h // g:h // g + 1, :, :], attn_mask=hm, is_causal=causal, method=m))
    return torch.cat(outs, dim=-3)


@pytest.mark.parametrize("methods, hkv", [
    ([LOCAL, EXACT, LOCAL, TOPK], 4),
    ([LOCAL, LOCAL, EXACT, EXACT], 2),  # each K/V group whole: the grouped form
    ([LOCAL, EXACT, EXACT, LOCAL], 2),  # groups split between methods: K/V heads gathered
    ([TOPK, LOCAL, EXACT, TOPK, LOCAL, EXACT], 3),
])
@pytest.mark.parametrize("causal", [False, True])
def test_equals_each_head_through_its_own_method(methods, hkv, causal):
    case = Case(batch=(2,), hq=len(methods), hkv=hkv, n=40, s=40, d=16, causal=causal)
    q, k, v, _ = make_inputs(case, requires_grad=True)
    out = attnkit.attention(q, k, v, is_causal=causal, method=methods)
    ref = _one_head_at_a_time(methods, q, k, v, None, causal)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_key_padding_mask_and_a_per_head_mask_reach_each_head():
    case = Case(batch=(2,), hq=3, hkv=3, n=24, s=24, d=8)
    q, k, v, _ = make_inputs(case)
    keep = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[..., 0] = True
    methods = [EXACT, "math", EXACT]
    out = attnkit.attention(q, k, v, attn_mask=keep, method=methods)
    torch.testing.assert_close(out, _one_head_at_a_time(methods, q, k, v, keep, False), rtol=1e-6, atol=1e-6)
    pad = torch.ones(2, 1, 1, 24, dtype=torch.bool)
    pad[0, ..., 20:] = False
    methods = [LOCAL, EXACT, LOCAL]
    out = attnkit.attention(q, k, v, attn_mask=pad, method=methods)
    torch.testing.assert_close(out, _one_head_at_a_time(methods, q, k, v, pad, False), rtol=1e-6, atol=1e-6)


def test_flops_are_the_sum_over_heads():
    m = resolve([LOCAL, EXACT, LOCAL, TOPK])
    q, k, v, _ = make_inputs(Case(batch=(1,), hq=4, hkv=2, n=64, s=64, d=16, causal=True))
    shape = prepare_inputs(q, k, v, is_causal=True).shape
    one = dict(hq=1, hkv=1)
    import dataclasses

    per_head = [resolve(s).flops(dataclasses.replace(shape, **one)) for s in (LOCAL, EXACT, LOCAL, TOPK)]
    assert m.flops(shape) == pytest.approx(sum(per_head))
    assert m.flops(shape) < resolve(EXACT).flops(shape)


def test_spec_round_trips_as_a_json_list():
    m = resolve([LOCAL, "tiled", attnkit.Local(window=4)])
    assert isinstance(m, PerHead)
    specs = json.loads(m.spec())
    assert specs == [resolve(LOCAL).spec(), "tiled", attnkit.Local(window=4).spec()]
    assert resolve(m.spec()) == m == resolve(specs)
    assert not m.capabilities.exact


def test_wrong_head_count_and_bad_members_are_clear_errors():
    q, k, v, _ = make_inputs(Case(batch=(1,), hq=4, hkv=4, n=16, s=16, d=8))
    with pytest.raises(ValueError, match="3 methods but the inputs have Hq=4"):
        attnkit.attention(q, k, v, method=[LOCAL, EXACT, EXACT])
    with pytest.raises(ValueError, match="unknown attention method"):
        resolve([LOCAL, "no_such_method"])
    with pytest.raises(ValueError, match="one method per query head"):
        PerHead(())
    with pytest.raises(ValueError, match="cannot contain another"):
        resolve([[LOCAL], EXACT])
    with pytest.raises(ValueError, match="not JSON"):
        resolve("[local")
    # a member's refusal names its heads
    with pytest.raises(ValueError, match=r"heads \[1\] \(lowrank.*is_causal"):
        attnkit.attention(q, k, v, is_causal=True, method=[EXACT, "lowrank:rank=4", EXACT, EXACT])


def test_stateful_members_get_their_own_state_in_a_module():
    torch.manual_seed(0)
    mha = attnkit.MultiheadAttention(32, 4, batch_first=True, method=[EXACT, "performer:features=16", EXACT, LOCAL])
    x = torch.randn(2, 20, 32)
    out, _ = mha(x, x, x, need_weights=False)
    assert out.shape == (2, 20, 32) and torch.isfinite(out).all()
    assert any("attn_state" in name for name, _ in mha.named_buffers()) or any(
        "attn_state" in name for name, _ in mha.named_parameters())
    out.sum().backward()
    assert mha.in_proj_weight.grad is not None


def test_a_per_head_plan_patches_a_transformers_model():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = model(ids).logits
        # every head exact, split across methods and K/V groups: the model's own logits
        with attnkit.patch(model, {0: ["tiled", "math", "auto", "tiled"], 1: ["math", "tiled", "tiled", "math"]}) as h:
            torch.testing.assert_close(model(ids).logits, exact, rtol=1e-4, atol=1e-4)
            assert h.plan()["0"] == ["tiled", "math", "auto", "tiled"]
        mixed = {0: [LOCAL, EXACT, EXACT, LOCAL], 1: "local:window=4"}
        with attnkit.patch(model, json.loads(json.dumps({"layers": mixed}))) as h:
            got = model(ids).logits
            assert h.plan() == {"0": [resolve(LOCAL).spec(), "auto", "auto", resolve(LOCAL).spec()],
                                "1": "local:window=4"}
    assert torch.isfinite(got).all() and not torch.allclose(got, exact, atol=1e-3)
