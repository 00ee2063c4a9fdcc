"""Local (sliding window + global tokens + sinks): exact within its pattern, against its
naive formula and the float64 reference with the dense mask; gradients, causal, masks,
low precision, registry, module and torch.compile."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkit
from attnkit.bench.accuracy import approximation_errors
from attnkit.core.inputs import Shape, prepare_inputs
from attnkit.ops.local import Local, LocalPattern, local_band_stats, local_mask, naive_local

from .helpers import GRAD_REL_TOL, REL_TOL, Case, make_inputs, max_err


def structured_inputs(n=512, d=64, heads=2, scale=1.0, seed=0):
    """q, k, v (1, H, N, D) from a smooth random walk of states plus recurring "topics":
    nearby tokens look alike and far ones sometimes do, so both local and long-range
    attention carry weight (iid Gaussian q, k give near-uniform attention)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).cumsum(0) / torch.arange(1, n + 1)[:, None].sqrt()
    x = x + 2 * torch.randn(8, d, generator=g)[torch.randint(0, 8, (n,), generator=g)]
    wq, wk, wv = (torch.randn(heads, d, d, generator=g) / math.sqrt(d) for _ in range(3))
    return (x @ wq * scale)[None], (x @ wk)[None], (x @ wv)[None]


def dense_mask(mask, keep):
    if mask is None:
        return keep
    return mask & keep if mask.dtype == torch.bool else torch.where(keep, mask, float("-inf"))


# (case, window, global tokens, sinks, block): awkward sizes, N != S, GQA, key padding
# with a fully padded batch row, full masks, leading batch dims, several blocks.
CASES = [
    (Case(batch=(2,), hq=4, hkv=2, n=97, s=130, mask="keypad"), 16, 0, 0, 7),
    (Case(batch=(2,), hq=4, hkv=2, n=97, s=130, mask="keypad", causal=True), 16, 2, 3, 7),
    (Case(batch=(2,), hq=2, hkv=2, n=130, s=97, mask="bool"), 9, 3, 0, 16),
    (Case(batch=(1,), hq=6, hkv=2, n=97, s=97, mask="float", causal=True), 20, 0, 4, 8),
    (Case(batch=(2, 3), hq=2, hkv=1, n=33, s=47, mask="keypad-float"), 5, 1, 1, None),
    (Case(batch=(), hq=2, hkv=2, n=70, s=70, causal=True), 64, 0, 0, 16),
    (Case(batch=(2,), hq=2, hkv=2, n=130, s=64, d=24, dv=16, causal=True), 8, 0, 0, 16),  # rows past S+W see nothing
]
IDS = [f"{c.id}-W{w}-G{g}-s{s}" for c, w, g, s, _ in CASES]


def _padded(mask):
    if mask is not None and mask.shape[-2] == 1:  # key padding: pad one batch row fully
        mask = mask.clone()
        mask[0] = False if mask.dtype == torch.bool else float("-inf")
    return mask


@pytest.mark.parametrize("case,window,g,sinks,block", CASES, ids=IDS)
def test_forward_and_gradients_match_naive(case, window, g, sinks, block):
    q, k, v, mask = make_inputs(case, requires_grad=True)
    mask = _padded(mask)
    method = Local(window=window, global_tokens=g, sinks=sinks, block=block)
    out = attnkit.attention(q, k, v, mask, is_causal=case.causal, method=method)
    ref = naive_local(q, k, v, mask, case.causal, window=window, global_tokens=g, sinks=sinks)
    assert torch.isfinite(out).all()
    assert max_err(out, ref) <= REL_TOL[torch.float32] * ref.abs().max().item()
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    for name, gr, rg in zip("qkv", grads, ref_grads):
        assert torch.isfinite(gr).all(), name
        assert max_err(gr, rg) <= GRAD_REL_TOL[torch.float32] * rg.abs().max().item(), name


@pytest.mark.parametrize(
    "window,g,sinks,causal,mask_kind",
    list(itertools.product([1, 6, 31], [0, 5], [0, 3], [False, True], [None, "keypad", "bool"])),
)
def test_equals_reference_with_dense_mask(window, g, sinks, causal, mask_kind):
    case = Case(batch=(2,), hq=4, hkv=2, n=53, s=61, d=24, mask=mask_kind, causal=causal)
    q, k, v, mask = make_inputs(case)
    mask = _padded(mask)
    out = attnkit.attention(q, k, v, mask, is_causal=causal, method=Local(window, g, sinks, block=8))
    keep = local_mask(case.n, case.s, window, g, sinks, causal)
    ref = attnkit.reference_attention(q, k, v, dense_mask(mask, keep), is_causal=causal)
    assert max_err(out, ref) <= REL_TOL[torch.float32] * ref.abs().max().item()


