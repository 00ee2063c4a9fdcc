"""Performer (FAVOR+): fast path against its naive formula, error against exact attention,
causality, low precision, the redraw schedule and module state."""

from __future__ import annotations


import pytest
import torch

import attnkit
from attnkit.bench.accuracy import approximation_errors
from attnkit.core.inputs import Shape, prepare_inputs
from attnkit.core.registry import run
from attnkit.ops import performer as perf
from attnkit.ops.performer import Performer, naive_performer, projection_matrix

from .helpers import Case, make_inputs, max_err

F_TEST = 48  # features in the tests that check the formula, not the approximation


def _with_padded_row(case: Case, mask):
    """The case's key-padding mask with one batch row padded entirely (a fully masked row)."""
    if case.mask != "keypad" or not case.batch:
        return mask
    mask = mask.clone()
    mask[-1] = False
    return mask


def _naive(m: Performer, q, k, v, mask, causal):
    """The naive formula in float64 with the projection the fast path uses."""
    inp = prepare_inputs(q, k, v, mask, 0.0, causal)
    keep = inp.key_keep()
    keep = None if keep is None else keep.flatten(-4, -3)
    w = projection_matrix(m.features, q.shape[-1], m.orthogonal, m.seed)
    out, _ = naive_performer(q.double(), k.double(), v.double(), w.double(), scale=inp.scale, is_causal=causal, key_keep=keep)
    return out


CASES = [
    Case(),
    Case(batch=(2,), hq=4, hkv=2, mask="keypad"),  # GQA + key padding, batch row 1 fully padded
    Case(batch=(2,), hq=3, hkv=1, mask="keypad", causal=True),
    Case(batch=(2,), hq=2, hkv=2, n=130, s=64, causal=True),  # N > S
    Case(batch=(2,), hq=2, hkv=2, n=64, s=130, d=59, dv=24, causal=True),  # N < S, Dv != D
    Case(batch=(2, 3), hq=2, hkv=1, n=33, s=47, mask="keypad-float"),  # two leading dims
    Case(batch=(), hq=2, hkv=2, n=17, s=17, causal=True),  # no batch dim
]


@pytest.fixture(params=["one-block", "small-blocks"])
def blocks(request, monkeypatch):
    """Run each case with the default block rule and with tiny feature blocks, so that the
    running key shift crosses several blocks on small inputs."""
    if request.param == "small-blocks":
        monkeypatch.setattr(perf, "BLOCK_ELEMENTS", 2048)
    return request.param


# chunk only changes the causal path: several sizes there, including ones that do not
# divide N, and chunks larger than N.
CASE_CHUNKS = [(c, chunk) for c in CASES for chunk in ((None, 16, 7) if c.causal else (None,))]


@pytest.mark.parametrize("case, chunk", CASE_CHUNKS, ids=lambda x: x.id if isinstance(x, Case) else f"C{x}")
def test_fast_path_matches_naive_formula(case, chunk, blocks):
    m = Performer(features=F_TEST, chunk=chunk)
    q, k, v, mask = make_inputs(case, requires_grad=True)
    mask = _with_padded_row(case, mask)
    out = attnkit.attention(q, k, v, mask, is_causal=case.causal, method=m)
    ref = _naive(m, q, k, v, mask, case.causal)
    assert out.shape == ref.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    assert max_err(out, ref) <= 1e-5 * ref.abs().max().item()
    if case.mask == "keypad" and case.batch:
        assert (out[-1] == 0).all()  # the fully padded batch row
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert torch.isfinite(g).all(), name
        assert max_err(g, rg) <= 1e-5 * rg.abs().max().item(), name
    if case.mask == "keypad" and case.batch:
        assert (grads[0][-1] == 0).all()  # no gradient through a row without keys


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_gradcheck_float64(causal, monkeypatch):
    # No custom autograd.Function here, but the in-place feature arithmetic and the
    # running shift must still give exact gradients (and the declared double backward).
    monkeypatch.setattr(perf, "BLOCK_ELEMENTS", 64)
    case = Case(batch=(2,), hq=2, hkv=1, n=7, s=8, d=3, mask="keypad", causal=causal)
    q, k, v, mask = make_inputs(case, torch.float64, requires_grad=True)
    mask = _with_padded_row(case, mask)
    m = Performer(features=5, chunk=3)

    def fn(q, k, v):
        return attnkit.attention(q, k, v, mask, is_causal=causal, method=m)

    assert torch.autograd.gradcheck(fn, (q, k, v))
    assert torch.autograd.gradgradcheck(fn, (q, k, v), fast_mode=True)


