"""Exact methods against the float64 reference, generated from the registry's capabilities."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.core.inputs import prepare_inputs
from attnkit.core.registry import resolve

from .helpers import GRAD_REL_TOL, LOWP_FACTOR, LOWP_FLOOR, REL_TOL, Case, make_inputs, max_err, naive_attention

EXACT = sorted(name for name, caps in attnkit.methods().items() if caps.exact)
# Small tiles as well as the default rule, so that multi-tile paths (online softmax
# across key blocks, causal skipping, partial last tiles) are exercised on small inputs.
EXACT_SPECS = EXACT + ["tiled:block_q=16,block_k=32", "tiled:block_q=7,block_k=13"]

CASES = [
    Case(),
    Case(batch=(2,), hq=4, hkv=2, mask="bool"),  # GQA + bool mask with a fully masked row
    Case(batch=(1,), hq=6, hkv=2, n=130, s=97, mask="float"),
    Case(batch=(2,), hq=3, hkv=1, n=97, s=130, mask="keypad", causal=True),
    Case(batch=(2,), hq=2, hkv=2, n=130, s=64, causal=True),  # N > S
    Case(batch=(2,), hq=2, hkv=2, n=64, s=130, d=59, dv=24, causal=True),  # N < S, Dv != D
    Case(batch=(2, 3), hq=2, hkv=1, n=33, s=47, mask="keypad-float"),  # two leading dims
    Case(batch=(), hq=2, hkv=2, n=17, s=17, mask="bool", causal=True),  # no batch dim
]


def _expects_refusal(spec, case, dtype, need_weights=False):
    q, k, v, mask = make_inputs(case, dtype)
    inp = prepare_inputs(q, k, v, mask, 0.0, case.causal)
    return resolve(spec).not_supported_reasons(inp, need_weights=need_weights)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("spec", EXACT_SPECS)
def test_fp32_forward_matches_reference(spec, case):
    q, k, v, mask = make_inputs(case)
    if _expects_refusal(spec, case, q.dtype):
        with pytest.raises(attnkit.MethodNotSupportedError, match="cannot serve"):
            attnkit.attention(q, k, v, mask, is_causal=case.causal, method=spec)
        return
    ref = attnkit.reference_attention(q, k, v, mask, is_causal=case.causal)
    out = attnkit.attention(q, k, v, mask, is_causal=case.causal, method=spec)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    assert max_err(out, ref) <= REL_TOL[torch.float32] * ref.abs().max().item()


@pytest.mark.parametrize("case", CASES[:6], ids=lambda c: c.id)
@pytest.mark.parametrize("spec", EXACT_SPECS)
def test_fp32_gradients_match_reference(spec, case):
    q, k, v, mask = make_inputs(case, requires_grad=True)
    if _expects_refusal(spec, case, q.dtype):
        pytest.skip(f"{spec} refuses {case.id} (refusal itself is tested in the forward test)")
    dout = torch.randn(*case.batch, case.hq, case.n, case.dv or case.d, generator=torch.Generator().manual_seed(1))
    ref = attnkit.reference_attention(q, k, v, mask, is_causal=case.causal)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    out = attnkit.attention(q, k, v, mask, is_causal=case.causal, method=spec)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert torch.isfinite(g).all(), name
        assert max_err(g, rg) <= GRAD_REL_TOL[torch.float32] * rg.abs().max().item(), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4]], ids=lambda c: c.id)
@pytest.mark.parametrize("spec", EXACT_SPECS)
def test_low_precision_within_twice_naive_error(spec, case, dtype):
    # Large-ish logits make low precision matter; rows that are fully masked are
    # compared as zeros (naive math gives NaN there, so it is judged on the others).
    q, k, v, mask = make_inputs(case, dtype, scale_q=3.0)
    if _expects_refusal(spec, case, dtype):
        pytest.skip(f"{spec} refuses {case.id}")
    ref = attnkit.reference_attention(q, k, v, mask, is_causal=case.causal)
    out = attnkit.attention(q, k, v, mask, is_causal=case.causal, method=spec)
    naive = naive_attention(q, k, v, mask, case.causal)
    rows = torch.isfinite(naive).all(dim=-1, keepdim=True)
    assert out.dtype == dtype and torch.isfinite(out).all()
    err = max_err(torch.where(rows, out, 0), torch.where(rows, ref, 0))
    naive_err = max_err(torch.where(rows, naive, 0), torch.where(rows, ref, 0))
    assert err <= LOWP_FACTOR * naive_err + LOWP_FLOOR * ref.abs().max().item()
    assert (out[~rows.expand_as(out)] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("spec", EXACT_SPECS)
def test_fully_masked_rows_give_zero_output_and_zero_gradient(spec, dtype):
    case = Case(batch=(1,), hq=2, hkv=1, n=20, s=24, mask="bool")
    q, k, v, mask = make_inputs(case, dtype, requires_grad=True)
    mask = mask.clone()
    mask[5:9] = False
    out = attnkit.attention(q, k, v, mask, method=spec)
    assert torch.isfinite(out).all()
    assert (out[..., 5:9, :] == 0).all() and (out[..., 3, :] == 0).all()
    out.float().pow(2).sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[..., 5:9, :] == 0).all()
    # A float mask of -inf, and causal + mask, hit the same rows.
    fmask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, float("-inf"))
    out2 = attnkit.attention(q.detach(), k.detach(), v.detach(), fmask, method=spec)
    assert torch.isfinite(out2).all() and (out2[..., 5:9, :] == 0).all()


@pytest.mark.parametrize("spec", EXACT_SPECS)
def test_deterministic_bitwise(spec):
    q, k, v, mask = make_inputs(CASES[1], requires_grad=True)
    outs, grads = [], []
    for _ in range(2):
        out = attnkit.attention(q, k, v, mask, method=spec)
        outs.append(out)
        grads.append(torch.autograd.grad(out.sum(), (q, k, v)))
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("spec", EXACT_SPECS)
def test_nan_poisoned_padding_is_never_read(spec):
    # Inputs are strided views into NaN-filled buffers: any read outside the view's
    # extent, or a stride mix-up, turns the output NaN.
    case = Case(batch=(2,), hq=4, hkv=2, n=41, s=53, d=24, mask="keypad")
    q, k, v, mask = make_inputs(case)

    def poisoned(t):
        buf = torch.full((*t.shape[:-2], t.shape[-2] + 5, t.shape[-1] + 3), float("nan"))
        buf[..., 2 : 2 + t.shape[-2], 1 : 1 + t.shape[-1]] = t
        return buf[..., 2 : 2 + t.shape[-2], 1 : 1 + t.shape[-1]]

    ref = attnkit.reference_attention(q, k, v, mask)
    out = attnkit.attention(poisoned(q), poisoned(k), poisoned(v), mask, method=spec)
    assert max_err(out, ref) <= REL_TOL[torch.float32] * ref.abs().max().item()


@pytest.mark.parametrize("spec", ["math", "tiled", "tiled:block_q=7,block_k=13", "auto"])
def test_returned_weights_match_reference_probabilities(spec):
    from attnkit.core.registry import run

    case = Case(batch=(2,), hq=4, hkv=2, n=37, s=45, mask="bool", causal=True)
    q, k, v, mask = make_inputs(case)
    ref_out, ref_p = attnkit.reference_attention(q, k, v, mask, is_causal=True, return_weights=True)
    out, w = run(q, k, v, mask, is_causal=True, method=spec, need_weights=True)
    assert w.shape == ref_p.shape
    assert max_err(w, ref_p) <= 1e-6
    assert max_err(out, ref_out) <= 1e-5
    _, w_avg = run(q, k, v, mask, is_causal=True, method=spec, need_weights=True, average_weights=True)
    assert max_err(w_avg, ref_p.mean(dim=-3)) <= 1e-6


def test_sdpa_refuses_weights_and_auto_explains_its_choice():
    from attnkit.core.registry import run

    q, k, v, _ = make_inputs(Case())
    with pytest.raises(attnkit.MethodNotSupportedError, match="need_weights.*Methods that can serve"):
        run(q, k, v, method="sdpa", need_weights=True)
    assert "runs sdpa" in attnkit.explain(q, k, v)
    assert "runs tiled" in attnkit.explain(q, k, v, need_weights=True)
    mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool)
    assert "runs tiled" in attnkit.explain(q, k, v, mask, is_causal=True)


def test_causal_tiled_skips_future_tiles():
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v, _ = make_inputs(Case(batch=(1,), hq=2, hkv=2, n=512, s=512, d=32))
    counts = {}
    for causal in (False, True):
        with FlopCounterMode(display=False) as fc:
            attnkit.attention(q, k, v, is_causal=causal, method="tiled:block_q=64,block_k=64")
        counts[causal] = fc.get_total_flops()
    # 8x8 tiles: 36 of 64 are at or below the diagonal.
    assert counts[True] == pytest.approx(counts[False] * 36 / 64)


def test_tiled_float_mask_gets_its_gradient():
    case = Case(batch=(2,), hq=2, hkv=2, n=19, s=23)
    q, k, v, _ = make_inputs(case)
    bias = torch.randn(2, 1, 19, 23, requires_grad=True)
    ref = attnkit.reference_attention(q, k, v, bias)
    (g_ref,) = torch.autograd.grad(ref.sum(), bias)
    for spec in ("tiled:block_q=8,block_k=8", "auto", "math"):
        out = attnkit.attention(q, k, v, bias, method=spec)
        (g,) = torch.autograd.grad(out.sum(), bias)
        assert g.shape == bias.shape
        assert max_err(g, g_ref) <= 1e-5, spec


def test_inf_and_nan_inputs_do_not_crash():
    q, k, v, _ = make_inputs(Case(batch=(1,), n=8, s=8))
    q[0, 0, 0, 0] = float("nan")
    k[0, 1, 2, 3] = float("inf")
    for spec in EXACT_SPECS:
        out = attnkit.attention(q, k, v, method=spec)
        assert out.shape == q.shape
        assert torch.isfinite(out[0, 2:]).all(), spec  # untouched heads stay finite


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "case",
    [Case(batch=(2,), hq=4, hkv=2, n=67, s=90, mask="keypad"), Case(batch=(2,), hq=4, hkv=2, n=67, s=90, causal=True)],
    ids=lambda c: c.id,
)
@pytest.mark.parametrize("spec", EXACT_SPECS)
def test_low_precision_gradients_within_twice_naive_error(spec, case, dtype):
    q, k, v, mask = make_inputs(case, dtype, requires_grad=True, scale_q=3.0)
    if _expects_refusal(spec, case, dtype):
        pytest.skip(f"{spec} refuses {case.id}")
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    ref = attnkit.reference_attention(q, k, v, mask, is_causal=case.causal)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    naive_grads = torch.autograd.grad(naive_attention(q, k, v, mask, case.causal), (q, k, v), dout)
    out = attnkit.attention(q, k, v, mask, is_causal=case.causal, method=spec)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for name, g, ng, rg in zip("qkv", grads, naive_grads, ref_grads):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        bound = LOWP_FACTOR * max_err(ng, rg) + LOWP_FLOOR * rg.abs().max().item()
        assert max_err(g, rg) <= bound, name


@pytest.mark.parametrize("n, s", [(4, 0), (0, 5), (0, 0)], ids=["S0", "N0", "N0-S0"])
@pytest.mark.parametrize("spec", EXACT_SPECS)
def test_empty_lengths(spec, n, s):
    q = torch.randn(1, 2, n, 8, requires_grad=True)
    k = torch.randn(1, 2, s, 8, requires_grad=True)
    v = torch.randn(1, 2, s, 6, requires_grad=True)
    out = attnkit.attention(q, k, v, method=spec)
    assert out.shape == (1, 2, n, 6) and (out == 0).all()  # no keys: like a fully masked row
    out.sum().backward()
    assert (q.grad == 0).all()
