"""attnkit.MultiheadAttention against torch.nn.MultiheadAttention, sharing one state_dict.

The main test is a grid generated from the module's options (layout, projections,
appended keys, both mask arguments in every kind, weights, causal hint, train/eval);
it is a fixed sample of the full product whose coverage of every pair of option values
is itself checked.  Masks are drawn so that every query keeps at least one key (torch
gives NaN otherwise); fully masked rows have their own tests.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, fields

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import attnkit
from attnkit import MethodNotSupportedError, MultiheadAttention

from .helpers import REL_TOL

# Mixing a bool and a float mask is deprecated in torch (it warns) but still supported;
# the grid covers it on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask and attn_mask")

E, H, B, L, S = 24, 3, 2, 7, 9  # awkward on purpose: Dh = 8, L != S
KDIM, VDIM = 16, 20
ATOL = REL_TOL[torch.float32]  # used as an absolute bound: outputs and weights here are O(1)


# -- the grid ----------------------------------------------------------------------

OPTIONS = {
    "batch_first": (False, True),
    "batched": (True, False),
    "inputs": ("cross", "self", "kvdim"),  # self: query is key is value; kvdim: kdim/vdim != E
    "bias": (True, False),
    "bias_kv": (False, True),
    "zero_attn": (False, True),
    "kpm": (None, "bool", "float"),
    "mask": (None, "bool2d", "float2d", "bool3d", "float3d"),
    "weights": (None, "avg", "heads"),
    "causal": (False, True),
    "mode": ("eval", "train"),  # eval runs with dropout=0.3 (must be ignored), train with 0.0
}


@dataclass(frozen=True)
class Case:
    batch_first: bool
    batched: bool
    inputs: str
    bias: bool
    bias_kv: bool
    zero_attn: bool
    kpm: str | None
    mask: str | None
    weights: str | None
    causal: bool
    mode: str

    @property
    def id(self) -> str:
        parts = [
            "bfirst" if self.batch_first else "sfirst",
            "batched" if self.batched else "unbatched",
            self.inputs,
            "bias" if self.bias else "nobias",
        ]
        parts += ["biaskv"] * self.bias_kv + ["zeroattn"] * self.zero_attn
        parts += [f"kpm:{self.kpm}", f"mask:{self.mask}", f"w:{self.weights}"]
        parts += ["causal"] * self.causal + [self.mode]
        return "-".join(parts)


def _valid(c: Case) -> bool:
    # torch raises for is_causal without attn_mask ("Need attn_mask if specifying the
    # is_causal hint"); ours accepts it: test_is_causal_without_mask covers that.
    if c.causal and c.mask is None:
        return False
    # With appended keys, torch's need_weights=False path lets the causal hint replace
    # the mask and so hides the appended keys from most queries, unlike its
    # need_weights=True path; we always trust the mask there:
    # test_causal_hint_with_appended_keys_trusts_the_mask covers that.
    if c.causal and (c.bias_kv or c.zero_attn) and c.kpm is None and c.weights is None:
        return False
    return True


ALL_CASES = [c for c in itertools.starmap(Case, itertools.product(*OPTIONS.values())) if _valid(c)]
GRID = random.Random(0).sample(ALL_CASES, 300)


def _pairs(cases):
    names = [f.name for f in fields(Case)]
    return {
        (a, getattr(c, a), b, getattr(c, b)) for c in cases for a, b in itertools.combinations(names, 2)
    }


def test_grid_covers_every_valid_pair_of_options():
    missing = _pairs(ALL_CASES) - _pairs(GRID)
    assert not missing, f"the sampled grid misses option pairs: {sorted(missing, key=str)[:10]}"


def _pair_of_modules(seed=0, **kwargs):
    """torch's module and ours with one shared state_dict (biases made non-zero)."""
    torch.manual_seed(seed)
    ref = nn.MultiheadAttention(E, H, **kwargs)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = MultiheadAttention(E, H, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _causal_blocked(n: int, s: int) -> torch.Tensor:
    """torch MHA convention, True = not allowed: key j is blocked for query i when j > i."""
    return torch.ones(n, s, dtype=torch.bool).triu(1)


def _as_float(blocked: torch.Tensor) -> torch.Tensor:
    return torch.zeros(blocked.shape).masked_fill(blocked, float("-inf"))


def _make_inputs(c: Case, gen: torch.Generator):
    n, s = (L, L) if c.inputs == "self" else (L, S)
    kdim, vdim = (KDIM, VDIM) if c.inputs == "kvdim" else (E, E)

    def seq(length, dim):
        shape = (B, length, dim) if c.batch_first else (length, B, dim)
        return torch.randn(shape if c.batched else (length, dim), generator=gen)

    query = seq(n, E)
    if c.inputs == "self":
        key = value = query
    else:
        key, value = seq(s, kdim), seq(s, vdim)

    kpm = None
    if c.kpm == "bool":
        kpm = torch.rand(B, s, generator=gen) < 0.3
        kpm[:, 0] = False  # key 0 stays visible: no fully masked row (torch would give NaN)
    elif c.kpm == "float":
        kpm = torch.randn(B, s, generator=gen)
    if kpm is not None and not c.batched:
        kpm = kpm[0]

    attn_mask = None
    if c.mask is not None:
        heads = B * H if c.batched else H
        shape = (n, s) if c.mask.endswith("2d") else (heads, n, s)
        if c.causal:  # the hint must be true: torch may replace the mask by it
            blocked = _causal_blocked(n, s).expand(shape).contiguous()
            attn_mask = blocked if c.mask.startswith("bool") else _as_float(blocked)
        elif c.mask.startswith("bool"):
            attn_mask = torch.rand(shape, generator=gen) < 0.3
            attn_mask[..., 0] = False
        else:
            attn_mask = torch.randn(shape, generator=gen)
    return query, key, value, kpm, attn_mask


@pytest.mark.parametrize("c", GRID, ids=lambda c: c.id)
def test_matches_torch(c: Case):
    kwargs = dict(
        bias=c.bias, add_bias_kv=c.bias_kv, add_zero_attn=c.zero_attn, batch_first=c.batch_first,
        dropout=0.3 if c.mode == "eval" else 0.0,
    )
    if c.inputs == "kvdim":
        kwargs.update(kdim=KDIM, vdim=VDIM)
    ref, ours = _pair_of_modules(**kwargs)
    ref.train(c.mode == "train")
    ours.train(c.mode == "train")
    query, key, value, kpm, attn_mask = _make_inputs(c, torch.Generator().manual_seed(1))
    call = dict(
        key_padding_mask=kpm, attn_mask=attn_mask, need_weights=c.weights is not None,
        average_attn_weights=c.weights == "avg", is_causal=c.causal,
    )
    out_ref, w_ref = ref(query, key, value, **call)
    out, w = ours(query, key, value, **call)

    assert torch.isfinite(out_ref).all()  # the masks above leave every query a key
    assert out.shape == out_ref.shape and out.stride() == out_ref.stride()
    torch.testing.assert_close(out, out_ref, atol=ATOL, rtol=0)
    if c.weights is None:
        assert w is None and w_ref is None
    else:
        assert w.shape == w_ref.shape
        torch.testing.assert_close(w, w_ref, atol=ATOL, rtol=0)


# -- behaviour outside torch's domain ---------------------------------------------


@pytest.mark.parametrize("need_weights", [False, True], ids=["noweights", "weights"])
@pytest.mark.parametrize("kpm", [False, True], ids=["nokpm", "kpm"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["sfirst", "bfirst"])
def test_is_causal_without_mask(need_weights, kpm, batch_first):
    """torch raises; ours means the top-left causal mask, as torch with that mask passed."""
    ref, ours = _pair_of_modules(batch_first=batch_first)
    x = torch.randn((B, L, E) if batch_first else (L, B, E))
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[1, -2:] = True
    call = dict(key_padding_mask=pad if kpm else None, need_weights=need_weights)
    out_ref, w_ref = ref(x, x, x, attn_mask=_causal_blocked(L, L), is_causal=True, **call)
    out, w = ours(x, x, x, is_causal=True, **call)
    torch.testing.assert_close(out, out_ref, atol=ATOL, rtol=0)
    if need_weights:
        torch.testing.assert_close(w, w_ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("extra", ["bias_kv", "zero_attn"])
def test_causal_hint_with_appended_keys_trusts_the_mask(extra):
    """With appended keys the causal mask (padded to let every query see them) is used
    whatever need_weights is -- torch's need_weights=True result; its need_weights=False
    path swaps in is_causal over S+1 keys, which hides the appended key."""
    ref, ours = _pair_of_modules(add_bias_kv=extra == "bias_kv", add_zero_attn=extra == "zero_attn")
    x = torch.randn(L, B, E)
    mask = _causal_blocked(L, L)
    out_ref, _ = ref(x, x, x, attn_mask=mask, need_weights=True, is_causal=True)
    for need_weights in (False, True):
        out, _ = ours(x, x, x, attn_mask=mask, need_weights=need_weights, is_causal=True)
        torch.testing.assert_close(out, out_ref, atol=ATOL, rtol=0)
    with pytest.raises(RuntimeError, match="Pass the causal attn_mask"):
        ours(x, x, x, is_causal=True)


@pytest.mark.parametrize("method", ["auto", "math", "tiled"])
@pytest.mark.parametrize("need_weights", [False, True], ids=["noweights", "weights"])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows_give_zeros(method, need_weights, kind):
    ref, ours = _pair_of_modules()
    ours.method = method
    query, key = torch.randn(L, B, E), torch.randn(S, B, E)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1] = True  # every key of batch element 1 is padding
    blocked = torch.zeros(L, S, dtype=torch.bool)
    blocked[3] = True  # query 3 may attend nothing
    if kind == "float":
        kpm, blocked = _as_float(kpm), _as_float(blocked)
    query.requires_grad_(True)
    out, w = ours(query, key, key, key_padding_mask=kpm, attn_mask=blocked, need_weights=need_weights)
    out_ref, w_ref = ref(query, key, key, key_padding_mask=kpm, attn_mask=blocked, need_weights=need_weights)

    assert torch.isfinite(out).all()
    empty = torch.zeros(L, B, dtype=torch.bool)
    empty[:, 1] = True
    empty[3, :] = True
    # Zero attention: what is left of those rows is the output projection's bias.
    torch.testing.assert_close(out[empty], ours.out_proj.bias.detach().expand(int(empty.sum()), E))
    # torch gives NaN on the empty rows with need_weights=True (its SDPA path gives zeros
    # for them with need_weights=False): compare wherever torch is finite.
    finite = torch.isfinite(out_ref).all(dim=-1)
    assert finite[~empty].all()
    torch.testing.assert_close(out[finite], out_ref[finite], atol=ATOL, rtol=0)
    if need_weights:
        assert torch.isfinite(w).all() and (w.transpose(0, 1)[empty] == 0).all()
        torch.testing.assert_close(w.transpose(0, 1)[~empty], w_ref.transpose(0, 1)[~empty], atol=ATOL, rtol=0)
    out.sum().backward()
    assert torch.isfinite(query.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters())


# -- gradients, methods, state_dict -------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"kdim": KDIM, "vdim": VDIM}, {"add_bias_kv": True, "add_zero_attn": True}, {"bias": False}],
    ids=["plain", "kvdim", "biaskv-zeroattn", "nobias"],
)
@pytest.mark.parametrize("masks", [False, True], ids=["nomask", "masks"])
@pytest.mark.parametrize("need_weights", [False, True], ids=["noweights", "weights"])
def test_gradients_match_torch(kwargs, masks, need_weights):
    ref, ours = _pair_of_modules(**kwargs)
    gen = torch.Generator().manual_seed(2)
    kdim, vdim = kwargs.get("kdim", E), kwargs.get("vdim", E)
    inputs = [torch.randn(L, B, E, generator=gen), torch.randn(S, B, kdim, generator=gen),
              torch.randn(S, B, vdim, generator=gen)]
    call = dict(need_weights=need_weights)
    if masks:
        kpm = torch.zeros(B, S, dtype=torch.bool)
        kpm[0, -3:] = True
        call.update(key_padding_mask=kpm, attn_mask=torch.randn(L, S, generator=gen))
    grad_out = torch.randn(L, B, E, generator=gen)

    def grads(module):
        xs = [x.clone().requires_grad_(True) for x in inputs]
        module.zero_grad()
        out, _ = module(*xs, **call)
        (out * grad_out).sum().backward()
        return [x.grad for x in xs] + [p.grad for p in module.parameters()]

    for g, g_ref in zip(grads(ours), grads(ref), strict=True):
        torch.testing.assert_close(g, g_ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "method", ["math", "tiled", attnkit.Tiled(block_q=3, block_k=4), "tiled:block_q=2,block_k=5", "sdpa"],
    ids=["math", "tiled", "Tiled(3,4)", "tiled-spec", "sdpa"],
)
@pytest.mark.parametrize("need_weights", [False, True], ids=["noweights", "weights"])
def test_methods(method, need_weights):
    ref, _ = _pair_of_modules(batch_first=True)
    ours = MultiheadAttention(E, H, batch_first=True, method=method)
    ours.load_state_dict(ref.state_dict())
    query, key = torch.randn(B, L, E), torch.randn(B, S, E)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1, 4:] = True
    call = dict(key_padding_mask=kpm, attn_mask=torch.randn(L, S), need_weights=need_weights)
    if method == "sdpa" and need_weights:
        with pytest.raises(MethodNotSupportedError, match="weights"):
            ours(query, key, key, **call)
        return
    out_ref, w_ref = ref(query, key, key, **call)
    out, w = ours(query, key, key, **call)
    torch.testing.assert_close(out, out_ref, atol=ATOL, rtol=0)
    if need_weights:
        torch.testing.assert_close(w, w_ref, atol=ATOL, rtol=0)
    else:
        assert w is None


