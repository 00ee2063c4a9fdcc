"""attnkit.cache.native: the C kernels against their formulas (every width and row length,
scales and lows, strided operands, skipped leading rows; the quantizer bit for bit against
PyTorch's), the fused decode path against
attention over the cache's dequantized contents (uniform keys, a key plan, value channels
held apart, sinks, padding, a few new tokens), the same answer as the PyTorch path, and
the fallback when the kernel cannot be built."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import attnkit
from attnkit.cache import cache_attention, native, quant
from attnkit.cache.quant import pack
from attnkit.cache.quantized import QuantizedLayer, QuantizedSnapshot

needs_kernel = pytest.mark.skipif(not native.available(), reason=f"C kernel not available: {native.status()}")


def _operands(lead, m, k, c, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (*lead, k, c), generator=g, dtype=torch.uint8)
    a = torch.randn(*lead, m, k, generator=g)
    scale = torch.rand(*lead, k, generator=g).half() + 0.01
    low = torch.randn(*lead, k, generator=g).half()
    return a, codes, pack(codes, bits), scale, low


@needs_kernel
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("c", [64, 128, 256])
@pytest.mark.parametrize("m", [1, 3, 9])  # query rows: below, at and past a register block
def test_dq_matmul_equals_its_formula(bits, c, m):
    a, codes, packed, scale, low = _operands((2, 3), m, 37, c, bits)
    out = native.dq_matmul(a, packed, bits, scale, low, start=5)
    deq = low.double()[..., None] + scale.double()[..., None] * codes.double()  # (2, 3, K, C)
    ref = torch.matmul(a.double()[..., 5:], deq[..., 5:, :])
    assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    plain = native.code_matmul(a, packed, bits)  # no scales: the codes themselves
    ref = torch.matmul(a.double(), codes.double())
    assert (plain.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@needs_kernel
def test_dq_matmul_reads_and_writes_strided_views():
    """Shared query rows (a stride-0 dim) and scores written side by side into a wider tensor:
    how the decode path calls it."""
    b, h, ng, g, m, d = 2, 3, 5, 64, 3, 64
    a, codes, packed, scale, low = _operands((b, h, ng), m, d, g, 2, seed=1)
    q = a[:, :, 0]  # (B, H, M, D): one set of rows per head, for all its groups
    scores = torch.full((b, h, m, 7 + ng * g + 4), float("nan"))
    view = scores[..., 7 : 7 + ng * g].unflatten(-1, (ng, g)).transpose(2, 3)  # (B, H, nG, M, G)
    native.dq_matmul(q[:, :, None], packed, 2, scale, low, out=view)
    deq = low.double()[..., None] + scale.double()[..., None] * codes.double()  # (B, H, nG, D, G)
    ref = torch.matmul(q.double()[:, :, None], deq)  # (B, H, nG, M, G)
    got = scores[..., 7 : 7 + ng * g].unflatten(-1, (ng, g)).transpose(2, 3)
    assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert scores[..., :7].isnan().all() and scores[..., 7 + ng * g :].isnan().all()  # nothing else written
    half = a[..., ::2, :]  # rows with a stride: read in place
    assert torch.allclose(native.dq_matmul(half, packed, 2), native.dq_matmul(half.contiguous(), packed, 2))


@needs_kernel
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("start", [0, 5, 64, 70])  # from token 0, inside group 0, at and inside group 1
def test_dq_rowdot_equals_its_formula(bits, start):
    """The transposed product of the held-apart value channels: codes per channel over groups
    of C tokens, p's column 0 at token ``start``, read from a strided view."""
    g = torch.Generator().manual_seed(3)
    b, h, m, ng, j, c = 2, 3, 3, 4, 2, 64
    codes = torch.randint(0, 1 << bits, (b, h, ng, j, c), generator=g, dtype=torch.uint8)
    scale, low = torch.rand(b, h, ng, j, generator=g).half() + 0.1, torch.randn(b, h, ng, j, generator=g).half()
    t = ng * c - start + 7
    p = torch.randn(b, h, m, t + 9, generator=g)[..., 4 : 4 + t]  # extra columns past the groups: not read
    out = native.dq_rowdot(p, pack(codes, bits), bits, scale, low, start=start)
    deq = (low.double()[..., None] + scale.double()[..., None] * codes.double()).transpose(-1, -2).flatten(2, 3)
    ref = torch.matmul(p.double()[..., : ng * c - start], deq[:, :, start:])  # (B, H, M, J)
    assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@needs_kernel
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("g", [1, 7, 16, 33, 64])
def test_quantize_rows_is_bit_for_bit_torchs(bits, g):
    """The decode step's min-max quantization in C: the same codes, scales and lows as
    quantize() + pack(), over magnitudes from fp16 subnormals to near its overflow,
    constant rows and large offsets."""
    gen = torch.Generator().manual_seed(g * 10 + bits)
    x = torch.randn(6, 40, g, generator=gen) * 10.0 ** torch.arange(-8, 4, 2).view(6, 1, 1)
    x[0, :5] = x[0, :5, :1]  # constant rows
    x[1, 5:10] += 3000.0  # offsets far from 0
    x[2, 10:15] = torch.randn(5, g, generator=gen).half().float()  # values fp16 holds exactly
    x[3, 15:20] *= 60000.0 / x[3, 15:20].abs().amax().clamp_min(1e-30)  # near fp16's largest
    got = quant.quantize_packed(x, bits)
    codes, scale, low = quant.quantize(x, bits)
    for a, b in zip(got, (pack(codes, bits), scale, low)):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@needs_kernel
