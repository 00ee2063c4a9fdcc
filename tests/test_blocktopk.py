"""BlockTopK (Quest-style query-aware block selection): fast path against its naive
formula, the selection itself, exactness when everything fits, a planted needle,
error against exact attention, causal, low precision, registry, module, compile."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkit
from attnkit.bench.accuracy import approximation_errors
from attnkit.core.inputs import Shape, prepare_inputs
from attnkit.core.reference import causal_keep
from attnkit.ops.blocktopk import BlockLayout, BlockTopK, naive_blocktopk, select_blocks, selection_mask
from attnkit.ops.local import Local

from .helpers import GRAD_REL_TOL, REL_TOL, Case, make_inputs, max_err
from .test_local import structured_inputs


def _padded(mask):
    if mask is not None:  # key padding: also pad one batch row fully
        mask = mask.clone()
        mask[0] = False if mask.dtype == torch.bool else float("-inf")
    return mask


def _naive(q, k, v, mask, causal, m: BlockTopK):
    return naive_blocktopk(q, k, v, mask, causal, window=m.window, block=m.block, topk=m.topk, sinks=m.sinks, score=m.score)


CASES = [
    (Case(batch=(2,), hq=4, hkv=2, n=97, s=130, mask="keypad"), BlockTopK(window=16, block=8, topk=3)),
    (Case(batch=(2,), hq=4, hkv=2, n=97, s=130, mask="keypad", causal=True), BlockTopK(window=9, block=8, topk=2, sinks=3)),
    (Case(batch=(1,), hq=6, hkv=2, n=130, s=97, causal=True), BlockTopK(window=20, block=16, topk=2, score="max")),
    (Case(batch=(2, 3), hq=2, hkv=1, n=33, s=47, mask="keypad-float"), BlockTopK(window=5, block=4, topk=2, sinks=1)),
    (Case(batch=(), hq=2, hkv=2, n=70, s=70, d=24, dv=16), BlockTopK(window=1, block=5, topk=4, score="max")),
    (Case(batch=(1,), hq=2, hkv=1, n=30, s=30, d=8, causal=True), BlockTopK(window=1, block=2, topk=2, sinks=7)),  # future sinks
]
IDS = [f"{c.id}-{m.spec()}" for c, m in CASES]


@pytest.mark.parametrize("case,method", CASES, ids=IDS)
def test_forward_and_gradients_match_naive(case, method):
    q, k, v, mask = make_inputs(case, requires_grad=True, scale_q=2.0)
    mask = _padded(mask)
    out = attnkit.attention(q, k, v, mask, is_causal=case.causal, method=method)
    ref = _naive(q, k, v, mask, case.causal, method)
    assert torch.isfinite(out).all()
    assert max_err(out, ref) <= REL_TOL[torch.float32] * ref.abs().max().item()
    if mask is not None:
        assert (out[0] == 0).all()  # fully padded batch row
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert torch.isfinite(g).all(), name
        assert max_err(g, rg) <= GRAD_REL_TOL[torch.float32] * rg.abs().max().item(), name


def _selection(case, method, scale_q=2.0):
    q, k, _, mask = make_inputs(case, scale_q=scale_q)
    inp = prepare_inputs(q, k, k, _padded(mask), 0.0, case.causal)
    gq, gk, _, _ = inp.grouped()
    layout = method.layout(case.n, case.s, case.causal)
    return layout, select_blocks(gq * inp.scale, gk, inp.key_keep(), layout, method.topk, method.score)


@pytest.mark.parametrize("case,method", CASES[:3], ids=IDS[:3])
def test_selection_keeps_window_and_sinks_and_never_the_future(case, method):
    layout, sel = _selection(case, method)
    dense = selection_mask(layout, sel)  # (*b, Hkv, G, N, S)
    window = Local(window=method.window).pattern(case.n, case.s, case.causal)
    local = window.keep(torch.arange(case.n), torch.arange(case.s))
    assert (dense | ~local).all(), "every key of the Local window is kept"
    sinks = min(method.sinks, case.s)
    visible = causal_keep(0, case.n, 0, sinks, dense.device) if case.causal else torch.ones((), dtype=torch.bool)
    assert (dense[..., :sinks] | ~visible).all(), "every sink is kept"
    # Used slots are distinct blocks; causal ones lie wholly before their query block's end.
    used = torch.where(sel.extra_ok, sel.extra, -1 - torch.arange(sel.extra.shape[-1]))
    assert (used.sort(dim=-1).values.diff(dim=-1) != 0).all()
    if case.causal:
        last = (torch.arange(layout.nqb) * layout.bk + layout.bk).clamp(max=case.n) - 1
        assert ((sel.extra * layout.bk <= last[:, None]) | ~sel.extra_ok).all()
        assert not torch.triu(dense, diagonal=1).any()


@pytest.mark.parametrize(
    "case",
    [
        Case(batch=(2,), hq=4, hkv=2, n=97, s=130, mask="keypad"),
        Case(batch=(2,), hq=4, hkv=2, n=97, s=130, mask="keypad", causal=True),
        Case(batch=(1,), hq=2, hkv=2, n=130, s=97, causal=True),  # N > S: the window slides in
        Case(batch=(1,), hq=2, hkv=1, n=64, s=64, d=16),
    ],
    ids=lambda c: c.id,
)
@pytest.mark.parametrize("window,block,topk", [(2, 16, 8), (34, 16, 6), (1, 7, 19), (130, 64, 0)])
def test_everything_kept_is_exact(case, window, block, topk):
    assert topk * block + window >= case.s
    q, k, v, mask = make_inputs(case, scale_q=2.0)
    ref = attnkit.reference_attention(q, k, v, mask, is_causal=case.causal)
    out = attnkit.attention(q, k, v, mask, is_causal=case.causal, method=BlockTopK(window, block, topk))
    assert max_err(out, ref) <= REL_TOL[torch.float32] * ref.abs().max().item()


def test_planted_needle_is_found_where_a_window_misses_it():
    g = torch.Generator().manual_seed(0)
    n, d, bk = 256, 32, 16
    q = torch.randn(1, 2, n, d, generator=g) * 0.3
    k = torch.randn(1, 2, n, d, generator=g) * 0.3
    v = torch.randn(1, 2, n, d, generator=g)
    u = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0) * 7.5  # logit ~10
    rows, needle = slice(192, 208), slice(16, 32)  # query block 12, key block 1: far outside W=32
    q[..., rows, :] += u
    k[..., needle, :] += u
    v[..., needle, :] += 3.0
    method = BlockTopK(window=32, block=bk, topk=1)
    layout = BlockLayout(n, n, bk, 32, 0, False)
    gq = q.unsqueeze(-3)
    sel = select_blocks(gq * d**-0.5, k.unsqueeze(-3), None, layout, 1, "mean")
    assert (sel.extra[..., 12, 0] == 1).all() and sel.extra_ok[..., 12, 0].all()
    ref = attnkit.reference_attention(q, k, v)[..., rows, :]
    err_btk = max_err(attnkit.attention(q, k, v, method=method)[..., rows, :], ref)
    err_local = max_err(attnkit.attention(q, k, v, method=Local(window=32))[..., rows, :], ref)
    assert err_local > 1.0 and err_btk < 1e-2 * err_local


@pytest.mark.parametrize("score", ["mean", "max"])
@pytest.mark.parametrize("scale", [1.0, 3.0], ids=["plain", "peaked"])
@pytest.mark.parametrize("causal", [False, True])
def test_error_falls_as_topk_grows_and_beats_the_window_alone(causal, scale, score):
    q, k, v = structured_inputs(scale=scale)
    errs = [approximation_errors(BlockTopK(window=64, block=16, topk=t, score=score), q, k, v, is_causal=causal)
            for t in (0, 2, 8)]
    out_err = [e["out_rel_fro"] for e in errs]
    prob_err = [e["prob_mse"] for e in errs]
    assert out_err[0] > out_err[1] > out_err[2] > 0
    assert prob_err[0] > prob_err[1] > prob_err[2]
    local = approximation_errors(Local(window=64), q, k, v, is_causal=causal)
    assert out_err[2] < 0.6 * local["out_rel_fro"]


def test_no_future_leak():
    case = Case(batch=(2,), hq=4, hkv=2, n=80, s=80, mask="keypad", causal=True)
    q, k, v, mask = make_inputs(case, scale_q=2.0)
    for method in (BlockTopK(window=10, block=8, topk=3, sinks=2), BlockTopK(window=3, block=4, topk=3, sinks=9)):
        out = attnkit.attention(q, k, v, mask, is_causal=True, method=method)
        for i in (0, 5, 37, 63):
            k2, v2 = k.clone(), v.clone()
            k2[..., i + 1 :, :] = torch.randn_like(k2[..., i + 1 :, :]) * 10
            v2[..., i + 1 :, :] = torch.randn_like(v2[..., i + 1 :, :]) * 10
            out2 = attnkit.attention(q, k2, v2, mask, is_causal=True, method=method)
            assert torch.equal(out[..., : i + 1, :], out2[..., : i + 1, :]), (method, i)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision_large_logits_stay_finite(dtype, causal):
    case = Case(batch=(2,), hq=4, hkv=2, n=97, s=97, d=64, mask="keypad", causal=causal)
    q, k, v, mask = make_inputs(case, dtype)
    mask = _padded(mask)
    q = (torch.nn.functional.normalize(q.float(), dim=-1) * 30 * math.sqrt(64)).to(dtype)  # logits up to 30
    k = torch.nn.functional.normalize(k.float(), dim=-1).to(dtype)
    method = BlockTopK(window=16, block=16, topk=2, sinks=1)
    out = attnkit.attention(q, k, v, mask, is_causal=causal, method=method)
    ref = _naive(q, k, v, mask, causal, method).float()  # selects exactly as forward (fp32 from the same inputs)
    assert out.dtype == dtype and torch.isfinite(ref).all() and torch.isfinite(out).all()
    assert max_err(out, ref) <= 2e-2 * ref.abs().max().item()
    assert (out[0] == 0).all()


def test_implied_weights_are_the_naive_probabilities():
    case = Case(batch=(2,), hq=4, hkv=2, n=37, s=45, d=16, mask="keypad", causal=True)
    q, k, v, mask = make_inputs(case, scale_q=2.0)
    method = BlockTopK(window=6, block=4, topk=2, sinks=1)
    inp = prepare_inputs(q, k, v, mask, 0.0, True)
    w = method.implied_weights(inp)
    _, w_naive = naive_blocktopk(q, k, v, mask, True, window=6, block=4, topk=2, sinks=1, need_weights=True)
    assert w.dtype == torch.float64 and w.shape == (2, 4, 37, 45)
    assert max_err(w, w_naive) <= 1e-6
    assert torch.allclose(w.sum(-1), torch.ones(()).double())
    out = torch.einsum("bhns,bhsd->bhnd", w, v.repeat_interleave(2, dim=1).double())
    assert max_err(attnkit.attention(q, k, v, mask, is_causal=True, method=method), out) <= 1e-5


def test_gradcheck_and_gradgradcheck_float64():
    case = Case(batch=(1,), hq=2, hkv=1, n=9, s=10, d=2, mask="keypad", causal=True)
    q, k, v, mask = make_inputs(case, torch.float64, requires_grad=True)

    def fn(q, k, v):
        return attnkit.attention(q, k, v, mask, is_causal=True, method=BlockTopK(window=2, block=3, topk=1, sinks=1))

    assert torch.autograd.gradcheck(fn, (q, k, v))
    assert torch.autograd.gradgradcheck(fn, (q, k, v))


def test_flops_split_attention_and_selection():
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v, _ = make_inputs(Case(batch=(1,), hq=2, hkv=2, n=256, s=256, d=32))
    method = BlockTopK(window=40, block=16, topk=3, sinks=4)
    shape = Shape(1, 2, 2, 256, 256, 32, 32)
    with FlopCounterMode(display=False) as fc:
        attnkit.attention(q, k, v, method=method)
    assert fc.get_total_flops() == method.flops(shape)
    big = BlockTopK(window=512, block=64, topk=8)
    s16 = Shape(1, 8, 8, 16384, 16384, 64, 64)
    attention = big.flops(s16) - big.selection_flops(s16)
    assert attention == 2 * 8 * 128 * 16384 * (9 + 8) * 64  # 9 window blocks + 8 chosen
    assert big.selection_flops(s16) == 2 * 8 * 256 * 256 * 128
    assert big.flops(s16) < Shape(1, 8, 8, 16384, 16384, 64, 64).visible_pairs() * 2 * 8 * 128 / 14


def test_deterministic_bitwise():
    case, method = CASES[1]
    q, k, v, mask = make_inputs(case, requires_grad=True)
    runs = []
    for _ in range(2):
        out = attnkit.attention(q, k, v, mask, is_causal=True, method=method)
        runs.append((out, *torch.autograd.grad(out.sum(), (q, k, v))))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"window": 0}, "window must be an int >= 1"),
        ({"block": 0}, "block must be an int >= 1"),
        ({"topk": -1}, "topk must be an int >= 0"),
        ({"sinks": -1}, "sinks must be an int >= 0"),
        ({"topk": 2.0}, "topk must be an int"),
        ({"score": "median"}, r"score must be one of \['mean', 'max'\]"),
    ],
)
def test_bad_configs_fail_early(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockTopK(**kwargs)


def test_full_masks_and_dropout_are_refused_with_reasons():
    q, k, v, mask = make_inputs(Case(batch=(1,), n=20, s=20, d=8, mask="bool"))
    with pytest.raises(attnkit.MethodNotSupportedError, match="varies along queries"):
        attnkit.attention(q, k, v, mask, method="blocktopk:window=4,block=4,topk=1")
    with pytest.raises(attnkit.MethodNotSupportedError, match="dropout"):
        attnkit.attention(q, k, v, dropout_p=0.1, method="blocktopk")
    bias = torch.zeros(1, 1, 1, 20)
    bias[..., 3] = 0.5
    with pytest.raises(attnkit.MethodNotSupportedError, match="per-key bias"):
        attnkit.attention(q, k, v, bias, method="blocktopk")


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40), s=st.integers(1, 40), window=st.integers(1, 45), block=st.integers(1, 9),
    topk=st.integers(0, 5), sinks=st.integers(0, 12), causal=st.booleans(), keypad=st.booleans(),
    score=st.sampled_from(["mean", "max"]),
)
def test_random_configs_match_naive(n, s, window, block, topk, sinks, causal, keypad, score):
    q, k, v, _ = make_inputs(Case(batch=(2,), hq=2, hkv=1, n=n, s=s, d=8), torch.float64, scale_q=2.0)
    gen = torch.Generator().manual_seed(n * 1000 + s)
    mask = torch.arange(s) < torch.randint(0, s + 1, (2, 1, 1, 1), generator=gen) if keypad else None
    method = BlockTopK(window=window, block=block, topk=topk, sinks=sinks, score=score)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = attnkit.attention(q, k, v, mask, is_causal=causal, method=method)
    ref = _naive(q, k, v, mask, causal, method)
    assert max_err(out, ref) <= 1e-10 * max(1.0, ref.abs().max().item())
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    for gr, rg in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)):
        assert max_err(gr, rg) <= 1e-10 * max(1.0, rg.abs().max().item())
    q, k, v = (t.detach() for t in (q, k, v))
    if topk * block + window >= s:
        exact = attnkit.reference_attention(q, k, v, mask, is_causal=causal)
        assert max_err(out, exact) <= 1e-10 * max(1.0, exact.abs().max().item())
