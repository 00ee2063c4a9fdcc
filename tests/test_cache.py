"""attnkit.cache: packing, quantization error bounds, cache attention against attention over
the dequantized contents (and exact attention where nothing is quantized), generate() on a
tiny random-weight Llama, nbytes() against the tensors held, CompressedMemory's fixed size."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import attnkit
from attnkit.cache import (
    CacheView,
    CacheViewError,
    CompressedMemory,
    QuantizedCache,
    cache_attention,
    dequantize,
    enable,
    pack,
    quantize,
    unpack,
)
from attnkit.cache.memory import MemoryLayer
from attnkit.cache.quant import code_matmul, code_order, unpack_bytes
from attnkit.cache.quantized import QuantizedLayer
from attnkit.ops.performer import positive_features, projection_matrix


def _kv(b=2, h=2, s=77, d=40, dv=None, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, h, s, d, generator=g) + offset * torch.randn(1, h, 1, d, generator=g)  # channel offsets
    v = torch.randn(b, h, s, dv or d, generator=g)
    return k, v


def _reference(q, k, v, cached: int, causal: bool = True):
    """Exact attention of N new queries over S = cached + N keys (new tokens causal, top-left)."""
    n, s = q.shape[-2], k.shape[-2]
    keep = torch.ones(n, s, dtype=torch.bool).tril(cached) if causal else None
    return attnkit.attention(q.double(), k.double(), v.double(), attn_mask=keep, method="math").float()


# -- packing and quantization ----------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("length", [1, 3, 7, 33, 97])
def test_pack_round_trip(bits, length):
    codes = torch.randint(0, 1 << bits, (2, 5, length), dtype=torch.uint8, generator=torch.Generator().manual_seed(length))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == math.ceil(length * bits / 8)
    assert torch.equal(unpack(packed, bits, length), codes)
    assert torch.equal(unpack(packed, bits, length, torch.float32), codes.float())
    # byte-major unpacking, put back in code order, gives the same codes (and the padding zeros)
    per = 8 // bits
    flat = code_order(unpack_bytes(packed, bits).flatten(-2), per)
    assert torch.equal(flat[..., :length], codes.float()) and not flat[..., length:].any()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("length", [3, 33, 64, 128])
def test_code_matmul_equals_product_with_the_codes(bits, length):
    """The fast paths' product over packed codes, on int32-aligned rows (the word paths),
    odd rows, and a row view whose storage is not 4-byte aligned."""
    gen = torch.Generator().manual_seed(bits * 1000 + length)
    codes = torch.randint(0, 1 << bits, (2, 3, 16, length), dtype=torch.uint8, generator=gen)
    packed = pack(codes, bits)  # (2, 3, K=16, W)
    a = torch.randn(2, 3, 5, 16, generator=gen, dtype=torch.float64)
    full = unpack(packed, bits, packed.shape[-1] * (8 // bits), torch.float64)  # padding codes too
    assert torch.allclose(code_matmul(a, packed, bits), a @ full)
    shifted = torch.cat([packed.new_zeros(2, 3, 16, 1), packed], dim=-1)[..., 1:]  # same rows, storage offset 1
    assert torch.allclose(code_matmul(a, shifted, bits), a @ full)


def test_pack_refuses_bad_arguments():
    with pytest.raises(ValueError, match="bits"):
        pack(torch.zeros(4, dtype=torch.uint8), 3)
    with pytest.raises(TypeError, match="uint8"):
        pack(torch.zeros(4, dtype=torch.int32), 4)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [5, 17, 64])
def test_minmax_error_within_half_a_step(bits, group):
    x = torch.randn(3, 7, group, generator=torch.Generator().manual_seed(bits)) * 4 + 30  # offsets far from 0
    codes, scale, low = quantize(x, bits)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 1 << bits
    assert scale.dtype == low.dtype == torch.float16 and scale.shape == x.shape[:-1]
    err = (dequantize(codes, scale, low) - x).abs()
    assert (err <= scale.float()[..., None] * (0.5 + 1e-3)).all()


def test_constant_group_is_exact_enough():
    x = torch.full((2, 16), 3.0)
    codes, scale, low = quantize(x, 2)
    assert torch.allclose(dequantize(codes, scale, low), x, atol=float(scale.max()) / 2)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_search_never_worse_than_minmax(bits):
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    x[::7, 3] = 12.0  # outliers
    errs = {}
    for mode in ("minmax", "search"):
        c, s, lo = quantize(x, bits, mode)
        errs[mode] = (dequantize(c, s, lo) - x).pow(2).sum(-1)  # per group
    assert (errs["search"] <= errs["minmax"] + 1e-6).all()
    if bits == 2:  # outlier groups: clipping pays off clearly
        assert errs["search"].sum() < 0.7 * errs["minmax"].sum()


# -- attention over the cache ------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("scale", ["minmax", "search"])
@pytest.mark.parametrize("dv", [40, 24, 16])  # 16: one value group per token, where decoding takes two passes
@pytest.mark.parametrize("two_pass_max", [0, 1 << 30])  # the online merge, or the two-pass path where it applies
def test_cache_attention_equals_attention_over_dequantized(bits, scale, dv, two_pass_max, monkeypatch):
    monkeypatch.setattr("attnkit.cache.quantized.TWO_PASS_MAX", two_pass_max)
    layer = QuantizedLayer(bits, 16, 3, scale, 32, False)  # blocks of 2 groups: several blocks + tail
    k, v = _kv(s=77, dv=dv, offset=3.0)
    layer.update(k, v)
    k2, v2 = _kv(s=9, dv=dv, seed=1)
    kv, vv = layer.update(k2, v2)
    assert isinstance(kv, CacheView) and kv.shape == (2, 2, 86, 40) and vv.shape == (2, 2, 86, dv)
    q = torch.randn(2, 6, 9, 40, generator=torch.Generator().manual_seed(2))  # GQA 6 / 2
    out = cache_attention(q, kv, vv, is_causal=True)
    ref = _reference(q, kv.materialize(), vv.materialize(), cached=77)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    # keys and values really quantized: 4 full key groups of 16 (77 - R = 74 -> 64), values 74
    assert layer.key_codes.shape[2] == (86 - 3) // 16 and layer.value_codes.shape[2] == 86 - 3


def test_search_clips_values_only():
    k, v = _kv(b=1, s=64, d=32, offset=2.0)  # value groups of 16 channels, none padded
    v[..., 5] += 9.0 * (torch.arange(64) % 13 == 0)  # value outliers
    layers = {mode: QuantizedLayer(2, 16, 0, mode, 64, False) for mode in ("minmax", "search")}
    for layer in layers.values():
        layer.update(k, v)
    kv = {m: lay.update(k[:, :, :1], v[:, :, :1]) for m, lay in layers.items()}
    keys = {m: pair[0].materialize()[:, :, :64] for m, pair in kv.items()}
    vals = {m: pair[1].materialize()[:, :, :64] for m, pair in kv.items()}
    assert torch.equal(keys["search"], keys["minmax"])  # keys: min-max under both (outlier-aware rule)
    err = {m: (vals[m] - v).unflatten(-1, (2, 16)).pow(2).sum(-1) for m in vals}  # per value group
    assert (err["search"] <= err["minmax"] + 1e-6).all() and err["search"].sum() < err["minmax"].sum()


@pytest.mark.parametrize("first", [2, 5, 40])  # sinks filled in the first update, or across updates
@pytest.mark.parametrize("dv", [40, 16])
@pytest.mark.parametrize("two_pass_max", [0, 1 << 30])
def test_sinks_stay_exact_and_the_rest_is_quantized_after_them(first, dv, two_pass_max, monkeypatch):
    monkeypatch.setattr("attnkit.cache.quantized.TWO_PASS_MAX", two_pass_max)
    sinks = 4
    layer = QuantizedLayer(2, 16, 0, "minmax", 32, False, sinks)
    k, v = _kv(s=77, dv=dv, offset=3.0)
    k[:, :, 0] *= 20.0  # an outlier first key: quantized, it would widen its group's range
    layer.update(k[:, :, :first], v[:, :, :first])
    layer.update(k[:, :, first:], v[:, :, first:])
    assert torch.equal(layer.sink_keys, k[:, :, :sinks]) and torch.equal(layer.sink_values, v[:, :, :sinks])
    # groups aligned to multiples of G (group 0 holds the sinks' places): 4 groups, 13 keys waiting;
    # every value row packed, rows 0-3 the sinks' placeholders
    assert layer.key_codes.shape[2] == 77 // 16 and layer.key_residual.shape[-2] == 77 - 64
    assert layer.value_codes.shape[2] == 77
    k2, v2 = _kv(s=3, dv=dv, seed=1)
    keep = torch.ones(2, 1, 1, 80, dtype=torch.bool)
    keep[1, ..., :2] = False  # a padded sink and a padded quantized key
    keep[0, ..., 9] = False
    kv, vv = layer.update(k2, v2)
    kd, vd = kv.materialize(), vv.materialize()
    assert torch.equal(kd[:, :, :sinks], k[:, :, :sinks])  # the sinks come back exactly
    q = torch.randn(2, 4, 3, 40, generator=torch.Generator().manual_seed(2))
    out = cache_attention(q, kv, vv, is_causal=True, attn_mask=keep)
    ref = attnkit.attention(q.double(), kd.double(), vd.double(), method="math",
                            attn_mask=keep & torch.ones(3, 80, dtype=torch.bool).tril(77)).float()
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    # the outlier no longer sets the first key group's range: those keys quantize far better
    plain = QuantizedLayer(2, 16, 0, "minmax", 32, False)
    plain.update(k, v)
    kp = plain.update(k2, v2)[0].materialize()
    err = (kd[:, :, sinks:16] - k[:, :, sinks:16]).abs().max()
    assert err < 0.2 * (kp[:, :, sinks:16] - k[:, :, sinks:16]).abs().max()
    assert layer.nbytes() == _held_bytes(layer)


@pytest.mark.parametrize("sinks", [3, 16, 21])  # the sinks' places inside group 0, none, inside group 1
@pytest.mark.parametrize("two_pass_max", [0, 1 << 30])
def test_key_groups_stay_aligned_whatever_the_sinks(sinks, two_pass_max, monkeypatch):
    monkeypatch.setattr("attnkit.cache.quantized.TWO_PASS_MAX", two_pass_max)
    layer = QuantizedLayer(4, 16, 0, "minmax", 32, False, sinks)
    k, v = _kv(s=96, dv=16, offset=3.0)
    layer.update(k[:, :, :50], v[:, :, :50])
    for t in range(50, 96):  # decode steps: at every multiple of G nothing waits
        kv, vv = layer.update(k[:, :, t : t + 1], v[:, :, t : t + 1])
        if (t + 1) % 16 == 0:
            assert layer.key_residual.shape[-2] == 0 and layer.key_codes.shape[2] == (t + 1 - sinks // 16 * 16) // 16
    assert layer.value_codes.shape[2] == 96 - sinks // 16 * 16 and layer.value_residual.shape[-2] == 0
    assert torch.equal(layer.sink_keys, k[:, :, :sinks])
    kd, vd = kv.materialize(), vv.materialize()
    assert kd.shape == (2, 2, 96, 40) and torch.equal(kd[:, :, :sinks], k[:, :, :sinks])
    assert (kd - k).abs().max() < 0.3 and (vd - v).abs().max() < 0.3  # 4-bit: within half a step (ranges ~8)
    q = torch.randn(2, 4, 1, 40, generator=torch.Generator().manual_seed(3))
    keep = torch.ones(2, 1, 1, 96, dtype=torch.bool)
    keep[0, ..., 1] = False
    keep[1, ..., sinks] = False  # the first packed token after the sinks
    out = cache_attention(q, kv, vv, is_causal=True, attn_mask=keep)
    ref = attnkit.attention(q.double(), kd.double(), vd.double(), method="math", attn_mask=keep).float()
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_residual_only_regime_is_exact():
    layer = QuantizedLayer(2, 64, 200, "minmax", 64, False)  # nothing leaves full precision
    k, v = _kv(s=50)
    layer.update(k, v)
    k2, v2 = _kv(s=7, seed=3)
    kv, vv = layer.update(k2, v2)
    q = torch.randn(2, 4, 7, 40)
    out = cache_attention(q, kv, vv, is_causal=True)
    ref = _reference(q, torch.cat([k, k2], -2), torch.cat([v, v2], -2), cached=50)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert layer.key_codes.shape[2] == 0 and layer.value_codes.shape[2] == 0


def test_decode_step_and_padding_mask():
    layer = QuantizedLayer(4, 8, 0, "minmax", 16, False)
    k, v = _kv(b=2, s=41)
    layer.update(k, v)
    kv, vv = layer.update(*_kv(b=2, s=1, seed=5))
    q = torch.randn(2, 4, 1, 40)
    keep = torch.ones(2, 1, 1, 42, dtype=torch.bool)
    keep[0, ..., :10] = False  # left padding of the first sequence
    out = cache_attention(q, kv, vv, is_causal=True, attn_mask=keep)
    ref = attnkit.attention(q, kv.materialize(), vv.materialize(), attn_mask=keep, method="math")
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_view_refuses_tensor_use():
    layer = QuantizedLayer(4, 8, 0, "minmax", 16, False)
    kv, vv = layer.update(*_kv(s=20))
    with pytest.raises(CacheViewError, match="materialize=True"):
        torch.nn.functional.scaled_dot_product_attention(torch.randn(2, 2, 1, 40), kv, vv)
    with pytest.raises(CacheViewError, match="attnkit"):
        kv.transpose(1, 2)
    with pytest.raises(CacheViewError):
        kv[:, :, :4]
    with pytest.raises(TypeError, match="CacheView"):
        cache_attention(torch.randn(2, 2, 1, 40), torch.randn(2, 2, 20, 40), vv)


def test_materialize_returns_dequantized_tensors():
    a = QuantizedLayer(4, 8, 0, "minmax", 16, False)
    b = QuantizedLayer(4, 8, 0, "minmax", 16, True)
    k, v = _kv(s=30)
    a.update(k, v), b.update(k, v)
    kv, vv = a.update(k[:, :, :2], v[:, :, :2])
    km, vm = b.update(k[:, :, :2], v[:, :, :2])
    assert type(km) is torch.Tensor and torch.equal(km, kv.materialize()) and torch.equal(vm, vv.materialize())


def _held_bytes(obj) -> int:
    """Bytes of every tensor found among the object's attributes (one level of containers)."""
    seen, total = set(), 0
    for value in vars(obj).values():
        items = value if isinstance(value, (list, tuple)) else vars(value).values() if hasattr(value, "state_t") else [value]
        for t in items:
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                total += t.nbytes
    return total


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_nbytes_matches_held_tensors_and_arithmetic(bits):
    b, h, d, g = 1, 3, 64, 64
    layer = QuantizedLayer(bits, g, 0, "minmax", 1024, False)
    k, v = _kv(b=b, h=h, s=2 * g + 5, d=d)
    layer.update(k, v)
    assert layer.nbytes() == _held_bytes(layer)
    # 2 key groups packed + 5 residual keys (fp32); 133 value rows packed
    per_group = d * (g * bits // 8) + d * 2 * 2  # codes + fp16 scale + fp16 low, per head
    keys = 2 * per_group + 5 * d * 4
    values = (2 * g + 5) * ((d * bits // 8) + 2 * 2)
    assert layer.nbytes() == b * h * (keys + values)


def test_compressed_memory_attention_matches_its_formula():
    torch.manual_seed(0)
    sinks, window, f = 2, 8, 16
    layer = MemoryLayer(sinks, window, projection_matrix(f, 40, True, 0), None)
    k, v = _kv(b=1, h=2, s=30)
    layer.update(k[:, :, :25], v[:, :, :25])
    kv, vv = layer.update(k[:, :, 25:], v[:, :, 25:])  # 5 new tokens
    q = torch.randn(1, 4, 5, 40)
    out = cache_attention(q, kv, vv, is_causal=True)
    # the formula: exact over sinks [0, 2) + window [17, 25) + new [25, 30) (causal); features over [2, 17)
    scale = 1 / math.sqrt(40)
    qd, kd, vd = q.double().view(1, 2, 2, 5, 40), k.double()[:, :, None], v.double()[:, :, None]
    s = (qd @ kd.transpose(-1, -2)) * scale  # (1, 2, 2, 5, 30)
    w = projection_matrix(f, 40, True, 0).double()
    pq, _ = positive_features(qd, w, scale, is_query=True)
    pk, _ = positive_features(kd[..., 2:17, :], w, scale, is_query=False)
    far = pq @ pk.transpose(-1, -2)  # ∝ exp(s) over the evicted keys, one common factor per row
    exact = torch.cat([torch.arange(2), torch.arange(17, 30)])
    keep = exact[None, :] <= torch.arange(25, 30)[:, None]
    m = s[..., exact].masked_fill(~keep, -math.inf).amax(-1, keepdim=True)
    e = torch.exp(s[..., exact] - m).masked_fill(~keep, 0)
    # φ(q)·φ(k) = exp(s − shift_q − shift_k): put the far mass on the exact part's reference m
    _, shift_q = positive_features(qd, w, scale, is_query=True)
    _, shift_k = positive_features(kd[..., 2:17, :], w, scale, is_query=False)
    fw = far * torch.exp(shift_q + shift_k - m)
    num = e @ vd[..., exact, :] + fw @ vd[..., 2:17, :]
    ref = (num / (e.sum(-1, keepdim=True) + fw.sum(-1, keepdim=True))).reshape(1, 4, 5, 40).float()
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert layer.evicted == 30 - 2 - 8 and layer.window_keys.shape[-2] == window


def test_compressed_memory_window_only_and_size_constant():
    layer = MemoryLayer(2, 8, None, None)  # features=0: evicted tokens are dropped
    k, v = _kv(b=1, s=40)
    layer.update(k[:, :, :30], v[:, :, :30])
    kv, vv = layer.update(k[:, :, 30:], v[:, :, 30:])
    q = torch.randn(1, 2, 10, 40)
    out = cache_attention(q, kv, vv, is_causal=True)
    idx = torch.cat([torch.arange(2), torch.arange(22, 40)])
    ref = _reference(q, k[:, :, idx], v[:, :, idx], cached=10)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()

    cache = CompressedMemory(sinks=2, window=8, features=16)
    sizes = []
    for step in range(6):
        for layer_idx in range(2):
            cache.update(*_kv(b=1, s=7, seed=step), layer_idx)
        sizes.append(cache.nbytes())
        assert cache.nbytes() == cache.projection.nbytes + sum(_held_bytes(lay.summary) + sum(
            t.nbytes for t in (lay.sink_keys, lay.sink_values, lay.window_keys, lay.window_values)) for lay in cache.layers)
    assert len(set(sizes[2:])) == 1  # full after 10 tokens: constant from then on


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="bits"):
        QuantizedCache(bits=3)
    with pytest.raises(ValueError, match="scale"):
        QuantizedCache(scale="mse")
    with pytest.raises(ValueError, match="residual"):
        QuantizedCache(residual=-1)
    with pytest.raises(ValueError, match="window"):
        CompressedMemory(window=0)


# -- generate() on a tiny Llama -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=256, eos_token_id=None, bos_token_id=None,
    )
    model = LlamaForCausalLM(config).eval()
    return model, torch.randint(0, 96, (2, 21), generator=torch.Generator().manual_seed(0))


def _generate(model, ids, cache, n=24):
    with torch.no_grad():
        return model.generate(ids, cache=cache, max_new_tokens=n, do_sample=False, min_new_tokens=n)[:, ids.shape[1]:]


def test_generate_with_every_cache(tiny_llama):
    model, ids = tiny_llama
    ref = _generate(model, ids, DynamicCache(config=model.config))
    with enable(model):
        out8 = _generate(model, ids, QuantizedCache(bits=8, group_size=8))
        assert torch.equal(out8, ref)  # 8-bit: greedy output identical on this model
        for cache in (QuantizedCache(bits=4, group_size=8), QuantizedCache(bits=2, group_size=8, scale="search"),
                      CompressedMemory(sinks=2, window=8, features=16), QuantizedCache(bits=4, materialize=True)):
            out = _generate(model, ids, cache)
            assert out.shape == ref.shape
            assert cache.get_seq_length() == ids.shape[1] + 23
        # full precision kept (residual covers everything): identical to the DynamicCache
        assert torch.equal(_generate(model, ids, QuantizedCache(bits=2, residual=64)), ref)
    assert model.config._attn_implementation != "attnkit_cache"


def test_forward_with_cache_matches_full_forward_when_nothing_is_quantized(tiny_llama):
    model, ids = tiny_llama
    with torch.no_grad():
        full = model(ids).logits
        with enable(model):
            cache = QuantizedCache(bits=4, residual=64)
            a = model(ids[:, :13], cache=cache, use_cache=True).logits
            b = model(ids[:, 13:], cache=cache, use_cache=True).logits
    assert torch.allclose(torch.cat([a, b], 1), full, atol=1e-4, rtol=1e-4)


def test_patched_model_reads_the_cache(tiny_llama):
    # attnkit.patch's attention function reads cache views too: exact methods decode
    # through them, approximate ones refuse with what to do.
    model, ids = tiny_llama
    ref = _generate(model, ids, DynamicCache(config=model.config), n=8)
    with attnkit.patch(model, "auto"):
        assert torch.equal(_generate(model, ids, QuantizedCache(bits=8, group_size=8), n=8), ref)
    with attnkit.patch(model, "local:window=8"):
        with pytest.raises(ValueError, match="patch this model with an exact method"):
            _generate(model, ids, QuantizedCache(bits=4), n=2)


def test_unpatched_model_fails_clearly(tiny_llama):
    model, ids = tiny_llama
    with pytest.raises(CacheViewError, match="materialize=True"):
        _generate(model, ids, QuantizedCache(bits=4), n=2)
    out = _generate(model, ids, QuantizedCache(bits=8, materialize=True), n=4)  # any model, plain tensors
    assert out.shape == (2, 4)


@pytest.mark.slow
def test_smollm2_quantized_cache_generates():
    from attnkit import data

    model, tok = data.load_smollm2()
    ids = tok("It is a truth universally acknowledged, that", return_tensors="pt").input_ids
    ref = _generate(model, ids, DynamicCache(config=model.config), n=16)
    with enable(model):
        out = _generate(model, ids, QuantizedCache(bits=8), n=16)
    assert torch.equal(out, ref)