def test_math_weights_are_differentiable():
    _, ours = _pair_of_modules()
    ours.method = "math"
    x = torch.randn(L, B, E)
    _, w = ours(x, x, x)
    assert w.requires_grad
    w.pow(2).sum().backward()
    assert ours.in_proj_weight.grad.abs().sum() > 0


def test_bad_method_raises():
    with pytest.raises(ValueError, match="unknown attention method 'nope'.*known methods"):
        MultiheadAttention(E, H, method="nope")
    with pytest.raises(TypeError, match="method"):
        MultiheadAttention(E, H, method=3)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"kdim": KDIM, "vdim": VDIM}, {"add_bias_kv": True}, {"bias": False}],
    ids=["plain", "kvdim", "biaskv", "nobias"],
)
def test_state_dict_round_trips_and_init(kwargs):
    torch.manual_seed(3)
    ref = nn.MultiheadAttention(E, H, **kwargs)
    torch.manual_seed(3)
    ours = MultiheadAttention(E, H, **kwargs)
    sd_ref, sd_ours = ref.state_dict(), ours.state_dict()
    assert list(sd_ours) == list(sd_ref)
    for name in sd_ref:  # same initialisation from the same seed
        torch.testing.assert_close(sd_ours[name], sd_ref[name], atol=0, rtol=0)
    assert type(ours.out_proj) is type(ref.out_proj)

    x, kv = torch.randn(L, B, E), torch.randn(S, B, kwargs.get("kdim", E))
    v = torch.randn(S, B, kwargs.get("vdim", E))
    theirs = nn.MultiheadAttention(E, H, **kwargs)
    mine = MultiheadAttention(E, H, **kwargs)
    theirs.load_state_dict(sd_ours)  # ours -> torch
    mine.load_state_dict(theirs.state_dict())  # torch -> ours
    torch.testing.assert_close(mine(x, kv, v)[0], theirs(x, kv, v)[0], atol=ATOL, rtol=0)


