"""The tiled kernel's own backward: gradcheck, double backward, dropout replay, block rule."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkit
from attnkit.core.inputs import prepare_inputs
from attnkit.ops.tiled import choose_blocks, dropout_keep_tile

from .helpers import REL_TOL, Case, make_inputs, max_err

GRADCHECK_CASES = [
    Case(batch=(1,), hq=2, hkv=2, n=5, s=7, d=3),
    Case(batch=(1,), hq=2, hkv=1, n=6, s=5, d=3, mask="bool", causal=True),
    Case(batch=(2,), hq=2, hkv=2, n=5, s=6, d=3, dv=2, mask="float"),
    Case(batch=(1,), hq=4, hkv=2, n=7, s=7, d=2, mask="keypad", causal=True),
]


def _f64(case, mask_grad=False):
    q, k, v, mask = make_inputs(case, torch.float64, requires_grad=True)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.clamp_min(-1e4)  # finite: gradcheck perturbs it
        mask.requires_grad_(mask_grad)
    return q, k, v, mask


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("spec", ["tiled:block_q=2,block_k=3", "tiled", "auto"])
def test_gradcheck_float64(spec, case):
    q, k, v, mask = _f64(case, mask_grad=case.mask == "float")
    inputs = (q, k, v) + ((mask,) if mask is not None and mask.requires_grad else ())

    def fn(q, k, v, *m):
        return attnkit.attention(q, k, v, m[0] if m else mask, is_causal=case.causal, method=spec)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("case", GRADCHECK_CASES[:2], ids=lambda c: c.id)
@pytest.mark.parametrize("spec", ["tiled:block_q=2,block_k=3", "auto"])
def test_gradgradcheck_float64(spec, case):
    q, k, v, mask = _f64(case)

    def fn(q, k, v):
        return attnkit.attention(q, k, v, mask, is_causal=case.causal, method=spec)

    assert torch.autograd.gradgradcheck(fn, (q, k, v))


def test_gradcheck_with_dropout_replayed_from_seed():
    case = GRADCHECK_CASES[1]
    q, k, v, mask = _f64(case)

    def fn(q, k, v):
        torch.manual_seed(123)  # each call draws its dropout seed from the global RNG
        return attnkit.attention(q, k, v, mask, dropout_p=0.3, is_causal=True, method="tiled:block_q=2,block_k=3")

    assert torch.autograd.gradcheck(fn, (q, k, v))


def _replayed_keep(spec, case, p, seed):
    """The dense keep-mask tiled drew for one call, rebuilt tile by tile."""
    q, k, v, mask = make_inputs(case)
    inp = prepare_inputs(q, k, v, mask, p, case.causal)
    torch.manual_seed(seed)
    prm = attnkit.ops.exact.Tiled(**spec).params(inp)
    gq, _, _, _ = inp.grouped()
    keep = torch.ones(*gq.shape[:-1], case.s, dtype=torch.bool)
    for bi, i0 in enumerate(range(0, case.n, prm.block_q)):
        i1 = min(i0 + prm.block_q, case.n)
        for bj, j0 in enumerate(range(0, case.s, prm.block_k)):
            j1 = min(j0 + prm.block_k, case.s)
            shape = (*gq.shape[:-2], i1 - i0, j1 - j0)
            keep[..., i0:i1, j0:j1] = dropout_keep_tile(prm.seed, bi, bj, torch.Size(shape), p, q.device)
    return inp.ungroup(keep)


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_equals_math_with_the_same_keep_mask(causal):
    case = Case(batch=(2,), hq=4, hkv=2, n=37, s=41, mask="bool", causal=causal)
    spec = {"block_q": 8, "block_k": 16}
    keep = _replayed_keep(spec, case, 0.25, seed=7)
    q, k, v, mask = make_inputs(case)
    torch.manual_seed(7)
    out = attnkit.attention(q, k, v, mask, dropout_p=0.25, is_causal=causal, method=attnkit.Tiled(**spec))
    ref = attnkit.reference_attention(q, k, v, mask, 0.25, causal, dropout_keep=keep)
    assert max_err(out, ref) <= REL_TOL[torch.float32] * ref.abs().max().item()


def test_dropout_is_seeded_by_the_global_rng_and_unbiased():
    q, k, v, _ = make_inputs(Case(batch=(1,), hq=2, hkv=2, n=64, s=256, d=8))
    v = torch.ones_like(v)  # each output row is then the sum of its dropped-out weights
    torch.manual_seed(0)
    a = attnkit.attention(q, k, v, dropout_p=0.5, method="tiled")
    torch.manual_seed(0)
    b = attnkit.attention(q, k, v, dropout_p=0.5, method="tiled")
    c = attnkit.attention(q, k, v, dropout_p=0.5, method="tiled")
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.mean().item() == pytest.approx(1.0, abs=0.05)


def test_block_rule_keeps_tiles_bounded():
    for lead, n, s in [(8, 16384, 16384), (1, 97, 130), (96, 4096, 4096), (1, 1, 5)]:
        bq, bk = choose_blocks(lead, n, s, None, None)
        assert 1 <= bq <= n and 1 <= bk <= s
        assert lead * bq * bk <= max(1 << 20, lead * 16 * bk)
    assert choose_blocks(8, 100, 100, 7, 9) == (7, 9)
    with pytest.raises(ValueError, match="block_q must be an int >= 1"):
        attnkit.Tiled(block_q=0)


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 2),
    hkv=st.integers(1, 2),
    groups=st.integers(1, 3),
    n=st.integers(1, 40),
    s=st.integers(1, 40),
    d=st.integers(1, 9),
    bq=st.integers(1, 16),
    bk=st.integers(1, 16),
    causal=st.booleans(),
    mask=st.sampled_from([None, "bool", "float"]),
)
def test_tiled_matches_reference_on_random_shapes(b, hkv, groups, n, s, d, bq, bk, causal, mask):
    g = torch.Generator().manual_seed(n * 1000 + s)
    q = torch.randn(b, hkv * groups, n, d, generator=g)
    k = torch.randn(b, hkv, s, d, generator=g)
    v = torch.randn(b, hkv, s, d + 1, generator=g)
    m = None
    if mask is not None:
        keep = torch.rand(n, s, generator=g) > 0.4
        m = keep if mask == "bool" else torch.where(keep, 0.0, -math.inf)
    ref = attnkit.reference_attention(q, k, v, m, is_causal=causal)
    out = attnkit.attention(q, k, v, m, is_causal=causal, method=attnkit.Tiled(block_q=bq, block_k=bk))
    assert max_err(out, ref) <= 1e-5 * max(1.0, ref.abs().max().item())