def test_pattern_definition():
    # Bidirectional W=3 with one sink: 3 keys centred on each query, sliding in at the ends.
    expected = torch.tensor([
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 0, 1, 1, 1, 0],
        [1, 0, 0, 1, 1, 1],
        [1, 0, 0, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(local_mask(6, 6, 3, sinks=1), expected)
    # Causal: the previous W keys; a global token row sees everything before it.
    causal = local_mask(6, 6, 2, global_tokens=1, is_causal=True)
    assert torch.equal(causal, torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 0, 1, 1, 0, 0],
        [1, 0, 0, 1, 1, 0],
        [1, 0, 0, 0, 1, 1],
    ], dtype=torch.bool))
    assert local_mask(40, 50, 7).sum(-1).eq(7).all()  # every query sees exactly W keys
    assert local_mask(5, 5, 3, global_tokens=2)[:2].all()  # global rows see all keys


@pytest.mark.parametrize("causal", [False, True])
def test_window_at_least_the_sequence_is_exact(causal):
    case = Case(batch=(2,), hq=4, hkv=2, n=97, s=130 if not causal else 97, mask="keypad")
    q, k, v, mask = make_inputs(case)
    ref = attnkit.reference_attention(q, k, v, mask, is_causal=causal)
    for window in (max(case.n, case.s), 1000):
        out = attnkit.attention(q, k, v, mask, is_causal=causal, method=Local(window=window))
        assert max_err(out, ref) <= REL_TOL[torch.float32] * ref.abs().max().item()


@pytest.mark.parametrize("scale", [1.0, 3.0], ids=["plain", "peaked"])
@pytest.mark.parametrize("causal", [False, True])
def test_error_falls_as_window_grows(causal, scale):
    q, k, v = structured_inputs(scale=scale)
    errs = [approximation_errors(Local(window=w), q, k, v, is_causal=causal) for w in (16, 64, 256)]
    out_err = [e["out_rel_fro"] for e in errs]
    prob_err = [e["prob_mse"] for e in errs]
    assert out_err[0] > out_err[1] > out_err[2] > 0
    assert prob_err[0] > prob_err[1] > prob_err[2]
    exact = approximation_errors(Local(window=512), q, k, v, is_causal=causal)
    assert exact["out_rel_fro"] < 1e-6 and exact["prob_max_abs"] < 1e-6


def test_no_future_leak():
    case = Case(batch=(2,), hq=4, hkv=2, n=80, s=80, mask="keypad", causal=True)
    q, k, v, mask = make_inputs(case)
    method = Local(window=10, global_tokens=3, sinks=2, block=8)
    out = attnkit.attention(q, k, v, mask, is_causal=True, method=method)
    for i in (0, 2, 37, 63):
        k2, v2 = k.clone(), v.clone()
        k2[..., i + 1 :, :] = torch.randn_like(k2[..., i + 1 :, :]) * 10
        v2[..., i + 1 :, :] = torch.randn_like(v2[..., i + 1 :, :]) * 10
        out2 = attnkit.attention(q, k2, v2, mask, is_causal=True, method=method)
        assert torch.equal(out[..., : i + 1, :], out2[..., : i + 1, :]), i


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision_large_logits_stay_finite(dtype, causal):
    case = Case(batch=(2,), hq=4, hkv=2, n=97, s=97, d=64, mask="keypad", causal=causal)
    q, k, v, mask = make_inputs(case, dtype)
    mask = _padded(mask)
    # |q·k|·scale up to ~30: unit-norm rows scaled so the largest logit is 30.
    q = (torch.nn.functional.normalize(q.float(), dim=-1) * 30 * math.sqrt(64)).to(dtype)
    k = torch.nn.functional.normalize(k.float(), dim=-1).to(dtype)
    method = Local(window=24, global_tokens=2, sinks=2, block=16)
    ref = naive_local(q.float(), k.float(), v.float(), mask, causal, window=24, global_tokens=2, sinks=2)
    out = attnkit.attention(q, k, v, mask, is_causal=causal, method=method)
    assert out.dtype == dtype and torch.isfinite(ref).all() and torch.isfinite(out).all()
    assert max_err(out, ref) <= 2e-2 * ref.abs().max().item()
    assert (out[0] == 0).all()  # the fully padded batch row