# -- the remaining forward contract --------------------------------------------------


def test_dropout_only_in_training():
    _, ours = _pair_of_modules(dropout=0.5)
    x = torch.randn(L, B, E)
    ours.eval()
    out_eval, _ = ours(x, x, x, need_weights=False)
    ours.train()
    torch.manual_seed(4)
    out_a, w_a = ours(x, x, x)
    torch.manual_seed(4)
    out_b, w_b = ours(x, x, x)
    assert not torch.allclose(out_a, out_eval, atol=1e-3)
    assert torch.equal(out_a, out_b) and torch.equal(w_a, w_b)
    assert (w_a == 0).any()  # weights are returned after dropout, as torch does


@pytest.mark.parametrize("need_weights", [False, True], ids=["noweights", "weights"])
def test_matches_torch_fast_path(need_weights):
    """Eval, no grad, batch_first self-attention with even heads: torch takes its native kernel."""
    torch.manual_seed(5)
    ref = nn.MultiheadAttention(E, 4, batch_first=True).eval()
    ours = MultiheadAttention(E, 4, batch_first=True).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(B, L, E)
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[0, 5:] = True
    with torch.no_grad():
        out_ref, w_ref = ref(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
        out, w = ours(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
    torch.testing.assert_close(out, out_ref, atol=ATOL, rtol=0)
    if need_weights:
        torch.testing.assert_close(w, w_ref, atol=ATOL, rtol=0)


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize(
    "call",
    [{"kpm": "bool"}, {"kpm": "float"}, {"is_causal": True}, {"kpm": "bool", "is_causal": True}, {"train": True}],
    ids=["kpm-bool", "kpm-float", "causal", "kpm-causal", "dropout"],
)
def test_no_weights_builds_no_full_score_matrix(call):
    n = 600  # larger than one tile of the tiled kernel
    mha = MultiheadAttention(E, H, dropout=0.1, batch_first=True).train(call.get("train", False))
    x = torch.randn(B, n, E)
    kpm = None
    if "kpm" in call:
        kpm = torch.zeros(B, n, dtype=torch.bool)
        kpm[1, -50:] = True
        kpm = kpm if call["kpm"] == "bool" else _as_float(kpm)
    with torch.no_grad(), _Shapes() as rec:
        out, w = mha(x, x, x, key_padding_mask=kpm, need_weights=False, is_causal=call.get("is_causal", False))
    assert w is None and out.shape == (B, n, E)
    assert rec.shapes and not [s for s in rec.shapes if s[-2:] == (n, n)]


@pytest.mark.parametrize("batch_first", [False, True], ids=["sfirst", "bfirst"])
def test_unbatched_is_batch_of_one(batch_first):
    _, ours = _pair_of_modules(batch_first=batch_first)
    q, kv = torch.randn(L, E), torch.randn(S, E)
    kpm = torch.tensor([False] * (S - 2) + [True] * 2)
    out, w = ours(q, kv, kv, key_padding_mask=kpm, average_attn_weights=False)
    lift = (lambda t: t.unsqueeze(0)) if batch_first else (lambda t: t.unsqueeze(1))
    out1, w1 = ours(lift(q), lift(kv), lift(kv), key_padding_mask=kpm[None], average_attn_weights=False)
    assert out.shape == (L, E) and w.shape == (H, L, S)
    torch.testing.assert_close(out, out1.squeeze(0 if batch_first else 1), atol=ATOL, rtol=0)
    torch.testing.assert_close(w, w1[0], atol=ATOL, rtol=0)


def test_bfloat16():
    ref, ours = _pair_of_modules(batch_first=True)
    ours.to(torch.bfloat16)
    x = torch.randn(B, L, E)
    out, w = ours(x.bfloat16(), x.bfloat16(), x.bfloat16())
    out_ref, w_ref = ref(x, x, x)
    assert out.dtype == w.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), out_ref, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(w.float(), w_ref, atol=1e-2, rtol=0)


def _bad_calls():
    q, kv = torch.randn(L, B, E), torch.randn(S, B, E)
    return {
        "mask2d-shape": ((q, kv, kv), dict(attn_mask=torch.zeros(L, S + 1))),
        "mask3d-shape": ((q, kv, kv), dict(attn_mask=torch.zeros(H, L, S))),
        "mask-4d": ((q, kv, kv), dict(attn_mask=torch.zeros(1, 1, L, S))),
        "mask-int": ((q, kv, kv), dict(attn_mask=torch.zeros(L, S, dtype=torch.int64))),
        "kpm-shape": ((q, kv, kv), dict(key_padding_mask=torch.zeros(B, S + 1, dtype=torch.bool))),
        "kpm-dim": ((q, kv, kv), dict(key_padding_mask=torch.zeros(S, dtype=torch.bool))),
        "query-4d": ((q[None], kv[None], kv[None]), {}),
        "embed-dim": ((q[..., :-1], kv, kv), {}),
        "key-value-shapes": ((q, kv, kv[:-1]), {}),
        "causal-without-mask": ((q, kv, kv), dict(is_causal=True)),
    }


@pytest.mark.parametrize("name", list(_bad_calls()))
def test_errors_match_torch(name):
    """Malformed calls raise the exception type torch raises."""
    args, call = _bad_calls()[name]
    ref, ours = _pair_of_modules()
    if name == "causal-without-mask":
        ours.add_zero_attn = ref.add_zero_attn = True  # ours accepts it otherwise
    with pytest.raises(Exception) as theirs:
        ref(*args, **call)
    with pytest.raises(theirs.type):
        ours(*args, **call)


def test_swapped_class_runs_auto():
    """An nn.MultiheadAttention whose class is swapped in place keeps its weights and runs "auto"."""
    ref, _ = _pair_of_modules()
    swapped = nn.MultiheadAttention(E, H)
    swapped.load_state_dict(ref.state_dict())
    swapped.__class__ = MultiheadAttention
    x = torch.randn(L, B, E)
    assert swapped.method == "auto"
    torch.testing.assert_close(swapped(x, x, x)[0], ref(x, x, x)[0], atol=ATOL, rtol=0)
