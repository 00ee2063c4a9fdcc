"""Bad input gets one clear error naming the argument; the registry resolves specs."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.core.registry import resolve

q = torch.randn(2, 4, 8, 16)
k = torch.randn(2, 2, 10, 16)
v = torch.randn(2, 2, 10, 12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"q": torch.randn(8, 16)}, r"argument 'q' must have shape \(B..., H, L, E\)"),
        ({"k": torch.randn(2, 2, 10, 15)}, r"argument 'k' has head dim 15 but 'q' has 16"),
        ({"k": torch.randn(2, 3, 10, 16), "v": torch.randn(2, 3, 10, 12)}, r"query heads \(4.*key/value heads \(3"),
        ({"v": torch.randn(2, 2, 11, 12)}, r"'k' .* and 'v' .* must have the same"),
        ({"q": torch.randint(0, 5, (2, 4, 8, 16))}, r"argument 'q' has dtype torch.int64.*floating"),
        ({"k": k.double(), "v": v.double()}, r"must share one dtype.*q=torch.float32, k=torch.float64"),
        ({"k": k.to("meta"), "v": v.to("meta")}, r"must be on one device"),
        ({"q": torch.randn(3, 4, 8, 16)}, r"must share their batch dims"),
        ({"attn_mask": torch.ones(8, 9, dtype=torch.bool)}, r"'attn_mask' has shape \(8, 9\), which does not broadcast"),
        ({"attn_mask": torch.ones(8, 10, dtype=torch.int32)}, r"'attn_mask' has dtype torch.int32.*attn_mask.bool\(\)"),
        ({"attn_mask": [[True]]}, r"'attn_mask' must be a torch.Tensor"),
        ({"dropout_p": 1.0}, r"'dropout_p' must be a number in \[0, 1\)"),
        ({"scale": float("nan")}, r"'scale' must be a finite number"),
        ({"is_causal": 1}, r"'is_causal' must be a bool"),
        ({"q": "not a tensor"}, r"argument 'q' must be a torch.Tensor, got str"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    args = {"q": q, "k": k, "v": v} | kwargs
    with pytest.raises(attnkit.AttentionInputError, match=match):
        attnkit.attention(**args)


def test_mask_broadcasts_without_being_expanded():
    mask = torch.ones(10, dtype=torch.bool)  # (S,) broadcasts to (B, Hq, N, S)
    out = attnkit.attention(q, k, v, mask, method="tiled")
    assert torch.allclose(out, attnkit.attention(q, k, v), atol=1e-6)


@pytest.mark.parametrize("spec", ["nope", "tiled:block_q", "tiled:colour=3", "tiled:block_q=abc"])
def test_bad_method_spec(spec):
    with pytest.raises(ValueError, match="unknown attention method|cannot read"):
        attnkit.attention(q, k, v, method=spec)


def test_method_must_be_a_name_or_config():
    with pytest.raises(TypeError, match="argument 'method' must be a method name"):
        attnkit.attention(q, k, v, method=3)


def test_spec_strings_round_trip():
    cfg = resolve("tiled:block_q=64,block_k=None")
    assert cfg == attnkit.Tiled(block_q=64)
    assert resolve(cfg.spec()) == cfg
    assert resolve("auto") == attnkit.Exact()


def test_methods_lists_capabilities():
    caps = attnkit.methods()
    assert {"math", "sdpa", "tiled", "auto"} <= set(caps)
    assert caps["tiled"].exact and caps["tiled"].returns_weights and not caps["sdpa"].returns_weights
    assert caps["math"].as_dict()["dtypes"] == ["float16", "bfloat16", "float32", "float64"]


def test_import_changes_nothing_in_torch():
    import subprocess
    import sys

    code = (
        "import torch, torch.nn.functional as F; before = F.scaled_dot_product_attention;"
        "mha = torch.nn.MultiheadAttention; import attnkit;"
        "assert F.scaled_dot_product_attention is before and torch.nn.MultiheadAttention is mha"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("n, s", [(5, 5), (7, 3), (3, 7), (1, 1)])
def test_visible_pairs_counts_the_causal_pattern(n, s):
    from attnkit.core.inputs import Shape
    from attnkit.core.reference import causal_keep

    assert Shape(1, 1, 1, n, s, 4, 4, is_causal=True).visible_pairs() == int(causal_keep(0, n, 0, s, "cpu").sum())
    assert Shape(1, 1, 1, n, s, 4, 4).visible_pairs() == n * s


def test_exact_flops_match_the_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    qq, kk, vv = torch.randn(2, 4, 64, 16), torch.randn(2, 4, 96, 16), torch.randn(2, 4, 96, 8)
    inp = attnkit.core.prepare_inputs(qq, kk, vv)
    with FlopCounterMode(display=False) as fc:
        attnkit.attention(qq, kk, vv, method="math")
    assert attnkit.Math().flops(inp.shape) == fc.get_total_flops()
