"""attnkit.cache.valuechannels: value channels held apart -- the cache's attention against
attention over its dequantized contents (online and two-pass, sinks, padding), the held
channels' 4-bit error and the rest's shrunken ranges, nbytes() against the tensors held,
a plan fitted on a tiny Llama (budget, generate(), materialize=True, JSON round trip, an
old plan still loading), bad plans refused."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

import attnkit
from attnkit.cache import QuantizedCache, cache_attention, enable, key_bit_plan, load_plan, save_plan
from attnkit.cache.quantized import QuantizedLayer
from attnkit.cache.valuechannels import range_channels

from .test_cache import _held_bytes
from .test_keyplan import tiny_llama  # noqa: F401 (a fixture)


def _kv(b=2, h=2, s=77, d=8, dv=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, h, s, d, generator=g) + 3 * torch.randn(1, h, 1, d, generator=g)
    v = torch.randn(b, h, s, dv, generator=g)
    v[:, 0, :, 1] += 12.0  # an outlier channel, large in every token
    v[:, 1, :, dv - 1] -= 9.0  # the last channel: the padding of a partial group repeats it
    return k, v


def _channels(dv=16):
    return torch.tensor([[1, 4], [dv - 1, 0]])  # (H, k): head 0's outlier, head 1's last channel


def _key_plan(h=2, d=8):
    return torch.tensor([0, 2, 4, 8])[torch.randint(0, 4, (h, d), generator=torch.Generator().manual_seed(0))]


@pytest.mark.parametrize("two_pass_max", [0, 1 << 30])  # the online merge, or the two-pass path (decoding)
@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize("dv", [16, 40])  # one value group per token (two passes apply), or three, one padded
@pytest.mark.parametrize("keys", ["uniform", "plan"])
def test_attention_with_apart_channels_equals_attention_over_dequantized(two_pass_max, sinks, dv, keys, monkeypatch):
    monkeypatch.setattr("attnkit.cache.quantized.TWO_PASS_MAX", two_pass_max)
    layer = QuantizedLayer(2, 16, 0, "minmax", 32, False, sinks, key_bits=_key_plan() if keys == "plan" else None,
                           value_channels=_channels(dv))  # blocks of 2 groups: several blocks + tail
    k, v = _kv(dv=dv)
    layer.update(k, v)
    n = 1 if two_pass_max else 5
    k2, v2 = _kv(s=n, dv=dv, seed=1)
    kv, vv = layer.update(k2, v2)
    keep = torch.ones(2, 1, 1, 77 + n, dtype=torch.bool)
    keep[1, ..., :2] = False  # a padded sink (or first token) and a padded quantized one
    keep[0, ..., 40] = False
    q = torch.randn(2, 6, n, 8, generator=torch.Generator().manual_seed(2))  # GQA 6 / 2
    out = cache_attention(q, kv, vv, is_causal=True, attn_mask=keep)
    kd, vd = kv.materialize(), vv.materialize()
    ref = attnkit.attention(q.double(), kd.double(), vd.double(), method="math",
                            attn_mask=keep & torch.ones(n, 77 + n, dtype=torch.bool).tril(77)).float()
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    a0 = sinks // 16 * 16  # the packed rows start here (the sinks' places included)
    rows = 77 + n - a0
    assert layer.value_apart_codes.shape == (2, 2, rows // 16, 2, 8) and layer.value_apart_residual.shape[-2] == rows % 16
    # what the attention read: the held-apart channels as 4-bit codes per channel over 16-token groups (within
    # half a step), the rows still waiting for their group exactly
    for h, c in ((0, 1), (0, 4), (1, dv - 1), (1, 0)):
        got, want = vd[:, h, sinks:77, c], v[:, h, sinks:, c]
        assert (got - want).abs().max() <= (want.amax() - want.amin()) / 15 / 2 * 1.01 + 1e-6, (h, c)
    waiting = 77 - (77 - a0) % 16
    assert torch.equal(vd[:, 0, waiting:77][..., [1, 4]], v[:, 0, waiting:][..., [1, 4]])


@pytest.mark.parametrize("dv", [16, 40])
def test_apart_channels_leave_the_value_groups_and_their_ranges_shrink(dv):
    k, v = _kv(b=1, s=64, dv=dv)
    plain, apart = QuantizedLayer(2, 16, 0, "minmax", 64, False), QuantizedLayer(
        2, 16, 0, "minmax", 64, False, value_channels=_channels(dv))
    for layer in (plain, apart):
        layer.update(k, v)
    got = {name: lay.update(k[:, :, :1], v[:, :, :1])[1].materialize()[:, :, :64] for name, lay in
           (("plain", plain), ("apart", apart))}
    rest = torch.ones(2, dv, dtype=torch.bool).scatter_(1, _channels(dv), False)  # (H, Dv) the other channels
    err = {name: (x - v).pow(2)[..., rest[:, None, :].expand(2, 64, dv)].sum() for name, x in got.items()}
    assert err["apart"] < 0.3 * err["plain"]  # the outliers no longer set the groups' steps
    assert (apart.value_scale.float()[:, 0, :, 0] < 0.6 * plain.value_scale.float()[:, 0, :, 0]).all()


@pytest.mark.parametrize("group", [16, 64])  # three value groups of 40 channels (one padded), or one
def test_range_channels_equal_the_greedy_formula(group):
    v = torch.randn(3, 50, 40, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.5, 2, 40)
    taken: list[list[int]] = [[], [], []]
    for _ in range(3):  # the formula: each step, the channel leaving the least mean Σ_groups range² of the rest
        for h in range(3):
            def cost(c):
                rest = [x for x in range(40) if x not in taken[h] + [c]]
                groups = [[x for x in rest if x // min(group, 40) == g] for g in range(-(-40 // min(group, 40)))]
                return sum(float((v[h][:, gr].amax(-1) - v[h][:, gr].amin(-1)).pow(2).mean()) for gr in groups if gr)
            taken[h].append(min((c for c in range(40) if c not in taken[h]), key=cost))
    assert range_channels(v, 3, group).tolist() == [sorted(t) for t in taken]


@pytest.mark.parametrize("sinks", [0, 4])
def test_nbytes_counts_the_apart_channels_and_their_index(sinks):
    b, h, d, g = 1, 3, 64, 64
    layer = QuantizedLayer(2, g, 0, "minmax", 1024, False, sinks, value_channels=torch.tensor([[3], [7], [60]]))
    k, v = torch.randn(b, h, 2 * g + 5, d), torch.randn(b, h, 2 * g + 5, d)
    layer.update(k, v)
    assert layer.nbytes() == _held_bytes(layer) + _held_bytes(layer.apart)  # every tensor attribute, the index too
    # value rows 133 (sinks' places included): 2 groups of 64 apart (codes + fp16 scale + fp16 low), 5 waiting (fp32)
    apart = b * h * (2 * (g // 2 + 2 + 2) + 5 * 4) + h * 8
    plain = QuantizedLayer(2, g, 0, "minmax", 1024, False, sinks)
    plain.update(k, v)
    assert layer.nbytes() == plain.nbytes() + apart


def test_plan_with_value_channels_fits_generates_and_round_trips(tiny_llama, tmp_path):
    model = tiny_llama
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(0))
    plan = key_bit_plan(model, [ids], bits=2, group_size=8, value_channels=2)
    assert set(plan) == {"key_bits", "value_channels"}
    assert all(torch.tensor(p).shape == (2, 2) for p in plan["value_channels"])
    uniform = 2 + 32 / 8  # bits per key number of uniform 2-bit keys (groups of 8)
    paid = key_bit_plan(model, [ids], bits=2, group_size=8, value_channels=2, budget=uniform - 2 * (4 + 32 / 8) / 16)
    assert paid["value_channels"] == plan["value_channels"]
    for p, apart in ((plan["key_bits"], 0), (paid["key_bits"], 2 * 2 * (4 + 32 / 8))):  # the apart channels' cost
        b = torch.tensor(p)
        keys = torch.where(b == 0, 16 / 8, b + 32 / 8).sum()  # by default on top of uniform keys; paid: within them
        assert keys + apart <= b.numel() * uniform + 1e-9
    assert torch.tensor(paid["key_bits"]).sum() < torch.tensor(plan["key_bits"]).sum()
    save_plan(plan, tmp_path / "plan.json")
    assert load_plan(tmp_path / "plan.json") == plan
    old = key_bit_plan(model, [ids], bits=2, group_size=8)["key_bits"]  # a plan from before value channels
    (tmp_path / "old.json").write_text(json.dumps({"kind": "attnkit.key_bits", "version": 1, "plan": old}))
    assert load_plan(tmp_path / "old.json") == {"key_bits": old}
    with torch.no_grad(), enable(model):
        cache = QuantizedCache(bits=2, group_size=8, sinks=2, key_bits=plan)
        out = model.generate(ids[:, :21], cache=cache, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert out.shape == (2, 33) and cache.get_seq_length() == 32
        assert cache.layers[1].value_apart_codes.shape == (2, 2, 4, 2, 4)  # 32 value rows: 4 groups of 8 apart
        for p in (old, load_plan(tmp_path / "old.json"), {"value_channels": plan["value_channels"]}):
            cache = QuantizedCache(bits=2, group_size=8, sinks=2, key_bits=p)
            model(ids[:, :21], cache=cache, use_cache=True)
            assert (cache.layers[0].apart is None) == ("value_channels" not in p) and cache.get_seq_length() == 21
    # materialize=True: plain tensors, the held-apart channels in them, for any model
    views, plain = (QuantizedCache(bits=2, group_size=8, key_bits=plan, materialize=m) for m in (False, True))
    k, v = _kv(b=1, s=30, d=16, dv=16)
    for cache in (views, plain):
        cache.update(k, v, 0)
    kv, vv = views.update(k[:, :, :2], v[:, :, :2], 0)
    km, vm = plain.update(k[:, :, :2], v[:, :, :2], 0)
    assert type(vm) is torch.Tensor and torch.equal(km, kv.materialize()) and torch.equal(vm, vv.materialize())


def test_bad_value_channels_are_refused(tiny_llama):
    model = tiny_llama
    ids = torch.randint(0, 96, (1, 20))
    keys = [[[2] * 16] * 2] * 2
    for channels, match in (([[[1, 1], [0, 2]]] * 2, "distinct"), ([[[-1], [0]]] * 2, "distinct"),
                            ([[[1, 2], [0]]] * 2, "value_channels"), ([[[16], [0]]] * 2, "2 heads of dim 16"),
                            ([[[1], [0], [2]]] * 2, "3 kv heads")):
        with pytest.raises(ValueError, match=match):
            cache = QuantizedCache(bits=2, key_bits={"key_bits": keys, "value_channels": channels})
            cache.update(*_kv(b=1, s=4, d=16, dv=16), 0)
    with pytest.raises(ValueError, match="key_bits.*entries"):
        QuantizedCache(bits=2, key_bits={"key_bits": keys, "value_chanels": [[[1], [0]]] * 2})
    with pytest.raises(ValueError, match="value_channels.*plans 1 layers"), torch.no_grad(), enable(model):
        model(ids, cache=QuantizedCache(bits=2, key_bits={"key_bits": keys, "value_channels": [[[1], [0]]]}),
              use_cache=True)
    with pytest.raises(ValueError, match="value_channels"):
        key_bit_plan(model, [ids], bits=2, group_size=8, value_channels=-1)
    with pytest.raises(ValueError, match="value_channels"):
        key_bit_plan(model, [ids], bits=2, group_size=8, value_channels=16)
    with pytest.raises(ValueError, match="budget"):
        key_bit_plan(model, [ids], bits=2, group_size=8, budget=0.1)
