"""attnkit.autotune on a tiny random-weight Llama: the plan respects δ, takes the cheapest
candidate within it (priced at seq_len), round-trips through JSON and patch."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch

import attnkit
from attnkit.autotune import EXACT, fit_flops, load_plan, save_plan, select
from attnkit.calibrate import Capture, capture_layers
from attnkit.core.capabilities import Method
from attnkit.core.inputs import Shape
from attnkit.core.registry import resolve
from attnkit.ops import Exact

transformers = pytest.importorskip("transformers", reason="transformers is in the 'test' extra: pip install -e '.[test]'")
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB, N = 101, 64
CANDIDATES = ["local:window=8", "local:window=16,sinks=4", "local:window=32", "blocktopk:window=8,block=8,topk=2",
              "lowrank:rank=8"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    m = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # peaked attention, as in pretrained models (random weights are near uniform)
        for name, p in m.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(3.0)
    return m


@pytest.fixture(scope="module")
def report(model):
    ids = torch.randint(0, VOCAB, (2, N), generator=torch.Generator().manual_seed(3))
    return attnkit.autotune(model, [ids], max_error=0.3, candidates=CANDIDATES, seq_len=256)


def test_plan_respects_the_budget_and_takes_the_cheapest(report):
    for delta in (0.0, 0.05, 0.3, 1.0, 10.0):
        plan = select(report, delta)
        for layer, spec in plan["layers"].items():
            row = report["table"][layer]
            assert row[spec]["error"] <= delta
            within = [r["flops"] for r in row.values() if r.get("error") is not None and r["error"] <= delta]
            assert row[spec]["flops"] == min(within)
    assert set(select(report, 0.0)["layers"].values()) == {EXACT}
    assert select(report, 0.0)["flops"]["ratio"] == pytest.approx(1.0)


def test_errors_are_measured_and_priced_at_seq_len(report):
    row = report["table"]["0"]
    assert row[EXACT]["error"] == 0.0
    assert "is_causal" in row["lowrank:rank=8"]["skipped"]  # LowRank cannot serve a causal model
    shape = Shape(1, 4, 2, 256, 256, 8, 8, True)
    for spec in ("local:window=8", "blocktopk:window=8,block=8,topk=2"):
        assert row[spec]["flops"] == resolve(spec).flops(shape)
        assert len(row[spec]["head_errors"]) == 4 and all(h >= 0 for h in row[spec]["head_errors"])
    # a wider window is no worse, pooled over the batch
    assert row["local:window=32"]["error"] <= row["local:window=8"]["error"] + 1e-9


def test_plan_round_trips_through_json_and_patch(model, report, tmp_path):
    plan = select(report, 0.3)
    path = tmp_path / "plan.json"
    save_plan(plan, path)
    loaded = load_plan(path)
    assert loaded == json.loads(json.dumps(plan))
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(5))
    with attnkit.patch(model, loaded) as h, torch.no_grad():
        assert h.plan() == {k: resolve(v).spec() for k, v in plan["layers"].items()}
        out = model(ids).logits
    with attnkit.patch(model, plan["layers"]), torch.no_grad():
        assert torch.equal(model(ids).logits, out)


def test_fit_flops_reaches_the_ratio_with_the_smallest_budget(report):
    plan = fit_flops(report, 2.0)
    assert plan["flops"]["ratio"] >= 2.0
    smaller = [e for row in report["table"].values() for e in (r.get("error") for r in row.values())
               if e and e < plan["max_error"]]
    assert all(select(report, e)["flops"]["ratio"] < 2.0 for e in smaller)
    with pytest.raises(ValueError, match="ratio"):
        fit_flops(report, 1e6)


@pytest.mark.parametrize("bad", [0, -0.1, "0.1", True])
def test_max_error_must_be_positive(model, bad):
    with pytest.raises(ValueError, match="max_error"):
        attnkit.autotune(model, [torch.zeros(1, 8, dtype=torch.long)], max_error=bad)


def test_load_plan_rejects_non_json_and_unknown_methods(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_plan(bad)
    bad.write_text(json.dumps({"layers": {"0": "no_such_method"}}))
    with pytest.raises(ValueError, match="unknown attention method"):
        load_plan(bad)


def test_per_head_select_bounds_every_head(model, report):
    for delta in (0.0, 0.1, 0.3, 10.0):
        plan = select(report, delta, per_head=True)
        for layer, entry in plan["layers"].items():
            row = report["table"][layer]
            specs = [entry] * 4 if isinstance(entry, str) else entry
            assert len(specs) == 4
            for h, spec in enumerate(specs):
                assert row[spec]["head_errors"][h] <= delta
                within = [r["flops"] for r in row.values() if r.get("error") is not None and r["head_errors"][h] <= delta]
                assert row[spec]["flops"] == min(within)


def test_per_head_fit_flops_meets_the_budget_and_patches(model, report):
    plan = fit_flops(report, 2.0, per_head=True)
    assert plan["flops"]["ratio"] >= 2.0 and plan["rule"].startswith("per-head")
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(5))
    with attnkit.patch(model, json.loads(json.dumps(plan))) as h, torch.no_grad():
        out = model(ids).logits
        assert {k: resolve(v) for k, v in h.plan().items()} == {k: resolve(v) for k, v in plan["layers"].items()}
    assert torch.isfinite(out).all()
    # the plan's FLOPs are what the per-head methods count at seq_len
    shape = Shape(1, 4, 2, 256, 256, 8, 8, True)
    total = sum(resolve(v).flops(shape) for v in plan["layers"].values())
    assert total == pytest.approx(plan["flops"]["plan"])
    with pytest.raises(ValueError, match="ratio"):
        fit_flops(report, 1e6, per_head=True)


def test_eval_autotune_replans_from_a_measured_table(report, tmp_path, capsys):
    from attnkit.eval.main import main

    measured, out = tmp_path / "measured.json", tmp_path / "plan.json"
    save_plan(report, measured)
    assert main(["autotune", "--table", str(measured), "--context", "256", "--flops-ratio", "2", "--per-head",
                 "--out", str(out)]) == 0
    plan = load_plan(out)
    assert plan["layers"] == json.loads(json.dumps(fit_flops(report, 2.0, per_head=True)["layers"]))
    assert "per-head" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="context 256, not --context 512"):
        main(["autotune", "--table", str(measured), "--context", "512", "--out", str(out)])


def test_head_shares_recombine_head_errors_into_the_layer_error(report):
    for row in report["table"].values():
        shares = row[EXACT]["head_shares"]
        assert sum(shares) == pytest.approx(1.0, abs=1e-5)
        for spec, r in row.items():
            if r.get("error") is not None:
                combined = sum(w * e * e for w, e in zip(shares, r["head_errors"])) ** 0.5
                assert combined == pytest.approx(r["error"], rel=1e-3, abs=1e-5), spec


def test_per_head_fit_flops_by_share_weighs_heads_by_their_output_norm(report):
    plan = fit_flops(report, 2.0, per_head=True, weigh="share")
    assert plan["flops"]["ratio"] >= 2.0 and "share-weighted" in plan["rule"]
    # a head with no share of the output costs nothing to approximate: it takes the cheapest candidate
    table = json.loads(json.dumps(report["table"]))
    for row in table.values():
        row[EXACT]["head_shares"] = [0.0, 0.0, 0.5, 0.5]
    plan = fit_flops({**report, "table": table}, 1.5, per_head=True, weigh="share")
    for layer, entry in plan["layers"].items():
        row = table[layer]
        cheapest = min(r["flops"] for r in row.values() if r.get("error") is not None)
        for h in (0, 1):
            spec = entry if isinstance(entry, str) else entry[h]
            assert row[spec]["flops"] == cheapest
    for row in table.values():
        del row[EXACT]["head_shares"]
    with pytest.raises(ValueError, match="head_shares"):
        fit_flops({**report, "table": table}, 2.0, per_head=True, weigh="share")


# -- weighing head errors by their effect on the loss -----------------------------------


def _lm_loss(model, ids):
    """The summed next-token loss of the last half of ``ids``, as `attnkit eval` scores it."""
    half = ids.shape[1] // 2
    logits = model(ids).logits[:, -half - 1 : -1]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), ids[:, -half:].flatten(), reduction="sum")


@dataclass(frozen=True)
class _Nudged(Method):
    """Exact attention plus ``eps * direction``: a known perturbation of one layer's output."""

    direction: torch.Tensor = field(default=None, compare=False, repr=False)
    eps: float = 0.0

    name: ClassVar[str] = "nudged"
    capabilities: ClassVar = Exact.capabilities

    def forward(self, inp, *, need_weights=False, average_weights=False, state=None):
        out, weights = Exact().forward(inp)
        return out + self.eps * self.direction.to(out.dtype), weights

    def spec(self) -> str:
        return "nudged"