def test_fully_masked_rows_zero_output_and_gradient():
    case = Case(batch=(1,), hq=2, hkv=1, n=40, s=40, mask="bool")
    q, k, v, mask = make_inputs(case, requires_grad=True)
    mask = mask.clone()
    mask[5:9] = False
    out = attnkit.attention(q, k, v, mask, method=Local(window=6, block=4))
    assert (out[..., 5:9, :] == 0).all() and (out[..., 3, :] == 0).all()
    out.pow(2).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert (q.grad[..., 5:9, :] == 0).all()


def test_band_stats_reconstruct_softmax_sums():
    case = Case(batch=(2,), hq=4, hkv=2, n=45, s=50, d=16, mask="keypad", causal=True)
    q, k, v, mask = make_inputs(case, torch.float64)
    mask = _padded(mask)
    inp = prepare_inputs(q, k, v, mask, 0.0, True)
    gq, gk, gv, gm = inp.grouped()
    pattern = LocalPattern(case.n, case.s, 7, 2, 1, True)
    st = local_band_stats(gq, gk, gv, gm, pattern, inp.scale, block=4)
    keep = dense_mask(mask, local_mask(case.n, case.s, 7, 2, 1, True)).unsqueeze(-3)  # (B, 1, 1, N, S)
    scores = (gq @ gk.transpose(-1, -2) * inp.scale).masked_fill(~keep, float("-inf"))  # (B, Hkv, G, N, S)
    total = torch.exp(scores).sum(-1)
    assert torch.allclose(st.l * torch.exp(st.m), total, rtol=1e-10, atol=0)
    assert torch.allclose(st.acc * torch.exp(st.m)[..., None], torch.exp(scores) @ gv, rtol=1e-9, atol=1e-12)
    out = inp.ungroup(st.acc / torch.where(st.l == 0, 1.0, st.l)[..., None])
    ref = naive_local(q, k, v, mask, True, window=7, global_tokens=2, sinks=1)
    assert max_err(out, ref) <= 1e-12 and (st.l[0] == 0).all() and (st.m[0] == 0).all()


def test_band_stats_gradcheck_float64():
    # Gradients reach the statistics through both the output and the log-sum-exp.
    case = Case(batch=(1,), hq=2, hkv=1, n=7, s=8, d=2, mask="keypad", causal=True)
    q, k, v, mask = make_inputs(case, torch.float64, requires_grad=True)
    mask = mask.clone()
    mask[..., :3] = False  # rows 0-2 see no key: l = 0 there
    pattern = LocalPattern(7, 8, 3, 0, 1, True)

    def fn(q, k, v):
        st = local_band_stats(q.unflatten(-3, (1, 2)), k.unsqueeze(-3), v.unsqueeze(-3), mask.unsqueeze(-3), pattern,
                              0.7, block=2)
        return st.l * torch.exp(st.m), st.acc * torch.exp(st.m)[..., None]

    assert torch.autograd.gradcheck(fn, (q, k, v))
    assert torch.autograd.gradgradcheck(fn, (q, k, v))


def test_gradcheck_and_gradgradcheck_float64():
    case = Case(batch=(1,), hq=2, hkv=1, n=7, s=8, d=2, mask="keypad", causal=True)
    q, k, v, mask = make_inputs(case, torch.float64, requires_grad=True)

    def fn(q, k, v):
        return attnkit.attention(q, k, v, mask, is_causal=True, method=Local(window=3, sinks=1, block=2))

    assert torch.autograd.gradcheck(fn, (q, k, v))
    assert torch.autograd.gradgradcheck(fn, (q, k, v))


def test_float_mask_gradient():
    case = Case(batch=(2,), hq=2, hkv=2, n=19, s=23, d=8)
    q, k, v, _ = make_inputs(case)
    bias = torch.randn(2, 1, 19, 23, requires_grad=True)
    method = Local(window=5, global_tokens=1, block=4)
    (g,) = torch.autograd.grad(attnkit.attention(q, k, v, bias, method=method).sum(), bias)
    (g_ref,) = torch.autograd.grad(naive_local(q, k, v, bias, window=5, global_tokens=1).sum(), bias)
    assert max_err(g, g_ref) <= 1e-5