def _structured(seed: int, n: int = 512, d: int = 64, h: int = 2, sharp: float = 1.0):
    """Clustered keys and queries near the same clusters: attention that prefers a few
    keys, unlike iid Gaussian inputs (near-uniform attention where anything looks good)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(h, 16, d, generator=g)

    def near_centers():
        idx = torch.randint(0, 16, (h, n, 1), generator=g).expand(h, n, d)
        return (centers.gather(1, idx) + 0.5 * torch.randn(h, n, d, generator=g)) * sharp / 4

    return near_centers()[None], near_centers()[None], torch.randn(1, h, n, d, generator=g)


@pytest.mark.parametrize(
    "sharp, orthogonal", [(1.0, True), (1.0, False), (2.0, True)], ids=["orthogonal", "iid", "peaked-orthogonal"]
)
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_error_against_exact_falls_as_features_grow(causal, sharp, orthogonal):
    feats = (16, 64, 256, 1024)
    errs = torch.zeros(len(feats), 2)
    for seed in range(3):
        q, k, v = _structured(seed, sharp=sharp)  # same seeds as the features: they must not correlate
        for i, f in enumerate(feats):
            e = approximation_errors(Performer(f, orthogonal, seed=seed), q, k, v, is_causal=causal)
            errs[i] += torch.tensor([e["out_rel_fro"], e["prob_mse"]]) / 3
    assert (errs[1:] < errs[:-1]).all(), errs
    if sharp == 1.0:
        # Monte-Carlo rate: 64x the features, about 8x less output error (1/sqrt(F)).
        assert errs[-1, 0] < errs[0, 0] / 5, errs
        assert errs[-1, 0] < (0.06 if orthogonal else 0.1), errs
    else:
        # Larger |q|, |k|: the estimator's variance grows like exp(|q'+k'|^2), so it
        # falls much more slowly (FAVOR+'s known weakness on peaked attention).
        assert errs[-1, 0] < 0.7 * errs[0, 0], errs


def test_seed_is_hashed_not_the_global_stream():
    w = projection_matrix(32, 16, orthogonal=False, seed=0)
    assert not torch.equal(w, torch.randn(32, 16, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(w, projection_matrix(32, 16, orthogonal=False, seed=0))
    assert not torch.equal(w, projection_matrix(32, 16, orthogonal=False, seed=0, draw=1))
    assert not torch.equal(w, projection_matrix(32, 16, orthogonal=False, seed=1))


def test_orthogonal_features_beat_iid_on_average():
    orth, iid = 0.0, 0.0
    for seed in range(6):
        q, k, v = _structured(seed, n=256)
        orth += approximation_errors(Performer(64, True, seed=seed), q, k, v, probabilities=False)["out_rel_fro"]
        iid += approximation_errors(Performer(64, False, seed=seed), q, k, v, probabilities=False)["out_rel_fro"]
    assert orth < iid


def test_no_future_leak():
    case = Case(batch=(2,), hq=4, hkv=2, n=80, s=80, d=24, mask="keypad", causal=True)
    q, k, v, mask = make_inputs(case)
    m = Performer(features=F_TEST, chunk=16)
    out = attnkit.attention(q, k, v, mask, is_causal=True, method=m)
    g = torch.Generator().manual_seed(5)
    # Changed from a chunk boundary on, even with much larger keys: earlier chunks are
    # bitwise unchanged (the running key shift only looks back).
    k2, v2 = k.clone(), v.clone()
    k2[..., 48:, :] = 5 * torch.randn(k2[..., 48:, :].shape, generator=g)
    v2[..., 48:, :] = torch.randn(v2[..., 48:, :].shape, generator=g)
    out2 = attnkit.attention(q, k2, v2, mask, is_causal=True, method=m)
    assert torch.equal(out2[..., :48, :], out[..., :48, :])
    assert not torch.equal(out2[..., 48:, :], out[..., 48:, :])
    # Changed inside a chunk: earlier queries of that chunk share a shift with the new
    # keys, which cancels up to rounding.
    for i in (40, 57):
        k3, v3 = k.clone(), v.clone()
        k3[..., i + 1 :, :] = torch.randn(k3[..., i + 1 :, :].shape, generator=g)
        v3[..., i + 1 :, :] = torch.randn(v3[..., i + 1 :, :].shape, generator=g)
        out3 = attnkit.attention(q, k3, v3, mask, is_causal=True, method=m)
        assert max_err(out3[..., : i + 1, :], out[..., : i + 1, :]) <= 1e-6 * out.abs().max().item()


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_large_norms_stay_finite(dtype, causal):
    case = Case(batch=(2,), hq=4, hkv=2, mask="keypad", causal=causal)
    q, k, v, mask = make_inputs(case, dtype, scale_q=7.5, requires_grad=True)
    mask = _with_padded_row(case, mask)
    inp = prepare_inputs(q, k, v, mask, 0.0, causal)
    logits = (q.float().unflatten(-3, (2, 2)) @ k.float().unsqueeze(-3).transpose(-1, -2)) * inp.scale
    assert 25 <= logits.abs().max() <= 40  # |q·k|·scale up to ~30
    m = Performer(features=F_TEST, chunk=16)
    out = attnkit.attention(q, k, v, mask, is_causal=causal, method=m)
    out32 = attnkit.attention(q.detach().float(), k.detach().float(), v.detach().float(), mask, is_causal=causal, method=m)
    assert torch.isfinite(out32).all()
    assert out.dtype == dtype and torch.isfinite(out).all()
    # Computed in fp32 from the same (rounded) inputs: only the output's rounding differs.
    assert max_err(out, out32) <= 2 * torch.finfo(dtype).eps * out32.abs().max().item()
    out.float().pow(2).sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


def test_deterministic_and_seeded():
    q, k, v, mask = make_inputs(Case(mask="keypad"))
    a = attnkit.attention(q, k, v, mask, method=Performer(features=F_TEST, seed=3))
    b = attnkit.attention(q, k, v, mask, method=Performer(features=F_TEST, seed=3))
    c = attnkit.attention(q, k, v, mask, method=Performer(features=F_TEST, seed=4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    state = torch.get_rng_state()
    attnkit.attention(q, k, v, mask, method=Performer(features=F_TEST))
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is never touched


def test_projection_is_orthogonal_blocks_with_chi_norms():
    w = projection_matrix(100, 16, orthogonal=True, seed=0)
    assert w.shape == (100, 16)
    for b0 in range(0, 100, 16):
        block = w[b0 : b0 + 16]
        d = block / block.norm(dim=-1, keepdim=True)
        gram = d @ d.T
        assert torch.allclose(gram, torch.eye(len(block)), atol=1e-5)
    norms = projection_matrix(4096, 16, orthogonal=True, seed=1).norm(dim=-1)
    assert abs(norms.pow(2).mean().item() - 16) < 0.8  # E|w|^2 = D, as for a Gaussian row
    assert torch.equal(projection_matrix(100, 16, seed=0), w)


def test_implied_weights_reproduce_the_output():
    case = Case(batch=(2,), hq=4, hkv=2, n=37, s=45, mask="keypad", causal=True)
    q, k, v, mask = make_inputs(case)
    m = Performer(features=F_TEST, chunk=8)
    inp = prepare_inputs(q, k, v, mask, 0.0, True)
    p = m.implied_weights(inp)
    assert p.shape == (2, 4, 37, 45)
    assert (p >= 0).all()
    assert (p[..., ~mask[0, 0, 0]] == 0).all()  # padded keys
    assert (p.triu(1) == 0).all()  # the future
    assert torch.allclose(p.sum(-1), torch.ones((), dtype=p.dtype), atol=1e-12)
    out = attnkit.attention(q, k, v, mask, is_causal=True, method=m)
    vg = v.double().repeat_interleave(2, dim=-3)
    assert max_err(out, p @ vg) <= 1e-5 * out.abs().max().item()


# -- module state ----------------------------------------------------------------------


def test_redraw_schedule_is_deterministic():
    m = Performer(features=20, redraw=2, seed=7)
    st, twin = m.make_state(4, 8), m.make_state(4, 8)
    draws = []
    for _ in range(5):
        draws.append(st.projection_for_call().clone())
        twin.projection_for_call()
    assert int(st.step) == 5
    for i, w in enumerate(draws):
        assert torch.equal(w, projection_matrix(20, 8, True, 7, draw=i // 2))
    assert torch.equal(st.projection, twin.projection)
    st.eval()
    assert torch.equal(st.projection_for_call(), draws[-1]) and int(st.step) == 5  # fixed in eval
    never = Performer(features=20, seed=7).make_state(4, 8)
    for _ in range(5):
        assert torch.equal(never.projection_for_call(), draws[0])


def test_module_state_dict_round_trip_and_schedule_continues():
    torch.manual_seed(0)
    spec = "performer:features=32,redraw=2,seed=1"
    mha = attnkit.MultiheadAttention(24, 3, batch_first=True, method=spec)
    x = torch.randn(2, 19, 24)
    for _ in range(3):
        mha(x, x, x, need_weights=False)
    assert {"attn_state.projection", "attn_state.step"} <= set(mha.state_dict())
    other = attnkit.MultiheadAttention(24, 3, batch_first=True, method=spec)
    other.load_state_dict(mha.state_dict())
    assert torch.equal(other.attn_state.projection, mha.attn_state.projection)
    for mod in (mha, other):
        mod(x, x, x, need_weights=False)  # call 3: draw 1
        mod(x, x, x, need_weights=False)  # call 4: draw 2
    assert torch.equal(other.attn_state.projection, projection_matrix(32, 8, True, 1, draw=2))
    assert torch.equal(other.attn_state.projection, mha.attn_state.projection)
    mha.eval(), other.eval()
    assert torch.equal(mha(x, x, x, need_weights=False)[0], other(x, x, x, need_weights=False)[0])


def test_module_forward_backward_with_padding_and_causal():
    torch.manual_seed(0)
    mha = attnkit.MultiheadAttention(24, 3, batch_first=True, method="performer:features=32,chunk=5")
    x = torch.randn(2, 19, 24, requires_grad=True)
    pad = torch.zeros(2, 19, dtype=torch.bool)
    pad[0, 15:] = True
    out, w = mha(x, x, x, key_padding_mask=pad, need_weights=False)
    assert w is None and torch.isfinite(out).all()
    out_c, _ = mha(x, x, x, need_weights=False, is_causal=True, attn_mask=None)
    (out.sum() + out_c.sum()).backward()
    assert torch.isfinite(x.grad).all() and mha.in_proj_weight.grad is not None
    # In eval the module's features are the functional ones (draw 0 of the seed).
    mha.eval()
    q = torch.randn(1, 3, 10, 8)
    st = mha.attn_state
    a, _ = run(q, q, q, method=mha.method, state=st)
    assert torch.equal(a, attnkit.attention(q, q, q, method=mha.method))


def test_state_keeps_fp32_projection_in_low_precision_modules():
    st = Performer(features=16).make_state(2, 8)
    w = st.projection.clone()
    st.to(torch.bfloat16)
    assert st.projection.dtype == torch.float32 and torch.equal(st.projection, w)
    st.double()
    assert st.projection.dtype == torch.float64


def test_state_with_wrong_head_dim_is_refused():
    st = Performer(features=16).make_state(2, 8)
    q = torch.randn(1, 2, 5, 12)
    with pytest.raises(ValueError, match="head_dim=12"):
        run(q, q, q, method=Performer(features=16), state=st)


# -- configuration, registry, capabilities ---------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"features": 0}, "features"),
        ({"features": -3}, "features"),
        ({"features": 2.5}, "features"),
        ({"redraw": -1}, "redraw"),
        ({"chunk": 0}, "chunk"),
        ({"orthogonal": "yes"}, "orthogonal"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_configs_say_what_to_change(kwargs, field):
    with pytest.raises(ValueError, match=rf"Performer\({field}=.*{field} must"):
        Performer(**kwargs)


def test_refusals_name_the_reason():
    q, k, v, mask = make_inputs(Case(mask="bool"))
    with pytest.raises(attnkit.MethodNotSupportedError, match="varies along queries"):
        attnkit.attention(q, k, v, mask, method="performer")
    with pytest.raises(attnkit.MethodNotSupportedError, match="dropout_p"):
        attnkit.attention(q, k, v, dropout_p=0.1, method="performer")
    with pytest.raises(attnkit.MethodNotSupportedError, match="weights"):
        run(q, k, v, method="performer", need_weights=True)
    with pytest.raises(attnkit.MethodNotSupportedError, match="per-key bias"):
        attnkit.attention(q, k, v, torch.randn(1, 1, 1, k.shape[-2]), method="performer")


def test_flops_linear_in_length_and_far_below_exact():
    m = Performer()
    for causal in (False, True):
        f1, f2 = (m.flops(Shape(1, 8, 8, n, n, 64, 64, causal)) for n in (8192, 16384))
        assert f2 / f1 == pytest.approx(2.0, rel=1e-3)
        exact = attnkit.Exact().flops(Shape(1, 8, 8, 16384, 16384, 64, 64, causal))
        assert f2 < exact / 5
    # Bidirectional, one head, spelled out: features of q and k, K'V and the readout.
    n, s, f, d = 100, 70, 256, 64
    expected = 2 * n * f * d + 2 * s * f * d + 2 * s * f * (d + 1) + 2 * n * f * (d + 1)
    assert m.flops(Shape(1, 1, 1, n, s, d, d)) == expected


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("n, s", [(0, 5), (5, 0), (0, 0)])
def test_empty_lengths_give_zeros(n, s, causal):
    q, k = torch.randn(1, 2, n, 4, requires_grad=True), torch.randn(1, 2, s, 4)
    out = attnkit.attention(q, k, k, is_causal=causal, method=Performer(features=8))
    assert out.shape == (1, 2, n, 4) and (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all()


def test_causal_left_padding_rows_before_the_first_key_are_zero():
    case = Case(batch=(2,), hq=2, hkv=2, n=50, s=50, d=16, causal=True)
    q, k, v, _ = make_inputs(case, requires_grad=True)
    mask = torch.ones(2, 1, 1, 50, dtype=torch.bool)
    mask[0, ..., :20] = False  # left padding: queries 0..19 of batch 0 see no key
    m = Performer(features=F_TEST, chunk=8)
    out = attnkit.attention(q, k, v, mask, is_causal=True, method=m)
    ref = _naive(m, q, k, v, mask, True)
    assert max_err(out, ref) <= 1e-5 * ref.abs().max().item()
    assert (out[0, :, :20] == 0).all() and (out[0, :, 20:] != 0).any(dim=-1).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and (q.grad[0, :, :20] == 0).all()


@pytest.mark.parametrize("scale", [-0.2, 0.0, 0.05])
def test_any_scale(scale):
    q, k, v, _ = make_inputs(Case(n=31, s=29, d=16))
    m = Performer(features=F_TEST)
    for causal in (False, True):
        out = attnkit.attention(q, k, v, is_causal=causal, scale=scale, method=m)
        inp = prepare_inputs(q, k, v, None, 0.0, causal, scale)
        _, p = naive_performer(q.double(), k.double(), v.double(), projection_matrix(F_TEST, 16).double(), scale=scale, is_causal=causal)
        assert max_err(out, p @ v.double()) <= 1e-5 * out.abs().max().item()
        if scale == 0.0:  # every key weighs the same
            assert max_err(m.implied_weights(inp), attnkit.reference_attention(q, k, v, is_causal=causal, scale=0.0, return_weights=True)[1]) < 1e-12


def test_negative_scale_is_estimated_too():
    # E[φ(q)·φ(k)] = exp(q·k·scale) for a negative scale as well: more features, closer.
    q, k, v, _ = make_inputs(Case(n=31, s=29, d=16))
    ref = attnkit.reference_attention(q * 0.3, k * 0.3, v, scale=-0.2)
    errs = [max_err(attnkit.attention(q * 0.3, k * 0.3, v, scale=-0.2, method=Performer(features=f)), ref) for f in (8, 4096)]
    assert errs[1] < errs[0] / 4
