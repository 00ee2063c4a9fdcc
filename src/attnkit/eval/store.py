"""The evaluation cache: tensors as safetensors, descriptions as JSON, never pickle.

Each entry is two files under ``<cache>/eval/``: ``<name>.safetensors`` and
``<name>.json``, the manifest ``{"format", "key", "sha256", "size"}``.  ``key`` is a
JSON description of what the entry was built from (data source, tokenizer, model,
settings); an entry is used only when its manifest's format and key equal the caller's
and the tensor file's size and SHA-256 match.  Anything else -- a missing, truncated or
edited file, another version's entry -- counts as absent and is rebuilt.  Loading reads
tensors only (safetensors cannot run code) and JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from ..data import cache_dir, sha256_file

__all__ = ["FORMAT", "cached_tensors", "entry_paths", "load_tensors", "save_tensors", "text_digest"]

FORMAT = 1


def entry_paths(name: str, root: Path | str | None = None) -> tuple[Path, Path]:
    """(tensor file, manifest) of the entry ``name`` (letters, digits, ``-_.``)."""
    if not name or any(not (c.isalnum() or c in "-_.") for c in name):
        raise ValueError(f"argument 'name': cache entry names use letters, digits and -_. only, got {name!r}")
    folder = (Path(root) if root is not None else cache_dir()) / "eval"
    return folder / f"{name}.safetensors", folder / f"{name}.json"


def _canonical(key) -> object:
    return json.loads(json.dumps(key, sort_keys=True))


def load_tensors(name: str, key, root: Path | str | None = None) -> dict[str, Tensor] | None:
    """The entry's tensors, or None when it is missing, corrupt or was built from another ``key``."""
    from safetensors.torch import load_file

    data, manifest = entry_paths(name, root)
    try:
        meta = json.loads(manifest.read_text())
        if meta.get("format") != FORMAT or meta.get("key") != _canonical(key):
            return None
        if data.stat().st_size != meta["size"] or sha256_file(data) != meta["sha256"]:
            return None
        return load_file(str(data))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):
        return None


def save_tensors(name: str, key, tensors: dict[str, Tensor], root: Path | str | None = None) -> None:
    """Write an entry atomically (a crash leaves the old entry or none, never half of one)."""
    from safetensors.torch import save_file

    data, manifest = entry_paths(name, root)
    data.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=data.parent, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
        meta = {"format": FORMAT, "key": _canonical(key), "sha256": sha256_file(Path(tmp)), "size": Path(tmp).stat().st_size}
        manifest.unlink(missing_ok=True)  # no manifest while the data changes: never a stale match
        os.replace(tmp, data)
        tmp_manifest = manifest.with_suffix(".json.tmp")
        tmp_manifest.write_text(json.dumps(meta, indent=1, sort_keys=True))
        os.replace(tmp_manifest, manifest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cached_tensors(
    name: str, key, build: Callable[[], dict[str, Tensor]], root: Path | str | None = None
) -> tuple[dict[str, Tensor], bool]:
    """The entry's tensors, built with ``build()`` and saved when absent or invalid.

    Returns:
        (tensors, hit): ``hit`` is True when the cache served them.
    """
    got = load_tensors(name, key, root)
    if got is not None:
        return got, True
    tensors = build()
    save_tensors(name, key, tensors, root)
    return {k: v.detach().cpu() for k, v in tensors.items()}, False


def text_digest(texts) -> str:
    """SHA-256 of a text or list of texts (what tokenised data is keyed by)."""
    h = hashlib.sha256()
    for t in [texts] if isinstance(texts, str) else texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()