@pytest.fixture(scope="module")
def model64(model):
    import copy

    return copy.deepcopy(model).double()


def test_capture_layers_with_loss_passes_the_gradient_of_the_loss(model64):
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(7))
    grads = {}
    capture_layers(model64, [ids], lambda layer, inp, out, grad: grads.__setitem__(layer, (out, grad)), loss=_lm_loss)
    assert sorted(grads) == [0, 1, 2]
    assert all(p.requires_grad and p.grad is None for p in model64.parameters())  # weights untouched, restored
    for layer in (0, 2):  # d loss / d out against a central difference along a random direction
        out, grad = grads[layer]
        u = torch.randn(out.shape, generator=torch.Generator().manual_seed(layer), dtype=out.dtype)
        eps = 1e-4  # LlamaRMSNorm computes in fp32: a smaller step drowns in its rounding
        with torch.no_grad():
            with attnkit.patch(model64, {layer: _Nudged(direction=u, eps=eps)}):
                up = _lm_loss(model64, ids)
            with attnkit.patch(model64, {layer: _Nudged(direction=u, eps=-eps)}):
                down = _lm_loss(model64, ids)
        assert float((up - down) / (2 * eps)) == pytest.approx(float((grad * u).sum()), rel=1e-4)
        assert grad.abs().sum() > 0