def test_flops_count_what_runs_and_stay_linear():
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v, _ = make_inputs(Case(batch=(1,), hq=2, hkv=2, n=300, s=300, d=32))
    method = Local(window=40, sinks=4, global_tokens=2, block=16)
    with FlopCounterMode(display=False) as fc:
        attnkit.attention(q, k, v, method=method)
    assert fc.get_total_flops() == method.flops(Shape(1, 2, 2, 300, 300, 32, 32))
    big = Local(window=512)
    f1, f2 = (big.flops(Shape(1, 8, 8, n, n, 64, 64)) for n in (8192, 16384))
    assert f2 / f1 == pytest.approx(2.0, rel=0.02)
    assert f2 < Local(window=1 << 20).flops(Shape(1, 8, 8, 16384, 16384, 64, 64)) / 20


def test_deterministic_bitwise():
    q, k, v, mask = make_inputs(CASES[1][0], requires_grad=True)
    runs = []
    for _ in range(2):
        out = attnkit.attention(q, k, v, mask, is_causal=True, method="local:window=16,sinks=3,block=7")
        runs.append((out, *torch.autograd.grad(out.sum(), (q, k, v))))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"window": 0}, "window must be an int >= 1"),
        ({"window": 2.5}, "window must be an int"),
        ({"window": 4, "sinks": -1}, "sinks must be an int >= 0"),
        ({"window": 4, "global_tokens": -2}, "global_tokens must be an int >= 0"),
        ({"window": 4, "block": 0}, "block must be an int >= 1"),
    ],
)
def test_bad_configs_fail_early(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Local(**kwargs)


def test_multihead_attention_forward_backward():
    torch.manual_seed(0)
    mha = attnkit.MultiheadAttention(32, 4, batch_first=True, method="local:window=6,sinks=1")
    x = torch.randn(2, 25, 32, requires_grad=True)
    pad = torch.zeros(2, 25, dtype=torch.bool)
    pad[1, 20:] = True
    out, w = mha(x, x, x, key_padding_mask=pad, need_weights=False)
    assert w is None and out.shape == (2, 25, 32) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and mha.in_proj_weight.grad is not None
    mha.method = "local:window=100"  # >= the sequence: the exact module
    exact = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    exact.load_state_dict(mha.state_dict())
    ref, _ = exact(x, x, x, key_padding_mask=pad, need_weights=False)
    out2, _ = mha(x, x, x, key_padding_mask=pad, need_weights=False)
    assert max_err(out2, ref) < 1e-5


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40), s=st.integers(1, 40), window=st.integers(1, 45), g=st.integers(0, 6),
    sinks=st.integers(0, 6), causal=st.booleans(), block=st.integers(1, 9),
    mask_kind=st.sampled_from([None, "keypad", "bool", "float"]),
)
def test_random_patterns_equal_the_dense_mask_reference(n, s, window, g, sinks, causal, block, mask_kind):
    q, k, v, _ = make_inputs(Case(batch=(2,), hq=2, hkv=1, n=n, s=s, d=8), torch.float64)
    gen = torch.Generator().manual_seed(n * 1000 + s)
    mask = None
    if mask_kind == "keypad":
        mask = torch.arange(s) < torch.randint(0, s + 1, (2, 1, 1, 1), generator=gen)  # (2, 1, 1, S)
    elif mask_kind is not None:
        mask = torch.rand(n, s, generator=gen) > 0.3
        if mask_kind == "float":
            mask = torch.where(mask, torch.randn(n, s, generator=gen, dtype=torch.float64), float("-inf"))
    method = Local(window=window, global_tokens=g, sinks=sinks, block=block)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = attnkit.attention(q, k, v, mask, is_causal=causal, method=method)
    ref = attnkit.reference_attention(q, k, v, dense_mask(mask, local_mask(n, s, window, g, sinks, causal)), is_causal=causal)
    assert max_err(out, ref) <= 1e-10 * max(1.0, ref.abs().max().item())
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    for gr, rg in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)):
        assert max_err(gr, rg) <= 1e-10 * max(1.0, rg.abs().max().item())
    q, k, v = (t.detach() for t in (q, k, v))
    stats = local_band_stats(*prepare_inputs(q, k, v, mask, 0.0, causal).grouped(), method.pattern(n, s, causal),
                             q.shape[-1] ** -0.5, block)
    band = stats.acc / torch.where(stats.l == 0, 1.0, stats.l)[..., None]
    assert max_err(band.flatten(-4, -3), ref) <= 1e-10 * max(1.0, ref.abs().max().item())
