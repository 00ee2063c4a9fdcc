"""attnkit.cache.keyplan: per-channel key widths -- the planned cache's attention against
attention over its dequantized contents, each width's keys as that width quantizes them,
the allocation against brute force, a plan fitted on a tiny Llama, JSON round trip, errors."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

pytest.importorskip("transformers")

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import attnkit
from attnkit.cache import QuantizedCache, cache_attention, dequantize, enable, key_bit_plan, load_plan, quantize, save_plan
from attnkit.cache import keyplan
from attnkit.cache.keyplan import allocate_bits, channel_errors
from attnkit.cache.quantized import QuantizedLayer


def _kv(b=2, h=2, s=77, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, h, s, d, generator=g) + 3 * torch.randn(1, h, 1, d, generator=g)
    return k, torch.randn(b, h, s, d, generator=g)


def _plan(h=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.tensor([0, 2, 4, 8])[torch.randint(0, 4, (h, d), generator=g)]


@pytest.mark.parametrize("two_pass_max", [0, 1 << 30])
@pytest.mark.parametrize("sinks", [0, 3])
def test_planned_cache_attention_equals_attention_over_dequantized(two_pass_max, sinks, monkeypatch):
    monkeypatch.setattr("attnkit.cache.quantized.TWO_PASS_MAX", two_pass_max)
    layer = QuantizedLayer(2, 16, 0, "minmax", 32, False, sinks, key_bits=_plan())  # blocks of 2 groups
    k, v = _kv()
    layer.update(k, v)
    k2, v2 = _kv(s=1 if two_pass_max else 5, seed=1)
    kv, vv = layer.update(k2, v2)
    n = k2.shape[-2]
    q = torch.randn(2, 6, n, 8, generator=torch.Generator().manual_seed(2))  # GQA 6 / 2
    out = cache_attention(q, kv, vv, is_causal=True)
    keep = torch.ones(n, 77 + n, dtype=torch.bool).tril(77)
    ref = attnkit.attention(q.double(), kv.materialize().double(), vv.materialize().double(), attn_mask=keep,
                            method="math").float()
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert layer.key_codes.shape[1] == (77 + n) // 16  # full groups, aligned to multiples of G


def test_each_width_quantizes_its_channels():
    plan = _plan()
    layer = QuantizedLayer(2, 16, 0, "minmax", 64, False, key_bits=plan)
    k, v = _kv(s=64)
    layer.update(k, v)  # its own attention sees these 64 keys in full precision; then they are quantized
    kd = layer.update(k[:, :, :1], v[:, :, :1])[0].materialize()[:, :, :64]  # now the 4 groups, dequantized
    groups = k.unflatten(2, (4, 16)).transpose(-1, -2)  # (B, H, nG, D, G)
    for h, c in itertools.product(range(2), range(8)):
        w = int(plan[h, c])
        x = groups[:, h, :, c]  # (B, nG, G)
        want = x.mean(-1, keepdim=True).half().float().expand_as(x) if w == 0 else dequantize(*quantize(x, w))
        assert torch.equal(kd[:, h, :, c].unflatten(1, (4, 16)), want), (h, c, w)
    # nbytes: every held tensor plus the plan's index tensors
    held = sum(t.nbytes for t in layer.tensors().values())
    assert layer.nbytes() == held + layer.layout.nbytes() and "key_mean" in layer.tensors()
    # digits: a 4-bit channel is two 2-bit rows, an 8-bit one four; the codes' bytes are the plan's bits
    assert layer.key_codes.shape[2] == int((plan // 2).sum()) and layer.key_codes.shape[-1] == 16 * 2 // 8


def test_allocate_bits_matches_brute_force_on_the_convex_hull():
    g = torch.Generator().manual_seed(0)
    opts = (0, 2, 4)
    cost = {0: 0.25, 2: 2.5, 4: 4.5}
    weight = torch.rand(6, generator=g) ** 3
    base = torch.rand(6, generator=g) + 0.5
    errors = {0: base, 2: base / 10, 4: base / 160}  # convex in cost: the Lagrangian optimum is exact
    budget = 6 * 2.5
    got = allocate_bits(weight, errors, cost, budget)
    assert sum(cost[int(b)] for b in got) <= budget
    best = min((c for c in itertools.product(opts, repeat=6) if sum(cost[b] for b in c) <= budget),
               key=lambda c: sum(float(weight[i] * errors[b][i]) for i, b in enumerate(c)))
    value = lambda c: sum(float(weight[i] * errors[int(b)][i]) for i, b in enumerate(c))
    assert value(got) <= value(best) * 1.35  # Lagrangian: within the last hull step of the optimum
    assert int(got[weight.argmax()]) >= int(got[weight.argmin()])  # heavier channels get no fewer bits
    with pytest.raises(ValueError, match="budget"):
        allocate_bits(weight, errors, cost, 1.0)


def test_channel_errors_fall_with_width():
    k, _ = _kv(b=1, s=96)
    e = channel_errors(k[0], 16, (0, 2, 4, 8))
    assert (e[8] < e[4]).all() and (e[4] < e[2]).all() and e[0].shape == (2, 8)


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=None, bos_token_id=None)
    return LlamaForCausalLM(config).eval()


def test_plan_fitted_on_a_model_runs_generate_and_round_trips(tiny_llama, tmp_path):
    model = tiny_llama
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(0))
    before = model.config._attn_implementation
    plan = key_bit_plan(model, [ids[:, :32], ids[:, 8:]], bits=2, group_size=8)
    assert set(plan) == {"key_bits"}  # no value channel asked for
    plan = plan["key_bits"]
    assert model.config._attn_implementation == before  # the calibration attention is taken off again
    assert keyplan._ACTIVE == []  # and nothing keeps the recorded keys alive
    assert len(plan) == 2 and all(torch.tensor(p).shape == (2, 16) for p in plan)
    for p in plan:
        b = torch.tensor(p)
        assert set(b.unique().tolist()) <= {0, 2, 4}
        cost = torch.where(b == 0, 16 / 8, b + 32 / 8).sum()
        assert cost <= b.numel() * (2 + 32 / 8) + 1e-9  # the key bytes of uniform 2-bit
    eight_bit = key_bit_plan(model, [ids], bits=8, group_size=8)["key_bits"]  # default widths 0 and 8 (not 16)
    assert set(torch.tensor(eight_bit).unique().tolist()) <= {0, 8}
    save_plan(plan, tmp_path / "plan.json")
    assert load_plan(tmp_path / "plan.json") == {"key_bits": plan}
    (tmp_path / "bad.json").write_text(json.dumps({"plan": plan}))
    with pytest.raises(ValueError, match="not an attnkit key bit plan"):
        load_plan(tmp_path / "bad.json")
    with torch.no_grad(), enable(model):
        cache = QuantizedCache(bits=2, group_size=8, key_bits=plan)
        out = model.generate(ids[:, :21], cache=cache, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert out.shape == (2, 33) and cache.get_seq_length() == 32
        # all channels at 8 bits: the planned layout gives the uniform 8-bit cache's output
        eight = [[[8] * 16] * 2] * 2
        a = model.generate(ids[:, :21], cache=QuantizedCache(bits=8, group_size=8, key_bits=eight),
                           max_new_tokens=12, min_new_tokens=12, do_sample=False)
        b = model.generate(ids[:, :21], cache=QuantizedCache(bits=8, group_size=8), max_new_tokens=12,
                           min_new_tokens=12, do_sample=False)
        assert torch.equal(a, b)


def test_bad_plans_are_refused(tiny_llama):
    model = tiny_llama
    ids = torch.randint(0, 96, (1, 20))
    with pytest.raises(ValueError, match="key_bits"):
        QuantizedCache(bits=2, key_bits=[[[3] * 16] * 2] * 2).update(*_kv(b=1, s=4, d=16), 0)
    with torch.no_grad(), enable(model):
        with pytest.raises(ValueError, match="key_bits.*2 kv heads of dim 8"):
            model(ids, cache=QuantizedCache(bits=2, key_bits=[[[2] * 8] * 2] * 2), use_cache=True)
        with pytest.raises(ValueError, match="plans 1 layers"):
            model(ids, cache=QuantizedCache(bits=2, key_bits=[[[2] * 16] * 2]), use_cache=True)
    with pytest.raises(ValueError, match="key_bits"):
        QuantizedCache(bits=2, key_bits=[["a"]])
    with pytest.raises(ValueError, match="options"):
        key_bit_plan(model, [ids], bits=2, options=(0, 3))
    with pytest.raises(ValueError, match="group_size"):
        key_bit_plan(model, [ids[:, :4]], bits=2, group_size=8)


@pytest.mark.parametrize("rows", [1, 40])  # stacked rows (one product for all heads), or one per head
def test_planned_scores_per_head_or_stacked(rows, monkeypatch):
    plan = _plan(h=3)
    plan[1] = 2  # head 1 has no channel of width 0, 4 or 8: empty slices
    layer = QuantizedLayer(2, 16, 0, "minmax", 1024, False, key_bits=plan)
    k, v = _kv(h=3, s=64)
    layer.update(k, v)
    kv, vv = layer.update(*_kv(h=3, s=rows, seed=4))
    q = torch.randn(2, 3, rows, 8, generator=torch.Generator().manual_seed(2))
    for stack in (0, 1 << 20):
        monkeypatch.setattr("attnkit.cache.keyplan.STACK_ROWS", stack)
        out = cache_attention(q, kv, vv, is_causal=True)
        keep = torch.ones(rows, 64 + rows, dtype=torch.bool).tril(64)
        ref = attnkit.attention(q.double(), kv.materialize().double(), vv.materialize().double(), attn_mask=keep,
                                method="math").float()
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max(), stack