def test_autotune_with_loss_records_each_heads_fisher_cost(model64):
    ids = torch.randint(0, VOCAB, (1, N), generator=torch.Generator().manual_seed(3))
    report = attnkit.autotune(model64, [ids], max_error=0.3, candidates=CANDIDATES, seq_len=256, loss=_lm_loss)
    calls = {}
    capture_layers(model64, [ids], lambda layer, inp, out, grad: calls.__setitem__(layer, (inp, out, grad)),
                   loss=_lm_loss)
    spec = "local:window=8"
    for layer, (inp, out, grad) in calls.items():
        approx = Capture(inp.q, inp.k, inp.v, inp.attn_mask, inp.is_causal, inp.scale, out).run(resolve(spec))
        want = ((approx - out) * grad).pow(2).sum((0, 2, 3))  # (Hq,)
        got = report["table"][str(layer)][spec]["head_fisher"]
        assert got == pytest.approx(want.tolist(), rel=1e-9, abs=1e-300)
        assert report["table"][str(layer)][EXACT]["head_fisher"] == [0.0] * 4
    plan = fit_flops(report, 2.0, per_head=True, weigh="loss")
    assert plan["flops"]["ratio"] >= 2.0 and "loss" in plan["rule"]
    # a Lagrangian choice: no plan that swaps one head's method and costs no more FLOPs has a smaller summed cost
    table = report["table"]

    def total(choices):
        return sum(table[k][sp]["head_fisher"][h] for k, picks in choices.items() for h, sp in enumerate(picks))

    chosen = {k: ([e] * 4 if isinstance(e, str) else list(e)) for k, e in plan["layers"].items()}
    swaps = 0
    for k, picks in chosen.items():
        for h in range(4):
            for sp, r in table[k].items():
                if r.get("error") is None or sp == picks[h]:
                    continue
                alt = {**chosen, k: picks[:h] + [sp] + picks[h + 1 :]}
                if sum(table[j][s]["flops"] for j, p in alt.items() for s in p) / 4 <= plan["flops"]["plan"]:
                    swaps += 1
                    assert total(alt) >= total(chosen) * (1 - 1e-9)
    assert swaps > 0


def test_fit_flops_weigh_needs_what_it_weighs(report):
    with pytest.raises(ValueError, match="head_fisher.*loss="):
        fit_flops(report, 2.0, per_head=True, weigh="loss")
    with pytest.raises(ValueError, match="weigh"):
        fit_flops(report, 2.0, per_head=True, weigh="perplexity")
    with pytest.raises(ValueError, match="per_head=True"):
        fit_flops(report, 2.0, weigh="share")