def test_unsupported_rows_are_refused_and_left_to_torch():
    a, codes, packed, _, _ = _operands((2,), 3, 8, 48, 4)  # rows of 48 codes: no kernel for them
    assert not quant.fused(a, packed, 4)
    with pytest.raises(ValueError, match="rows of 48 codes"):
        native.dq_matmul(a, packed, 4)
    ref = torch.matmul(a.double(), codes.double())
    assert (quant.code_matmul(a, packed, 4).double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def _layer(keys, apart, sinks):
    h, d = 2, 64
    plan = torch.tensor([0, 2, 4, 8])[torch.randint(0, 4, (h, d), generator=torch.Generator().manual_seed(0))]
    channels = torch.tensor([[1, 40], [63, 0]]) if apart else None
    return QuantizedLayer(2, 64, 0, "minmax", 128, False, sinks, key_bits=plan if keys == "plan" else None,
                          value_channels=channels)


def _kv(s, seed, b=2, h=2, d=64):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, h, s, d, generator=g) + 3 * torch.randn(1, h, 1, d, generator=g)
    v = torch.randn(b, h, s, d, generator=g)
    v[:, 0, :, 1] += 12.0  # an outlier value channel
    return k, v


@needs_kernel
@pytest.mark.parametrize("keys", ["uniform", "plan"])
@pytest.mark.parametrize("apart", [False, True])
@pytest.mark.parametrize("sinks", [0, 3, 69])  # none, inside group 0, past it
@pytest.mark.parametrize("n", [1, 3])  # a decode step, or a few new tokens (causal among them)
def test_fused_decode_equals_attention_over_dequantized(keys, apart, sinks, n, monkeypatch):
    layer = _layer(keys, apart, sinks)
    k, v = _kv(300, 0)
    layer.update(k[:, :, :200], v[:, :, :200])
    for t in range(200, 300, 50):  # prefill, then chunks: groups, residual keys and value rows all present
        layer.update(k[:, :, t : t + 50], v[:, :, t : t + 50])
    kn, vn = _kv(n, 1)
    kv, vv = layer.update(kn, vn)
    q = torch.randn(2, 6, n, 64, generator=torch.Generator().manual_seed(2))  # GQA 6 / 2
    keep = torch.ones(2, 1, 1, 300 + n, dtype=torch.bool)
    keep[1, ..., :2] = False  # a padded sink (or first token)
    keep[0, ..., 150] = False  # a padded packed token
    calls = []
    fused = QuantizedSnapshot._fused
    monkeypatch.setattr(QuantizedSnapshot, "_fused", lambda *a: calls.append(fused(*a)) or calls[-1])
    out = cache_attention(q, kv, vv, is_causal=True, attn_mask=keep)
    assert calls == [True], "the decode rows did not take the C kernel"
    kd, vd = kv.materialize(), vv.materialize()
    ref = attnkit.attention(q.double(), kd.double(), vd.double(), method="math",
                            attn_mask=keep & torch.ones(n, 300 + n, dtype=torch.bool).tril(300)).float()
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    monkeypatch.setattr("attnkit.cache.native._LIB", None)  # as if the kernel had not built: the PyTorch path
    calls.clear()
    torch_out = cache_attention(q, kv, vv, is_causal=True, attn_mask=keep)
    assert calls == [False] and (torch_out - out).abs().max() <= 1e-5 * ref.abs().max()


def test_disabled_kernel_falls_back_and_says_why(monkeypatch):
    monkeypatch.setenv("ATTNKIT_KERNELS", "0")
    monkeypatch.setattr("attnkit.cache.native._STATUS", None)
    monkeypatch.setattr("attnkit.cache.native._LIB", None)
    assert not native.available() and "ATTNKIT_KERNELS=0" in native.status()
    a, codes, packed, _, _ = _operands((2,), 3, 8, 64, 2)
    assert not quant.fused(a, packed, 2)
    ref = torch.matmul(a.double(), codes.double())
    assert (quant.code_matmul(a, packed, 2).double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_missing_compiler_falls_back_and_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.delenv("ATTNKIT_KERNELS", raising=False)
    monkeypatch.setattr("attnkit.cache.native._STATUS", None)
    monkeypatch.setattr("attnkit.cache.native._LIB", None)
    assert not native.available() and "did not build" in native.status()
