"""Nystrom (Nyströmformer): fast path against its naive formula, the iterative pseudo-inverse,
error against exact attention, padding, refusals, precision, the registry, the module and compile."""

from __future__ import annotations

import math

import pytest
import torch

import attnkit
from attnkit.bench.accuracy import approximation_errors
from attnkit.core.inputs import Shape, prepare_inputs
from attnkit.ops.lowrank import key_keep
from attnkit.ops.nystrom import Nystrom, naive_nystrom, newton_schulz_pinv

from .helpers import REL_TOL, Case, make_inputs, max_err
from .test_lowrank import structured_inputs

TOL = 1e-5  # fast path vs naive formula, fp32, relative to max|naive| (forward and gradients)


def _naive(cfg, q, k, v, mask):
    inp = prepare_inputs(q, k, v, mask)
    qg, kg, vg, _ = inp.grouped()
    out, _ = naive_nystrom(qg, kg, vg, key_keep(inp), cfg.landmarks, cfg.iters, inp.scale)
    return inp.ungroup(out)


CASES = [
    Case(),  # B2-H4-N97-S130-D40
    Case(batch=(2,), hq=4, hkv=2, mask="keypad"),  # GQA, right padding, batch row 0 fully padded
    Case(batch=(2, 3), hq=2, hkv=1, n=33, s=47, mask="keypad-float"),  # two leading dims
    Case(batch=(), hq=2, hkv=2, n=64, s=130, d=59, dv=24),  # no batch dim, Dv != D
    Case(batch=(1,), hq=3, hkv=3, n=130, s=97, mask="keypad"),  # N > S
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("landmarks", [8, 30, 200], ids=lambda m: f"m{m}")
def test_fast_path_matches_naive_formula(landmarks, case):
    cfg = Nystrom(landmarks=landmarks)
    q, k, v, mask = make_inputs(case, requires_grad=True)
    if mask is not None:  # batch row 0 fully padded
        mask = mask.clone()
        mask[0] = False if mask.dtype == torch.bool else -math.inf
    out = attnkit.attention(q, k, v, mask, method=cfg)
    ref = _naive(cfg, q, k, v, mask)
    assert out.shape == ref.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    assert max_err(out, ref) <= TOL * ref.abs().max().item()
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert torch.isfinite(g).all(), name
        assert max_err(g, rg) <= TOL * rg.abs().max().item(), name
    if mask is not None:
        assert (out[0] == 0).all() and (grads[0][0] == 0).all()


def test_mask_varying_across_the_heads_of_a_group():
    case = Case(batch=(2,), hq=4, hkv=2, n=31, s=50)
    q, k, v, _ = make_inputs(case)
    keep = torch.rand(2, 4, 1, 50, generator=torch.Generator().manual_seed(2)) > 0.3  # per query head
    cfg = Nystrom(landmarks=8)
    ref = _naive(cfg, q, k, v, keep)
    assert max_err(attnkit.attention(q, k, v, keep, method=cfg), ref) <= TOL * ref.abs().max().item()


def test_float64_gradcheck():
    case = Case(batch=(2,), hq=2, hkv=1, n=9, s=11, d=4, mask="keypad")
    q, k, v, mask = make_inputs(case, torch.float64, requires_grad=True)
    cfg = Nystrom(landmarks=3, iters=3)
    assert torch.autograd.gradcheck(lambda q, k, v: attnkit.attention(q, k, v, mask, method=cfg), (q, k, v))


# -- the pseudo-inverse and the landmark limit ---------------------------------------------


def test_iterative_pinv_converges_to_the_pseudo_inverse():
    g = torch.Generator().manual_seed(0)
    a = torch.softmax(torch.randn(3, 12, 12, generator=g, dtype=torch.float64), -1)
    assert torch.allclose(newton_schulz_pinv(a, 30), torch.linalg.pinv(a), atol=1e-8)
    rect = torch.softmax(torch.randn(7, 5, generator=g, dtype=torch.float64), -1)  # m != m'
    assert torch.allclose(newton_schulz_pinv(rect, 40), torch.linalg.pinv(rect), atol=1e-8)
    assert (newton_schulz_pinv(torch.zeros(4, 4), 6) == 0).all()  # no keys at all: zeros, not NaN


def test_all_points_as_landmarks_needs_more_than_six_steps():
    # Why m >= min(N, S) is computed in closed form: F A^+ B with A = F = B = P is exact
    # attention only once the iteration has converged, and 6 steps do not get there.
    q, k, v = (t.double() for t in structured_inputs(1, 2, 256, 64))
    p = torch.softmax(q @ k.transpose(-1, -2) / 8, -1)
    ref = p @ v

    def err(iters):
        out = p @ newton_schulz_pinv(p, iters) @ (p @ v)
        return ((out - ref).norm() / ref.norm()).item()

    assert err(6) > 5e-3 and err(20) < 1e-5  # measured 1.7e-2 and 1.7e-7


@pytest.mark.parametrize(
    "landmarks, case",
    [
        (130, Case(batch=(2,), hq=4, hkv=2)),  # m = S
        (97, Case(batch=(2,), hq=4, hkv=2, mask="keypad")),  # m = N < S
        (500, Case(batch=(1,), hq=2, hkv=2, n=40, s=64, mask="keypad-float")),
    ],
    ids=lambda x: x.id if isinstance(x, Case) else f"m{x}",
)
def test_landmarks_covering_queries_or_keys_give_exact_attention(landmarks, case):
    q, k, v, mask = make_inputs(case)
    ref = attnkit.reference_attention(q, k, v, mask)
    out = attnkit.attention(q, k, v, mask, method=Nystrom(landmarks=landmarks))
    assert max_err(out, ref) <= REL_TOL[torch.float32] * ref.abs().max().item()


# -- error against exact attention ------------------------------------------------------


@pytest.mark.parametrize("peak", [1.0, 3.0])
def test_error_falls_as_landmarks_grow(peak):
    q, k, v = structured_inputs(1, 4, 512, 64, peak=peak)
    errs = [approximation_errors(Nystrom(landmarks=m), q, k, v) for m in (16, 64, 256)]
    outs = [e["out_rel_fro"] for e in errs]
    probs = [e["prob_mse"] for e in errs]
    assert outs[0] > outs[1] > outs[2] and probs[0] > probs[1] > probs[2]
    assert outs[2] < (0.04 if peak == 1.0 else 0.06)  # measured 0.024 and 0.037


def test_padded_row_equals_the_unpadded_sequence_and_padding_is_never_read():
    case = Case(batch=(2,), hq=2, hkv=2, n=20, s=90)
    q, k, v, _ = make_inputs(case)
    keep = torch.ones(2, 1, 1, 90, dtype=torch.bool)
    keep[1, ..., 61:] = False
    k, v = k.clone(), v.clone()
    k[1, :, 61:], v[1, :, 61:] = float("nan"), float("inf")  # what a padded slot may hold
    for m in (8, 20):
        out = attnkit.attention(q, k, v, keep, method=Nystrom(landmarks=m))
        alone = attnkit.attention(q[1:], k[1:, :, :61], v[1:, :, :61], method=Nystrom(landmarks=m))
        assert torch.isfinite(out).all()
        assert max_err(out[1:], alone) <= 1e-5


def test_implied_weights_reproduce_the_output():
    case = Case(batch=(2,), hq=4, hkv=2, n=37, s=45, mask="keypad")
    q, k, v, mask = make_inputs(case)
    for m in (6, 40):
        inp = prepare_inputs(q, k, v, mask)
        w = Nystrom(landmarks=m).implied_weights(inp)
        out = attnkit.attention(q, k, v, mask, method=Nystrom(landmarks=m))
        assert w.shape == (2, 4, 37, 45) and w.dtype == torch.float64
        assert (w[..., 30:] == 0).all()  # padding keys get no weight
        assert max_err(out, w @ v.double().repeat_interleave(2, dim=-3)) <= 1e-5


# -- refusals and bad configs ------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [({"landmarks": 0}, "landmarks must be an int >= 1"), ({"landmarks": 1.5}, "landmarks"), ({"iters": 0}, "iters")],
    ids=lambda x: str(x) if isinstance(x, dict) else "",
)
def test_bad_configs_say_what_to_change(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Nystrom(**kwargs)


# -- precision ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("landmarks", [8, 200], ids=lambda m: f"m{m}")
def test_low_precision_with_large_logits_stays_finite(landmarks, dtype):
    case = Case(batch=(2,), hq=4, hkv=2, n=67, s=90, mask="keypad")
    q, k, v, mask = make_inputs(case)
    mask = mask.clone()
    mask[0] = False
    target = 30.0  # the largest |q.k|·scale in the call
    q = q * (target / (q @ k.repeat_interleave(2, -3).transpose(-1, -2) / math.sqrt(40)).abs().max())
    cfg = Nystrom(landmarks=landmarks)
    ref = attnkit.attention(q, k, v, mask, method=cfg)  # the same method in fp32
    assert torch.isfinite(ref).all()
    lq, lk, lv = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out = attnkit.attention(lq, lk, lv, mask, method=cfg)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert max_err(out, ref) <= 0.05 * ref.abs().max().item()
    out.float().pow(2).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (lq, lk, lv))


# -- registry, module, determinism, compile, flops -----------------------------------------


def test_flops_formula():
    shape = Shape(batch=1, hq=8, hkv=8, n=16384, s=16384, d=64, dv=64)
    m = 256
    per_head = 2 * 16384 * m * 128 + m * m * 128 + 6 * 4 * m**3
    assert Nystrom(landmarks=m).flops(shape) == 2.0 * 8 * per_head
    small = Shape(1, 8, 8, 100, 50, 64, 64)
    assert Nystrom(landmarks=m).flops(small) == attnkit.Exact().flops(small)  # m >= S: exact


def test_empty_lengths_give_zeros():
    for n, s in ((4, 0), (0, 5)):
        q = torch.randn(1, 2, n, 8, requires_grad=True)
        k, v = torch.randn(1, 2, s, 8), torch.randn(1, 2, s, 6)
        out = attnkit.attention(q, k, v, method="nystrom:landmarks=4")
        assert out.shape == (1, 2, n, 6) and (out == 0).all()
